"""The Responses API's request bodies (``POST /v1/responses``) as we accept them.

What we serve is what translates to a chat completion: text and message inputs, function
tools and their calls and outputs, ``instructions``, sampling, ``text.format`` and the
stored conversation (``previous_response_id``, ``store``). Fields that need a feature we
do not have (built-in tools, background runs, conversations objects, prompt templates,
images and files) are refused with a 400 that names them, never silently dropped.

Every list a client can make long is bounded here (the configured maxima, smaller, are
checked by the use case); free-form JSON (tool parameters, schemas, metadata) nests at
most ``MAX_JSON_DEPTH`` levels. Unknown fields are accepted and ignored (OpenAI adds
fields often; none of them reaches the engine).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from serving.protocol.metadata import MAX_METADATA
from serving.protocol.metadata import bounded as bounded_metadata
from serving.protocol.requests import (
    MAX_MESSAGES,
    MAX_TOKENS,
    Json,
    ModelRequest,
    Temperature,
    TopP,
)

MAX_INPUT_ITEMS = MAX_MESSAGES  # hard cap; responses.max_input_items is the configured one
MAX_CONTENT_PARTS = 256  # parts in one message's content
MAX_TOOLS = 128  # as OpenAI allows
MAX_ID = 128  # response ids, call ids, item ids


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputText(_Item):
    type: Literal["input_text"]
    text: str


class OutputText(_Item):
    """An assistant message's text, as a previous response's output carries it back."""

    type: Literal["output_text"]
    text: str


class Refusal(_Item):
    type: Literal["refusal"]
    refusal: str


def _part_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("input_text", "output_text", "refusal") else "unsupported"


class UnsupportedPart(_Item):
    """Images, files and audio: refused by the use case with the part's type named."""

    type: str


ContentPart = Annotated[
    Annotated[InputText, Tag("input_text")]
    | Annotated[OutputText, Tag("output_text")]
    | Annotated[Refusal, Tag("refusal")]
    | Annotated[UnsupportedPart, Tag("unsupported")],
    Discriminator(_part_type),
]


class MessageItem(_Item):
    """A message: ``EasyInputMessage`` (``type`` optional, string content) or ``InputMessage``
    / ``OutputMessage`` (a list of content parts)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)]
    id: str | None = Field(None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=MAX_ID)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = Field(None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=MAX_ID)
    output: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)]
    id: str | None = Field(None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class UnsupportedItem(_Item):
    """Any other item type (reasoning, built-in tool calls, item references): refused by
    the use case with its type named."""

    type: str


def _item_type(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else value.type
    return kind if kind in ("message", "function_call", "function_call_output") else "other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[UnsupportedItem, Tag("other")],
    Discriminator(_item_type),
]


class FunctionTool(_Item):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = Field(None, max_length=16384)
    parameters: Json | None = None
    strict: bool | None = None


class OtherTool(_Item):
    type: str


def _tool_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "function" if kind == "function" else "other"


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
    Discriminator(_tool_type),
]


class ToolChoiceFunction(_Item):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceFunction


class FormatText(_Item):
    type: Literal["text"]


class FormatJsonObject(_Item):
    type: Literal["json_object"]


class FormatJsonSchema(_Item):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")  # bounded by output_check's schema check
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


TextFormat = Annotated[
    FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")
]


class TextConfig(_Item):
    format: TextFormat | None = None


class ResponseRequest(ModelRequest):
    """``CreateResponse``, as far as a chat completion can serve it."""

    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=MAX_ID)
    store: bool | None = True
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: Annotated[dict[str, str], Field(max_length=MAX_METADATA)] | None = None
    user: str | None = Field(None, max_length=256)
    # accepted when they ask for nothing we lack; refused by the use case otherwise
    background: bool | None = None
    conversation: Json | str | None = None
    prompt: Json | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = Field(None, max_length=16)

    @model_validator(mode="after")
    def _bounded_metadata(self) -> ResponseRequest:
        bounded_metadata(self.metadata)
        return self


class InputItemsQuery(BaseModel):
    """``GET /v1/responses/{id}/input_items``'s query."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = Field(None, max_length=MAX_ID)
