"""Responses API shapes to and from chat completions. Pure functions, no I/O.

A request's input becomes stored *items* (OpenAI's ``ItemResource`` shapes, each with an
id), the conversation's items become chat ``messages`` (``instructions`` first, as a
system message), and a chat completion's choice becomes the response's ``output`` items.
What cannot be translated is an ``InvalidRequest`` that names the field.
"""

from __future__ import annotations

import os
from typing import Any

from serving.errors import InvalidRequest
from serving.protocol.responses import (
    FormatJsonObject,
    FormatJsonSchema,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputText,
    MessageItem,
    OutputText,
    Refusal,
    ResponseRequest,
    ToolChoiceFunction,
)

JSON = dict[str, Any]
INPUT_ROLES = ("user", "system", "developer")


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def output_text(text: str) -> JSON:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def input_items(request: ResponseRequest) -> list[JSON]:
    """The request's input as stored items, each with an id (what ``input_items`` lists)."""
    if isinstance(request.input, str):
        return [_message("user", [{"type": "input_text", "text": request.input}])]
    items: list[JSON] = []
    for i, item in enumerate(request.input):
        if isinstance(item, MessageItem):
            items.append(_message_item(item, i))
        elif isinstance(item, FunctionCallItem):
            items.append(
                {
                    "type": "function_call",
                    "id": item.id or new_id("fc"),
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.arguments,
                    "status": "completed",
                }
            )
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output
            if not isinstance(output, str):
                output = "".join(_text_of(part, f"input[{i}].output[{j}]")
                                 for j, part in enumerate(output))  # fmt: skip
            items.append(
                {
                    "type": "function_call_output",
                    "id": item.id or new_id("fco"),
                    "call_id": item.call_id,
                    "output": output,
                    "status": "completed",
                }
            )
        else:
            raise InvalidRequest(
                f"Input items of type '{item.type[:64]}' are not supported; use messages, "
                "function_call and function_call_output items.",
                param=f"input[{i}]",
            )
    return items


def _message(role: str, content: list[JSON], item_id: str | None = None) -> JSON:
    if role == "assistant":
        return {
            "type": "message",
            "id": item_id or new_id("msg"),
            "role": "assistant",
            "status": "completed",
            "content": content,
        }
    return {
        "type": "message",
        "id": item_id or new_id("msg"),
        "role": role,
        "status": "completed",
        "content": content,
    }


def _message_item(item: MessageItem, i: int) -> JSON:
    assistant = item.role == "assistant"
    if isinstance(item.content, str):
        texts = [item.content]
        parts: list[JSON] = []
    else:
        texts, parts = [], []
        for j, part in enumerate(item.content):
            if isinstance(part, Refusal) and assistant:
                parts.append({"type": "refusal", "refusal": part.refusal})
                continue
            texts.append(_text_of(part, f"input[{i}].content[{j}]"))
    if assistant:
        content = [output_text(t) for t in texts] + parts
    else:
        content = [{"type": "input_text", "text": t} for t in texts]
    return _message(item.role, content, item.id)


def _text_of(part: Any, where: str) -> str:
    if isinstance(part, InputText | OutputText):
        return part.text
    raise InvalidRequest(
        f"Content of type '{str(part.type)[:64]}' is not supported here; text only.",
        param=where,
    )


def messages(items: list[JSON], instructions: str | None) -> list[JSON]:
    """The conversation as chat messages. Consecutive function calls (and the assistant
    text before them) are one assistant message with ``tool_calls``, as chat has them."""
    out: list[JSON] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": text})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return out


def chat_body(request: ResponseRequest, conversation: list[JSON]) -> JSON:
    """The chat completion that serves ``request`` with ``conversation`` (the chain's
    items and this request's)."""
    body: JSON = {
        "model": request.model,
        "messages": messages(conversation, request.instructions),
        "stream": request.stream,
    }
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    tools = function_tools(request)
    if tools:
        body["tools"] = [{"type": "function", "function": _function(tool)} for tool in tools]
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        if not any(tool.name == choice.name for tool in tools):
            raise InvalidRequest(
                f"tool_choice names the function '{choice.name}', which is not in tools.",
                param="tool_choice",
            )
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None and (tools or choice == "none"):
        body["tool_choice"] = choice
    elif choice == "required":
        raise InvalidRequest(
            "tool_choice is required, but there are no tools.", param="tool_choice"
        )
    fmt = request.text.format if request.text is not None else None
    if isinstance(fmt, FormatJsonSchema):
        schema: JSON = {"name": fmt.name, "schema": fmt.schema_}
        for name in ("description", "strict"):
            value = getattr(fmt, name)
            if value is not None:
                schema[name] = value
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(fmt, FormatJsonObject):
        body["response_format"] = {"type": "json_object"}
    return body


def function_tools(request: ResponseRequest) -> list[FunctionTool]:
    tools: list[FunctionTool] = []
    for i, tool in enumerate(request.tools or ()):
        if not isinstance(tool, FunctionTool):
            raise InvalidRequest(
                f"Tools of type '{tool.type[:64]}' are not supported; function tools only.",
                param=f"tools[{i}]",
            )
        tools.append(tool)
    return tools


def _function(tool: FunctionTool) -> JSON:
    function: JSON = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.strict is not None:
        function["strict"] = tool.strict
    return function


def tools_echo(request: ResponseRequest) -> list[JSON]:
    """The tools as the response object lists them (``FunctionTool``)."""
    return [
        {
            "type": "function",
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
            "strict": tool.strict,
        }
        for tool in function_tools(request)
    ]


def tool_choice_echo(request: ResponseRequest) -> Any:
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        return {"type": "function", "name": choice.name}
    return choice or "auto"


def text_echo(request: ResponseRequest) -> JSON:
    fmt = request.text.format if request.text is not None else None
    if fmt is None:
        return {"format": {"type": "text"}}
    return {"format": fmt.model_dump(by_alias=True, exclude_none=True)}


def output_items(choice: JSON) -> list[JSON]:
    """A chat choice's message as output items: its text (if any, or if nothing else), then
    one ``function_call`` per tool call."""
    message = choice.get("message") or {}
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    items: list[JSON] = []
    content = message.get("content")
    calls = message.get("tool_calls") or []
    if content or not calls:
        items.append(
            {
                "type": "message",
                "id": new_id("msg"),
                "role": "assistant",
                "status": status,
                "content": [output_text(content or "")],
            }
        )
    for call in calls:
        function = call.get("function") or {}
        items.append(
            {
                "type": "function_call",
                "id": new_id("fc"),
                "call_id": call.get("id") or new_id("call"),
                "name": function.get("name") or "",
                "arguments": function.get("arguments") or "",
                "status": "completed",
            }
        )
    return items


def usage(chat_usage: Any) -> JSON | None:
    if not isinstance(chat_usage, dict):
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    details = chat_usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached or 0), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": int(chat_usage.get("total_tokens") or prompt + completion),
    }


def response_object(
    request: ResponseRequest,
    response_id: str,
    created_at: int,
    *,
    status: str,
    output: list[JSON] | None = None,
    usage_: JSON | None = None,
    error: JSON | None = None,
    completed_at: int | None = None,
) -> JSON:
    """OpenAI's ``Response`` object for ``request`` (what it asked echoed back)."""
    body: JSON = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": completed_at if status == "completed" else None,
        "error": error,
        "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete" else None),
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": request.model,
        "output": output or [],
        "parallel_tool_calls": (
            request.parallel_tool_calls if request.parallel_tool_calls is not None else True
        ),
        "previous_response_id": request.previous_response_id,
        "reasoning": None,
        "store": request.store is not False,
        "temperature": request.temperature,
        "text": text_echo(request),
        "tool_choice": tool_choice_echo(request),
        "tools": tools_echo(request),
        "top_p": request.top_p,
        "truncation": "disabled",
        "metadata": request.metadata or {},
        "background": False,
    }
    if usage_ is not None:  # the spec's ResponseUsage is not nullable: absent until known
        body["usage"] = usage_
    if request.user is not None:
        body["user"] = request.user
    return body
