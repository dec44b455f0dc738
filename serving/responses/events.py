"""A chat completion's stream as the Responses API's typed events.

``EventWriter`` is fed the chat chunks in order and answers with the events they make,
each with the next ``sequence_number``: ``response.created`` and
``response.in_progress`` first; per output item ``response.output_item.added``, its
content (``response.content_part.added``, ``response.output_text.delta``... or
``response.function_call_arguments.delta``...) and its ``done`` events when the next item
starts or the stream ends; last ``response.completed`` (``response.incomplete`` when the
token limit cut it), or ``error`` and ``response.failed``. Items are closed in order, so
a client that folds the events (the ``openai`` SDK's ``responses.stream``) rebuilds the
same ``output`` the final event carries.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import orjson

from serving.responses.translate import new_id, output_text, usage

JSON = dict[str, Any]
# status, output, usage, error -> the Response object as it stands
Snapshot = Callable[[str, list[JSON], JSON | None, JSON | None], JSON]


def sse(event: JSON) -> bytes:
    """One event as OpenAI frames it: its type as the SSE ``event``, then its JSON."""
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class EventWriter:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.sequence = 0
        self.output: list[JSON] = []  # the items, as they stand
        self.open: int | None = None  # the output index of the item not yet done
        self.calls: dict[int, int] = {}  # chat tool-call index -> output index
        self.finish_reason: str | None = None
        self.usage: JSON | None = None

    def _event(self, kind: str, **fields: Any) -> JSON:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[JSON]:
        response = self.snapshot("in_progress", [], None, None)
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def chunk(self, chunk: JSON) -> list[JSON]:
        events: list[JSON] = []
        if isinstance(chunk.get("usage"), dict):
            self.usage = usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # one answer per response (n is always 1 here)
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                events += self._text(text)
            for call in delta.get("tool_calls") or ():
                events += self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> tuple[list[JSON], JSON]:
        """The closing events and the final Response object (status ``completed``, or
        ``incomplete`` when the answer hit its token limit)."""
        events: list[JSON] = []
        if not self.output:
            events += self._text("")  # an empty answer is still an (empty) message
        events += self._close()
        status = "incomplete" if self.finish_reason == "length" else "completed"
        response = self.snapshot(status, self.output, self.usage, None)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self._event(kind, response=response))
        return events, response

    def fail(self, code: str | None, message: str, param: str | None) -> list[JSON]:
        """``error`` (our error's code) and ``response.failed`` (OpenAI's error codes)."""
        kind = "rate_limit_exceeded" if code == "rate_limit_exceeded" else "server_error"
        error = {"code": kind, "message": message}
        response = self.snapshot("failed", self.output, self.usage, error)
        return [
            self._event("error", code=code, message=message, param=param),
            self._event("response.failed", response=response),
        ]

    def _text(self, text: str) -> list[JSON]:
        events: list[JSON] = []
        item = self.output[self.open] if self.open is not None else None
        if item is None or item["type"] != "message":
            events += self._close()
            item = {
                "type": "message",
                "id": new_id("msg"),
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            events += self._add(item)
            item["content"].append(output_text(""))
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=self.open,
                    content_index=0,
                    part=output_text(""),
                )
            )
        if text:
            item["content"][0]["text"] += text
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=self.open,
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        return events

    def _call(self, call: JSON) -> list[JSON]:
        events: list[JSON] = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        at = self.calls.get(index)
        if at is None:
            events += self._close()
            item = {
                "type": "function_call",
                "id": new_id("fc"),
                "call_id": call.get("id") or new_id("call"),
                "name": function.get("name") or "",
                "arguments": "",
                "status": "in_progress",
            }
            events += self._add(item)
            at = self.calls[index] = len(self.output) - 1
        item = self.output[at]
        if function.get("name") and not item["name"]:
            item["name"] = function["name"]
        arguments = function.get("arguments")
        if arguments:
            item["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=at,
                    delta=arguments,
                )
            )
        return events

    def _add(self, item: JSON) -> list[JSON]:
        self.output.append(item)
        self.open = len(self.output) - 1
        added = copy.deepcopy(item)
        return [self._event("response.output_item.added", output_index=self.open, item=added)]

    def _close(self) -> list[JSON]:
        """The done events of the open item, if one is open."""
        if self.open is None:
            return []
        at, item = self.open, self.output[self.open]
        self.open = None
        events: list[JSON] = []
        if item["type"] == "message":
            item["status"] = "incomplete" if self.finish_reason == "length" else "completed"
            text = item["content"][0]["text"]
            common = {"item_id": item["id"], "output_index": at, "content_index": 0}
            part = output_text(text)
            text_done = self._event("response.output_text.done", **common, text=text, logprobs=[])
            events.append(text_done)
            events.append(self._event("response.content_part.done", **common, part=part))
        else:
            item["status"] = "completed"
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=at,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        events.append(
            self._event("response.output_item.done", output_index=at, item=copy.deepcopy(item))
        )
        return events
