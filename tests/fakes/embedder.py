"""A deterministic embedder for retrieval tests: the same text always gives the same vector."""

from __future__ import annotations

import hashlib

import numpy as np

DIM = 384


def vector(text: str, dim: int = DIM) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    values = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return [float(v) for v in (values / np.linalg.norm(values)).astype(np.float32)]


async def embed(texts: list[str]) -> list[list[float]]:
    return [vector(t) for t in texts]


def split(text: str) -> list[str]:
    """One chunk per paragraph (the real splitter counts tokens)."""
    return [p for p in text.split("\n\n") if p.strip()]
