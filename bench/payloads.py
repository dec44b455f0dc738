"""Seeded request payloads: fixed, uniform, a ShareGPT-like mix, and cache-heavy.

Every generator is deterministic for a seed, so two runs (or two model versions) see
the same sequence of prompts. Lengths are in words of a common-English vocabulary,
about one SmolLM2 token each; the servers' ``usage`` gives the exact counts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
SHAREGPT_MIX = DATA / "sharegpt_mix.jsonl"
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "over",
    "new",
    "sound",
    "take",
    "only",
    "little",
    "work",
    "know",
    "place",
    "year",
    "live",
    "me",
    "back",
    "give",
    "most",
    "very",
    "after",
    "thing",
    "our",
    "just",
    "name",
    "good",
    "sentence",
    "man",
    "think",
    "say",
    "great",
    "where",
    "help",
    "through",
    "much",
    "before",
    "line",
    "right",
    "too",
    "mean",
    "old",
    "any",
    "same",
    "tell",
    "boy",
    "follow",
    "came",
    "want",
    "show",
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@dataclass(frozen=True)
class Payload:
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float = 0.7

    def chat_body(self, model: str, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "ignore_eos": True,  # vLLM: generate exactly max_tokens, so runs compare
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    @property
    def prompt_text(self) -> str:
        return str(self.messages[-1]["content"])


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, count)))


def _chat(
    rng: random.Random, prompt_words: int, output_tokens: int, temperature: float = 0.7
) -> Payload:
    user = {"role": "user", "content": words(rng, prompt_words)}
    return Payload([SYSTEM, user], max(1, output_tokens), temperature)


def fixed(seed: int, prompt_words: int = 128, output_tokens: int = 64) -> Iterator[Payload]:
    rng = random.Random(seed)
    while True:
        yield _chat(rng, prompt_words, output_tokens)


def uniform(
    seed: int, prompt_range: tuple[int, int] = (16, 512), output_range: tuple[int, int] = (16, 256)
) -> Iterator[Payload]:
    rng = random.Random(seed)
    while True:
        yield _chat(rng, rng.randint(*prompt_range), rng.randint(*output_range))


def sharegpt(seed: int, path: Path = SHAREGPT_MIX) -> Iterator[Payload]:
    """Conversation shapes from the shipped mix (lengths of real-chat-like requests)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for index in order:
            row = rows[index]
            yield _chat(rng, int(row["prompt_words"]), int(row["output_tokens"]))


def cache_heavy(seed: int, distinct: int = 8, output_tokens: int = 32) -> Iterator[Payload]:
    """A few prompts repeated at temperature 0: what a response cache should absorb."""
    rng = random.Random(seed)
    pool = [
        _chat(rng, rng.randint(16, 128), output_tokens, temperature=0.0) for _ in range(distinct)
    ]
    while True:
        yield rng.choice(pool)


GENERATORS: dict[str, Callable[[int], Iterator[Payload]]] = {
    "fixed": fixed,
    "uniform": uniform,
    "sharegpt": sharegpt,
    "cache": cache_heavy,
}


def make(name: str, seed: int) -> Iterator[Payload]:
    try:
        return GENERATORS[name](seed)
    except KeyError:
        raise SystemExit(f"unknown payload mix {name!r}; known: {sorted(GENERATORS)}") from None
