"""Plain value types shared across ``models``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

Task = Literal["chat", "embed"]


class VersionKey(NamedTuple):
    """One version of one model: the key of every per-version table.

    ``str`` gives ``model@version``, the form that JSON, logs and metric labels show. A
    named tuple, not a dataclass: it is hashed several times per request, and a tuple's
    hash and equality run in C.
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
    key: VersionKey = field(init=False, compare=False, repr=False)  # made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", VersionKey(self.model, self.version))


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
