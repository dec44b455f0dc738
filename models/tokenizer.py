"""Token counts from the served model's own files, the way vLLM counts them.

Uses the model's ``tokenizer.json`` (the ``tokenizers`` library, no transformers import)
and its chat template rendered in a sandboxed Jinja environment, as transformers does.
A chat prompt is the rendered template tokenized without added special tokens; a
completion prompt is tokenized with them; both match vLLM's ``usage.prompt_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import StoreError

DEFAULT_CONTEXT = 2048


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


class TokenCounter:
    """Counts prompt tokens for one model version; loaded once, then pure CPU work."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        context: int,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.context = context
        self.special_tokens = special_tokens or {}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
        self._template = env.from_string(chat_template) if chat_template else None

    def __repr__(self) -> str:
        return f"TokenCounter(context={self.context}, chat={self._template is not None})"

    @classmethod
    def from_dir(cls, model_dir: Path, engine_args: Sequence[str] = ()) -> TokenCounter:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise StoreError(f"{model_dir} has no tokenizer.json: cannot count tokens")
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = (
            json.loads(config_path.read_text()) if config_path.is_file() else {}
        )
        template_path = model_dir / "chat_template.jinja"
        template = (
            template_path.read_text() if template_path.is_file() else config.get("chat_template")
        )
        special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        return cls(
            tokenizers.Tokenizer.from_file(str(path)),
            context=context_length(model_dir, engine_args),
            chat_template=template if isinstance(template, str) else None,
            special_tokens=special,
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
        text = self.render_chat(messages, tools)
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def count_texts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]


def _flatten(message: dict[str, Any]) -> dict[str, Any]:
    """Text content parts joined as vLLM does for string-content chat templates."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        ]
        return {**message, "content": "\n".join(texts)}
    if content is None:
        return {**message, "content": ""}
    return message
