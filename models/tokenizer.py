"""Token counts from the served model's own files, the way vLLM counts them.

Uses the model's ``tokenizer.json`` (the ``tokenizers`` library, no transformers import)
and its chat template rendered in a sandboxed Jinja environment, as transformers does.
A chat prompt is the rendered template tokenized without added special tokens; a
completion prompt is tokenized with them; both match vLLM's ``usage.prompt_tokens``.

Counting is CPU work in Rust that releases the GIL (``encode_batch``: the tokenizers
binding's ``encode`` holds it), so a caller may run it in a thread without stalling the
event loop. ``max_chars`` bounds a text by its length before any of that work: see
``char_bound``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from cachetools import LRUCache
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import StoreError

DEFAULT_CONTEXT = 2048
# Pre-tokenizers and normalizers that never drop a character of the input, so that every
# character ends up inside some token. Splitting on whitespace (BERT, ``Whitespace``) drops
# it; a ``Replace`` may delete; "removed" split behaviours delete what they match.
KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"})
COMPOSING_NORMALIZERS = frozenset({"NFC", "NFKC"})  # may merge code points into one
KEEPING_NORMALIZERS = COMPOSING_NORMALIZERS | {"NFD", "NFKD", "Lowercase", "Prepend"}
MAX_COMPOSED = 4  # code points one composed character can stand for (canonical maximum)
# Pre-tokenizers that split at every space and tokenize the pieces apart, with normalizers
# that work character by character: a text's tokens are at least its prefix's, cut at a space.
SPLITTING_PRE_TOKENIZERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit"})
PER_CHAR_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "StripAccents", "NFD", "NFKD"})
PREFIX_CHARS_PER_TOKEN = 8  # first prefix tried: context * this many characters
COUNT_BATCH = 32  # texts tokenized at once: a 2048-prompt list never holds every encoding
# Pre-tokenizers that work on each piece between added tokens alone, whatever came before
# (Metaspace is not one: its "first" scheme prepends only to the text's first piece).
PIECEWISE_PRE_TOKENIZERS = frozenset({"ByteLevel", "Split", "Digits", "Punctuation"})
PIECE_CACHE_CHARS = 4_000_000  # characters of rendered-prompt pieces whose counts are kept
UNKNOWN = (-1, 0)  # a piece whose count is not kept


def _raise(message: str) -> None:
    raise TemplateError(message)


def _engine_arg(args: Sequence[str], flag: str) -> str | None:
    for n, arg in enumerate(args):
        if arg == flag and n + 1 < len(args):
            return args[n + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def context_length(model_dir: Path, engine_args: Sequence[str]) -> int:
    """What vLLM will use as ``max_model_len``: the flag if given, else the model's own."""
    flag = _engine_arg(engine_args, "--max-model-len")
    if flag is not None:
        return int(flag)
    sentence = model_dir / "sentence_bert_config.json"
    if sentence.is_file():
        seq = json.loads(sentence.read_text()).get("max_seq_length")
        if isinstance(seq, int):
            return seq
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return DEFAULT_CONTEXT


def _parts(component: Any, key: str) -> list[dict[str, Any]]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [p for c in component.get(key, []) for p in _parts(c, key)]
    return [component]


def char_bound(tokenizer: tokenizers.Tokenizer, context: int) -> int | None:
    """The most characters a text can have and still fit ``context`` tokens, or None when
    this tokenizer gives no such bound.

    Sound for BPE that never drops input: byte-level (every byte of the text is in exactly
    one token) or byte-fallback, with pre-tokenizers and normalizers that keep every
    character. Then a token stands for at most as many characters as its longest vocabulary
    entry has (byte-level entries are one character per byte, and a character is at least
    one byte), special tokens included; a composing normalizer (NFC, NFKC) can fold up to
    ``MAX_COMPOSED`` code points into one character first. So a text longer than
    ``context * longest * fold`` characters has more than ``context`` tokens. WordPiece and
    Unigram give no bound: WordPiece turns a word of any length into one ``[UNK]``, and
    BERT's normalizer and pre-tokenizer drop whitespace and control characters.
    """
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    pre = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    if not (model.get("byte_fallback") or any(p.get("type") == "ByteLevel" for p in pre)):
        return None
    for part in pre:
        behaviour = str(part.get("behavior", "")).lower()
        if part.get("type") not in KEEPING_PRE_TOKENIZERS or behaviour == "removed":
            return None
    normalizers = _parts(spec.get("normalizer"), "normalizers")
    if any(n.get("type") not in KEEPING_NORMALIZERS for n in normalizers):
        return None
    fold = MAX_COMPOSED if any(n.get("type") in COMPOSING_NORMALIZERS for n in normalizers) else 1
    longest = max(len(t) for t in tokenizer.get_vocab(with_added_tokens=True))
    return context * longest * fold


def added_token_splitter(tokenizer: tokenizers.Tokenizer) -> re.Pattern[str] | None:
    """A pattern matching the tokenizer's added tokens (``<|im_start|>`` and the like) when a
    text's tokens are exactly the sum of its pieces' between them plus one per added token,
    or None when that does not hold.

    The tokenizers library cuts a text at its added tokens first (leftmost, longest), then
    normalizes, pre-tokenizes and encodes each piece apart. That makes counts add up when
    no normalizer runs (none can merge across a cut), every pre-tokenizer treats a piece the
    same wherever it sits, and no added token strips the whitespace beside it or matches
    only whole words.
    """
    spec = json.loads(tokenizer.to_str())
    if spec.get("normalizer") is not None:
        return None
    pre = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    if any(p.get("type") not in PIECEWISE_PRE_TOKENIZERS for p in pre):
        return None
    added = list(tokenizer.get_added_tokens_decoder().values())
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    contents = sorted({t.content for t in added if t.content}, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(c) for c in contents) + ")")


def splits_at_spaces(tokenizer: tokenizers.Tokenizer) -> bool:
    """Whether a text has at least as many tokens as any prefix of it cut at a space
    (BERT's WordPiece: words are tokenized one by one, the normalizer is per character)."""
    spec = json.loads(tokenizer.to_str())
    pre = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    normalizers = _parts(spec.get("normalizer"), "normalizers")
    return (
        len(pre) == 1
        and pre[0].get("type") in SPLITTING_PRE_TOKENIZERS
        and all(n.get("type") in PER_CHAR_NORMALIZERS for n in normalizers)
    )


class TokenCounter:
    """Counts prompt tokens for one model version; loaded once, then pure CPU work."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        context: int,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        calls_tools: bool = True,
    ) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.context = context
        self.max_chars = char_bound(tokenizer, context)  # None: no bound by length
        self.prefix_counts = self.max_chars is None and splits_at_spaces(tokenizer)
        # A chat prompt is counted piece by piece between its added tokens, each piece's
        # count kept (bounded by characters): a system prompt, the template's fixed text
        # and a conversation's earlier turns are tokenized once, not on every request.
        self._splitter = added_token_splitter(tokenizer)
        self._pieces: LRUCache[str, tuple[int, int]] = LRUCache(  # piece: (tokens, chars)
            PIECE_CACHE_CHARS, getsizeof=lambda entry: max(entry[1], 1)
        )
        self._pieces_lock = threading.Lock()  # large prompts are counted in threads
        self.special_tokens = special_tokens or {}
        self.calls_tools = calls_tools  # False: its engine calls no tools (tools refused)
        # as transformers renders chat templates (vLLM uses it): same options and filters
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        self._template = env.from_string(chat_template) if chat_template else None

    def __repr__(self) -> str:
        return f"TokenCounter(context={self.context}, chat={self._template is not None})"

    @classmethod
    def from_dir(
        cls,
        model_dir: Path,
        engine_args: Sequence[str] = (),
        chat_template: Path | None = None,
        calls_tools: bool = True,
    ) -> TokenCounter:
        """The counter of the weights in ``model_dir``; ``chat_template``: the template the
        engine is given instead of the model's own (``--chat-template``)."""
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise StoreError(f"{model_dir} has no tokenizer.json: cannot count tokens")
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = (
            json.loads(config_path.read_text()) if config_path.is_file() else {}
        )
        template_path = chat_template or model_dir / "chat_template.jinja"
        template = (
            template_path.read_text() if template_path.is_file() else config.get("chat_template")
        )
        special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        return cls(
            tokenizers.Tokenizer.from_file(str(path)),
            context=context_length(model_dir, engine_args),
            chat_template=template if isinstance(template, str) else None,
            special_tokens=special,
            calls_tools=calls_tools,
        )

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> str:
        if self._template is None:
            raise StoreError("this model has no chat template")
        return self._template.render(
            messages=[_flatten(m) for m in messages],
            tools=tools,
            add_generation_prompt=True,
            **self.special_tokens,
        )

    def count_chat(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> int:
        return self.count_rendered(self.render_chat(messages, tools))

    def count_rendered(self, text: str) -> int:
        """A rendered chat prompt (no special tokens added: the template has them)."""
        if self._splitter is None:
            return len(self.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0])
        parts = self._splitter.split(text)  # pieces at even places, added tokens at odd
        pieces = parts[::2]
        with self._pieces_lock:
            known = [self._pieces.get(piece, UNKNOWN)[0] for piece in pieces]
        missing = list(dict.fromkeys(p for p, n in zip(pieces, known, strict=True) if n < 0))
        counted: dict[str, int] = {}
        if missing:
            encoded = self.tokenizer.encode_batch_fast(missing, add_special_tokens=False)
            counted = {piece: len(e) for piece, e in zip(missing, encoded, strict=True)}
            with self._pieces_lock:
                for piece, count in counted.items():
                    if len(piece) <= PIECE_CACHE_CHARS:
                        self._pieces[piece] = (count, len(piece))
        total = len(parts) // 2  # one token per added token
        for piece, count in zip(pieces, known, strict=True):
            total += counted[piece] if count < 0 else count
        return total

    def count_text(self, text: str) -> int:
        return self.count_texts([text])[0]

    def count_texts(self, texts: list[str]) -> list[int]:
        """Each text's tokens; for a long text past the context, possibly only a count of
        more than ``context`` (a prefix's), found without tokenizing all of it."""
        window = self.context * PREFIX_CHARS_PER_TOKEN
        if self.prefix_counts and any(len(t) > window for t in texts):
            return [self._count_long(t) if len(t) > window else self._count(t) for t in texts]
        counts: list[int] = []
        for start in range(0, len(texts), COUNT_BATCH):  # bounded memory, whatever the list
            batch = texts[start : start + COUNT_BATCH]
            counts += [len(e) for e in self.tokenizer.encode_batch_fast(batch)]
        return counts

    def _count_long(self, text: str) -> int:
        """Prefixes cut at a space, doubling, until one has more tokens than the context
        (then the text has too) or the prefix is the text: at most twice the full work."""
        window = self.context * PREFIX_CHARS_PER_TOKEN
        while window < len(text):
            cut = text.rfind(" ", 0, window)
            if cut > 0:
                count = self._count(text[:cut])
                if count > self.context:
                    return count
            window *= 2
        return self._count(text)

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode_batch_fast([text])[0])


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: Jinja's own escapes HTML and sorts keys."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _arguments(raw: Any) -> Any:
    """A tool call's arguments as vLLM gives them to templates: a dict (a JSON string
    parsed; empty, malformed or not an object: ``{}``)."""
    if isinstance(raw, dict):
        return raw
    if not raw or not isinstance(raw, str):
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _with_dict_arguments(calls: list[Any]) -> list[Any]:
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            call = {
                **call,
                "function": {**function, "arguments": _arguments(function.get("arguments"))},
            }
        out.append(call)
    return out


def _flatten(message: dict[str, Any]) -> dict[str, Any]:
    """Text content parts joined as vLLM does for string-content chat templates; tool call
    arguments as dicts, as vLLM passes them."""
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and isinstance(calls, list):
        message = (
            {**message, "tool_calls": _with_dict_arguments(calls)}
            if calls
            else {k: v for k, v in message.items() if k != "tool_calls"}
        )
    content = message.get("content")
    if isinstance(content, list):
        texts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        ]
        return {**message, "content": "\n".join(texts)}
    if content is None:
        return {**message, "content": ""}
    return message
