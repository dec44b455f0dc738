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
    A model whose versions are adapters (``support-bot@v2``: ``base`` and ``adapter`` in
    its configuration) runs on its ``base`` the same way, with a version's rollouts.
    """

    model: str  # public name, e.g. "smollm2"
    version: str  # e.g. "135m-instruct"; an adapter's: "135m-instruct:pirate"
    task: Task
    adapter: str | None = None  # the adapter's name (what the engine serves it as)
    base: VersionKey | None = None  # an alias's version on an adapter (or a base): its base
    key: VersionKey = field(init=False, compare=False, repr=False)  # made once
    engine: VersionKey = field(init=False, compare=False, repr=False)  # whose replicas serve it

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", VersionKey(self.model, self.version))
        own = self.version.partition(ADAPTER)[0] if self.adapter else self.version
        object.__setattr__(self, "engine", self.base or VersionKey(self.model, own))

    @property
    def public(self) -> str:
        """The name keys, limits and budgets know it by: ``smollm2``, ``smollm2:pirate``, or
        an alias's own name (``support-bot``)."""
        if self.adapter and self.base is None:
            return f"{self.model}{ADAPTER}{self.adapter}"
        return self.model


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
