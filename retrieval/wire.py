"""A query vector between a gateway and an index worker: base64 of its float32 bytes."""

from __future__ import annotations

import base64

import numpy as np


def encode(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()


def decode(text: str, dim: int) -> np.ndarray:
    """The vector of ``dim`` float32; ValueError (binascii.Error is one) if it is not."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != dim * 4:
        raise ValueError(f"a vector of {dim} float32 is {dim * 4} bytes, not {len(raw)}")
    return np.frombuffer(raw, dtype=np.float32)
