"""Plain value types shared across ``models``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

Task = Literal["chat", "embed"]
ADAPTER = ":"  # MODEL:ADAPTER, and VERSION:ADAPTER in a pin (models/adapters)


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
    """A public model name resolved to the version that will serve the request.

    A LoRA adapter is served as a version of its base model: ``smollm2:pirate`` resolves
    to version ``135m-instruct:pirate`` (its own name in headers, metrics and the cache
    key), running on the base version's engines (``engine``) under the adapter's name.
    """

    model: str  # public name, e.g. "smollm2"
    version: str  # e.g. "135m-instruct"; an adapter's: "135m-instruct:pirate"
    task: Task
    adapter: str | None = None  # the adapter's name (what the engine serves it as)
    key: VersionKey = field(init=False, compare=False, repr=False)  # made once
    engine: VersionKey = field(init=False, compare=False, repr=False)  # whose replicas serve it

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", VersionKey(self.model, self.version))
        base = self.version.partition(ADAPTER)[0] if self.adapter else self.version
        object.__setattr__(self, "engine", VersionKey(self.model, base))

    @property
    def public(self) -> str:
        """The name keys, limits and budgets know it by: ``smollm2`` or ``smollm2:pirate``."""
        return f"{self.model}{ADAPTER}{self.adapter}" if self.adapter else self.model


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
