"""Tool calling on the engines Weir starts: which vLLM tool-call parser a chat version
uses, the chat template that renders its tools, and the engine flags that turn it on.

vLLM answers any request with ``tools`` and ``tool_choice`` other than ``none`` with a
400 unless the server was started with ``--enable-auto-tool-choice --tool-call-parser
NAME``, and the parser must match the format the chat template teaches the model. A
version says ``tool_parser = "NAME"`` (with ``chat_template`` if the model's own renders
no tools), ``"off"``, or ``"auto"`` (the default): derived from the model's template. A
ChatML template that renders no tools (SmolLM2's) gets Weir's ChatML template with
Hermes-style tool calls, which renders every other conversation exactly as the model's
own does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from models.config import VersionConfig

TEMPLATES = Path(__file__).parent / "templates"
CHATML_TOOLS = TEMPLATES / "chatml_tools.jinja"
StrictLevel = Literal["auto", "function", "parameter"]

# A marker each tool-calling template format writes, and vLLM's parser for it.
_MARKERS = (
    ("<tool_call>", "hermes"),
    ("<|python_tag|>", "llama3_json"),
    ("[TOOL_CALLS]", "mistral"),
)


@dataclass(frozen=True)
class ToolSupport:
    """How a chat version calls tools, and the flags its engine (if Weir starts it) needs."""

    calls_tools: bool = False  # False: a request with tools is refused (400)
    parser: str | None = None  # vLLM's --tool-call-parser for an engine Weir starts
    template: Path | None = None  # given to the engine (and counter) instead of the model's
    strict_level: StrictLevel = "parameter"

    def engine_args(self) -> list[str]:
        args: list[str] = []
        if self.parser is not None:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.parser]
            args += ["--tool-strict-level", self.strict_level]
        if self.template is not None:
            args += ["--chat-template", str(self.template)]
        return args


NO_TOOLS = ToolSupport()


def model_template(model_dir: Path) -> str | None:
    """The chat template shipped with the weights (as vLLM finds it), or None."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def derive(template: str | None, strict_level: StrictLevel = "parameter") -> ToolSupport:
    """The parser a template's tool-call format needs; Weir's ChatML template for a ChatML
    template that renders no tools; none for anything else."""
    if template is None:
        return NO_TOOLS
    for marker, parser in _MARKERS:
        if marker in template:
            return ToolSupport(True, parser, None, strict_level)
    if "<|im_start|>" in template and "tools" not in template:
        return ToolSupport(True, "hermes", CHATML_TOOLS, strict_level)
    return NO_TOOLS


def tool_support(
    task: str,
    parser: str,
    chat_template: str | None,
    strict_level: StrictLevel,
    model_dir: Path | None,
) -> ToolSupport:
    """A version's tool support from its settings (``tool_parser``, ``chat_template``,
    ``tool_strict``) and its weights' directory (None: a remote engine, which is trusted
    to have been started for the tools it is asked to call)."""
    template = Path(chat_template).expanduser() if chat_template else None
    if task != "chat" or parser == "off":
        return ToolSupport(template=template)
    if model_dir is None:  # a remote engine: its flags are not ours to set
        return ToolSupport(True, None, None, strict_level)
    if parser != "auto":
        return ToolSupport(True, parser, template, strict_level)
    if template is None:
        return derive(model_template(model_dir), strict_level)
    derived = derive(template.read_text(), strict_level)
    if derived.template is not None:  # the given template renders no tools: none called
        return ToolSupport(template=template)
    return ToolSupport(derived.calls_tools, derived.parser, template, strict_level)


def for_version(task: str, version: VersionConfig, weights: Path | None) -> ToolSupport:
    """``tool_support`` from a version's configuration."""
    return tool_support(
        task, version.tool_parser, version.chat_template, version.tool_strict, weights
    )
