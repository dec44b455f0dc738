"""Plain value types shared across ``models``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["chat", "embed"]


@dataclass(frozen=True, slots=True)
class VersionKey:
    """One version of one model: the key of every per-version table.

    ``str`` gives ``model@version``, the form that JSON, logs and metric labels show.
    """

    model: str
    version: str

    def __str__(self) -> str:
        return f"{self.model}@{self.version}"


@dataclass(frozen=True)
class ServedVersion:
    """A public model name resolved to the version that will serve the request."""

    model: str  # public name, e.g. "smollm2"
    version: str  # e.g. "135m-instruct"
    task: Task

    @property
    def key(self) -> VersionKey:
        return VersionKey(self.model, self.version)


@dataclass(frozen=True)
class ReplicaKey:
    model: str
    version: str
    index: int

    @property
    def version_key(self) -> VersionKey:
        return VersionKey(self.model, self.version)

    def __str__(self) -> str:
        return f"{self.model}@{self.version}#{self.index}"
