"""Tool calling in chat requests: the shape of ``tools`` and ``tool_choice``, the tools as
the engine renders them into the prompt, and the check of ``strict`` functions' arguments.

OpenAI's rules, said before any engine is called: every tool is a ``function`` with a
name (at most ``MAX_TOOLS``, names unique); ``tool_choice`` is ``none``, ``auto``,
``required`` or names one of the tools, and needs ``tools``; a ``tool`` message answers a
call by its ``tool_call_id``. A function marked ``strict: true`` promises arguments that
match its ``parameters``: an answer whose call breaks them is invalid model output, held
to the same rule (502, or the header in pass mode) as a ``response_format`` schema.
"""

from __future__ import annotations

import json
from typing import Any

from serving.core import output_check
from serving.errors import InvalidModelOutput, InvalidRequest
from serving.protocol.requests import ChatCompletionRequest

JSON = dict[str, Any]
MAX_TOOLS = 128  # OpenAI's own limit on tools per request
CHOICES = frozenset({"none", "auto", "required"})
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_NAME = 64


def _function(tool: Any, index: int) -> JSON:
    param = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequest(f"{param} must be a tool of type 'function'.", param=param)
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(f"{param}.function must be an object.", param=f"{param}.function")
    name = function.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not set(name) <= _NAME_CHARS:
        raise InvalidRequest(
            f"{param}.function.name must be 1 to {MAX_NAME} letters, digits, '_' or '-'.",
            param=f"{param}.function.name",
        )
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequest(
            f"{param}.function.parameters must be a JSON Schema object.",
            param=f"{param}.function.parameters",
        )
    if isinstance(parameters, dict):  # bounded, local references only, a valid schema
        output_check.check_request_schema(parameters, param=f"{param}.function.parameters")
    return function


def check_tools(request: ChatCompletionRequest) -> None:
    """Raise ``InvalidRequest`` for tools, a tool choice or tool messages OpenAI refuses."""
    tools = request.tools
    if tools is not None and len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"{len(tools)} tools; at most {MAX_TOOLS} are allowed.", param="tools")
    names: set[str] = set()
    for index, tool in enumerate(tools or ()):
        name = _function(tool, index)["name"]
        if name in names:
            raise InvalidRequest(f"Two tools are named '{name}'.", param=f"tools[{index}]")
        names.add(name)
    _check_choice(request.tool_choice, names, tools is not None and len(tools) > 0)
    parallel = (request.model_extra or {}).get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean.", param="parallel_tool_calls")
    for index, message in enumerate(request.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(
                "A message with role 'tool' must carry the tool_call_id it answers.",
                param=f"messages[{index}].tool_call_id",
            )


def _check_choice(choice: Any, names: set[str], has_tools: bool) -> None:
    if choice is None:
        return
    if not has_tools and choice != "none":
        raise InvalidRequest(
            "tool_choice is only allowed when tools are specified.", param="tool_choice"
        )
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise InvalidRequest(
                "tool_choice must be 'none', 'auto', 'required' or a named function.",
                param="tool_choice",
            )
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not name:
        raise InvalidRequest(
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if name not in names:
        raise InvalidRequest(
            f"tool_choice names the function '{name}', which is not among the tools.",
            param="tool_choice",
        )


def calls_tools(body: JSON) -> bool:
    """Does this request let the model call a tool?"""
    return bool(body.get("tools")) and body.get("tool_choice", "auto") != "none"


def rendered(tools: list[Any] | None) -> list[JSON] | None:
    """The tools as vLLM hands them to the chat template (its wire models dumped: unknown
    fields dropped, absent description and parameters as null, strict only when given),
    so that a prompt counted here has the engine's own ``prompt_tokens``."""
    if tools is None:
        return None
    out: list[JSON] = []
    for tool in tools:
        function = tool.get("function") or {}
        shown: JSON = {
            "name": function.get("name"),
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        if function.get("strict") is not None:
            shown["strict"] = function["strict"]
        out.append({"type": "function", "function": shown})
    return out


def strict_schemas(body: JSON) -> dict[str, JSON]:
    """The ``parameters`` of each function marked ``strict: true``, by name."""
    schemas: dict[str, JSON] = {}
    for tool in body.get("tools") or ():
        function = tool.get("function") or {}
        if function.get("strict") is True:
            parameters = function.get("parameters")
            schemas[function["name"]] = parameters if isinstance(parameters, dict) else {}
    return schemas


def check_tool_calls(answer: JSON, strict: dict[str, JSON]) -> None:
    """Raise ``InvalidModelOutput`` unless every call of a strict function in ``answer``
    has arguments that are JSON matching its parameters."""
    for choice in answer.get("choices") or ():
        index = choice.get("index", 0)
        calls = (choice.get("message") or {}).get("tool_calls") or ()
        for call in calls:
            function = call.get("function") or {}
            schema = strict.get(str(function.get("name")))
            if schema is None:
                continue
            try:
                arguments = json.loads(function.get("arguments") or "")
            except (ValueError, RecursionError) as exc:
                raise InvalidModelOutput(
                    f"choice {index}: the arguments of the call to '{function.get('name')}'"
                    " are not JSON, as its strict parameters require."
                ) from exc
            output_check.check_value(arguments, schema, f"choice {index}: the call to "
                                     f"'{function.get('name')}'")  # fmt: skip
