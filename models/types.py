"""Plain value types shared across ``models``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["chat", "embed"]


@dataclass(frozen=True)
class ServedVersion:
    """A public model name resolved to the version that will serve the request."""

    model: str  # public name, e.g. "smollm2"
    version: str  # e.g. "135m-instruct"
    task: Task

    @property
    def key(self) -> str:
        return f"{self.model}@{self.version}"


@dataclass(frozen=True)
class ReplicaKey:
    model: str
    version: str
    index: int

    def __str__(self) -> str:
        return f"{self.model}@{self.version}#{self.index}"
