"""What a cached answer is: its key, whether a request may use it, and how it replays.

The key hashes the tenant scope, the public model and exact version, the route and the
canonical request (every field that can change the output; not ``stream``, ``user`` or
our ``weir`` extension), so a new version never serves an old version's answer and one
tenant never sees another's. Streams are assembled into the same entry a non-streamed
answer is, and any entry replays as SSE chunks ending in ``[DONE]``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import orjson

JSON = dict[str, Any]
Mode = Literal["use", "refresh", "bypass"]
RESULT_HEADER = "x-weir-cache"  # hit | miss | bypass (| partial for embeddings)
CONTROL_HEADER = "x-weir-cache-control"  # bypass | refresh, per request
NOT_OUTPUT = frozenset(
    {"model", "stream", "stream_options", "user", "weir", "metadata", "store", "service_tier",
     "request_id", "priority"}
)  # fmt: skip


def extension(body: JSON) -> JSON:
    weir = body.get("weir")
    return weir if isinstance(weir, dict) else {}


def mode_for(body: JSON, control: str | None) -> Mode:
    """Deterministic requests only (temperature 0 or a seed), unless told otherwise."""
    asked = control or extension(body).get("cache")
    if asked in ("bypass", "off", "no-store"):
        return "bypass"
    if body.get("logprobs") or body.get("top_logprobs") or body.get("echo"):
        return "bypass"  # answers we do not replay faithfully
    deterministic = body.get("temperature") == 0 or body.get("seed") is not None
    if not deterministic:
        return "bypass"
    return "refresh" if asked == "refresh" else "use"


def response_key(scope: str, model: str, version: str, route: str, body: JSON) -> str:
    canonical = {k: v for k, v in body.items() if k not in NOT_OUTPUT}
    raw = orjson.dumps([scope, model, version, route, canonical], option=orjson.OPT_SORT_KEYS)
    return "r:" + hashlib.sha256(raw).hexdigest()


def embedding_key(model: str, version: str, dimensions: int | None, text: Any) -> str:
    raw = orjson.dumps([model, version, dimensions, text])
    return "e:" + hashlib.sha256(raw).hexdigest()


class Assembler:
    """Builds the entry for a streamed answer from its chunks; refuses what it can't replay.

    The entry has the shape of the route that was asked (``chat``: a chat completion, else
    a text completion), whatever the engine's chunks say of themselves."""

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.choices: dict[int, JSON] = {}
        self.head: JSON = {}
        self.usage: JSON | None = None
        self.replayable = True

    def add(self, chunk: JSON) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "created", "model", "object")}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            into = self.choices.setdefault(index, {"index": index, "text": ""})
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if delta.get("function_call"):
                    self.replayable = False  # the deprecated form: not assembled
                for call in delta.get("tool_calls") or ():
                    self._add_call(into, call)
                into["text"] += delta.get("content") or ""
            elif isinstance(choice.get("text"), str):
                into["text"] += choice["text"]
            if choice.get("logprobs"):
                self.replayable = False
            if choice.get("finish_reason"):
                into["finish_reason"] = choice["finish_reason"]

    def _add_call(self, into: JSON, call: Any) -> None:
        """A streamed tool call's delta: the first names it, the next add to arguments."""
        if not isinstance(call, dict) or not isinstance(call.get("index"), int):
            self.replayable = False
            return
        calls: dict[int, JSON] = into.setdefault("calls", {})
        known = calls.setdefault(
            call["index"], {"id": None, "type": "function", "name": "", "arguments": ""}
        )
        if call.get("id"):
            known["id"] = call["id"]
        function = call.get("function") or {}
        known["name"] += function.get("name") or ""
        known["arguments"] += function.get("arguments") or ""

    def entry(self) -> JSON | None:
        if not self.replayable or not self.choices:
            return None
        if any("finish_reason" not in c for c in self.choices.values()):
            return None  # truncated: never stored
        chat = self.chat
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            if chat:
                message: JSON = {"role": "assistant", "content": c["text"], "refusal": None}
                if c.get("calls"):
                    message["content"] = c["text"] or None
                    message["tool_calls"] = [
                        {"id": call["id"], "type": "function",
                         "function": {"name": call["name"], "arguments": call["arguments"]}}
                        for _, call in sorted(c["calls"].items())
                    ]  # fmt: skip
                choices.append({"index": index, "message": message, "logprobs": None,
                                "finish_reason": c["finish_reason"]})  # fmt: skip
            else:
                choices.append({"index": index, "text": c["text"], "logprobs": None,
                                "finish_reason": c["finish_reason"]})  # fmt: skip
        entry: JSON = {
            "id": self.head.get("id"),
            "object": "chat.completion" if chat else "text_completion",
            "created": self.head.get("created"),
            "model": self.head.get("model"),
            "choices": choices,
        }
        if self.usage is not None:
            entry["usage"] = self.usage
        return entry


def replayable(entry: JSON) -> bool:
    """Can this stored answer be replayed as a stream? (Not the deprecated function_call.)"""
    for choice in entry.get("choices") or ():
        message = choice.get("message")
        if isinstance(message, dict) and message.get("function_call"):
            return False
    return True


def _call_deltas(calls: list[JSON]) -> list[JSON]:
    """A stored message's tool calls as stream deltas: one per call, whole."""
    return [
        {"index": i, "id": call.get("id"), "type": "function",
         "function": {"name": (call.get("function") or {}).get("name"),
                      "arguments": (call.get("function") or {}).get("arguments") or ""}}
        for i, call in enumerate(calls)
    ]  # fmt: skip


def replay(entry: JSON, include_usage: bool) -> list[JSON]:
    """The chunks a streamed request gets for a stored answer (``[DONE]`` is the caller's)."""
    chat = entry.get("object") == "chat.completion"
    base = {
        "id": entry.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": entry.get("created"),
        "model": entry.get("model"),
    }
    if "system_fingerprint" in entry:
        base["system_fingerprint"] = entry["system_fingerprint"]
    chunks: list[JSON] = []
    for choice in entry.get("choices") or ():
        index = choice.get("index", 0)
        finish = choice.get("finish_reason")
        if chat:
            message = choice.get("message") or {}
            content = message.get("content") or ""
            chunks.append(base | {"choices": [
                {"index": index, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None}]})  # fmt: skip
            if content:
                chunks.append(base | {"choices": [
                    {"index": index, "delta": {"content": content}, "logprobs": None,
                     "finish_reason": None}]})  # fmt: skip
            if message.get("tool_calls"):
                chunks.append(base | {"choices": [
                    {"index": index, "delta": {"tool_calls": _call_deltas(message["tool_calls"])},
                     "logprobs": None, "finish_reason": None}]})  # fmt: skip
            chunks.append(
                base
                | {
                    "choices": [
                        {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
                    ]
                }
            )
        else:
            chunks.append(base | {"choices": [
                {"index": index, "text": choice.get("text") or "", "logprobs": None,
                 "finish_reason": finish}]})  # fmt: skip
    if include_usage and isinstance(entry.get("usage"), dict):
        chunks.append(base | {"choices": [], "usage": entry["usage"]})
    return chunks
