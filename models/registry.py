"""The registry: public names, aliases and pinned versions, resolved to a served version.

``smollm2`` is an alias for the model's current version (or its split);
``smollm2@135m-instruct`` pins a version. A LoRA adapter served on a version is
``smollm2:pirate`` (on the alias's version, or the running one that serves it) or pinned,
``smollm2@135m-instruct:pirate``; which adapters a version serves is set at runtime
(``serve_adapter``) by ``serving.adapters``. A version is *running* when its engines are
up; a pin to a stopped one is refused. Deploys change a model's configuration and its
running versions at runtime with ``update``. The registry knows names only: which
replicas serve a version is the fleet's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from models.config import ModelConfig
from models.errors import ConfigError, ModelNotFound, VersionNotRunning
from models.types import ADAPTER, ServedVersion, VersionKey

PIN = "@"


def split_name(name: str) -> tuple[str, str]:
    """``smollm2@v1`` to ``("smollm2", "v1")``; an unpinned name has version ``""``."""
    base, _, pinned = name.partition(PIN)
    return base, pinned


def parse_name(name: str) -> tuple[str, str, str]:
    """``MODEL[:ADAPTER][@VERSION[:ADAPTER]]`` to ``(model, version, adapter)``, each
    ``""`` when not given; ``ModelNotFound`` for an adapter named twice."""
    base, pinned = split_name(name)
    model, _, adapter = base.partition(ADAPTER)
    version, _, pinned_adapter = pinned.partition(ADAPTER)
    if adapter and pinned_adapter:
        raise ModelNotFound(name)
    return model, version, adapter or pinned_adapter


def public_name(name: str) -> str:
    """What a key's model list and the model budgets name: ``smollm2`` for ``smollm2`` and
    ``smollm2@v1``; ``smollm2:pirate`` for the adapter, pinned or not."""
    try:
        model, _, adapter = parse_name(name)
    except ModelNotFound:
        return name
    return f"{model}{ADAPTER}{adapter}" if adapter else model


class Registry:
    def __init__(self, models: Iterable[ModelConfig]) -> None:
        self._models: dict[str, ModelConfig] = {}
        for model in models:
            if model.name in self._models:
                raise ConfigError(f"model '{model.name}' is configured twice")
            self._models[model.name] = model
        self._running = {m.name: set(m.running()) for m in self._models.values()}
        self._adapters: dict[VersionKey, set[str]] = {}  # base version -> adapters it serves
        self._via: dict[VersionKey, tuple[VersionKey, str | None]] = {}  # alias -> base, adapter
        for model in self._models.values():
            self._route_via(model)
        self._wrr: dict[str, dict[str, float]] = {}
        self._fallbacks = {
            m.name: [self._fallback(m, f) for f in m.fallbacks] for m in self._models.values()
        }

    def _fallback(self, model: ModelConfig, name: str) -> ServedVersion:
        try:
            target = self.resolve(name)
        except ModelNotFound:
            raise ConfigError(f"model '{model.name}': fallback '{name}' is not served") from None
        if target.task != model.task:
            raise ConfigError(
                f"model '{model.name}': fallback '{name}' is not a {model.task} model"
            )
        if target.model == model.name and target.version == model.current:
            raise ConfigError(f"model '{model.name}': falls back to itself")
        return target

    def __repr__(self) -> str:
        return f"Registry(models={list(self._models)!r})"

    def model(self, name: str) -> ModelConfig | None:
        return self._models.get(name)

    def running(self, name: str) -> list[str]:
        """The model's versions whose engines are up (in configuration order)."""
        model = self._models[name]
        return [v.version for v in model.versions if v.version in self._running[name]]

    def update(self, model: ModelConfig, running: set[str]) -> None:
        """Replace a model's configuration (split, current, versions) and running set.

        Every version the new split or current names must be running. Requests already
        resolved keep their version; new ones follow the new split at once.
        """
        if model.name not in self._models:
            raise ConfigError(f"model '{model.name}' is not served")
        known = {v.version for v in model.versions}
        missing = ({model.current, *model.shares()} - running) | (running - known)
        if missing:
            raise ConfigError(f"model '{model.name}': versions {sorted(missing)} not running")
        self._models[model.name] = model
        self._running[model.name] = set(running)
        self._wrr.pop(model.name, None)
        self._route_via(model)

    def _route_via(self, model: ModelConfig) -> None:
        """Where each of the model's versions with a ``base`` runs, and as which adapter."""
        for version in model.versions:
            if version.base is not None:
                base, pinned = split_name(version.base)
                self._via[VersionKey(model.name, version.version)] = (
                    VersionKey(base, pinned),
                    version.adapter,
                )

    @property
    def models(self) -> list[ModelConfig]:
        return list(self._models.values())

    def resolve(self, name: str, *, sticky: str | None = None) -> ServedVersion:
        """``name`` or ``name@version`` to the version that serves it; ``ModelNotFound``.

        An alias follows the model's split: ``sticky`` (a key id or a conversation hash)
        always lands on the same version for the same split; without it, smooth weighted
        round robin gives each version exactly its share over any run of requests.
        """
        base, pinned, adapter = parse_name(name)
        model = self._models.get(base)
        if model is None:
            raise ModelNotFound(name)
        version = pinned or self._pick(model, sticky)
        if adapter and not pinned and adapter not in self._served(base, version):
            serving = [v for v in self.running(base) if adapter in self._served(base, v)]
            version = serving[0] if serving else version
        if version not in self._running[base]:
            if all(v.version != version for v in model.versions):
                raise ModelNotFound(name)
            raise VersionNotRunning(name, self.running(base))
        if not adapter:
            via = self._via.get(VersionKey(base, version))
            if via is not None:  # an alias's version: an adapter (or the model) on its base
                return ServedVersion(model=model.name, version=version, task=model.task,
                                     adapter=via[1], base=via[0])  # fmt: skip
            return ServedVersion(model=model.name, version=version, task=model.task)
        if adapter not in self._served(base, version):
            raise ModelNotFound(name)
        qualified = f"{version}{ADAPTER}{adapter}"
        return ServedVersion(model=model.name, version=qualified, task=model.task, adapter=adapter)

    def _served(self, model: str, version: str) -> set[str]:
        return self._adapters.get(VersionKey(model, version), set())

    def serve_adapter(self, base: VersionKey, adapter: str) -> None:
        """Requests for ``MODEL:ADAPTER`` may now resolve to ``base`` (its engines hold it)."""
        self._adapters.setdefault(base, set()).add(adapter)

    def drop_adapter(self, base: VersionKey, adapter: str) -> None:
        """New requests for the adapter on ``base`` are refused (404) from now on."""
        self._adapters.get(base, set()).discard(adapter)

    def adapters(self) -> dict[VersionKey, list[str]]:
        """Each base version's served adapters, sorted (``/v1/models`` lists them)."""
        return {key: sorted(names) for key, names in self._adapters.items() if names}

    def _pick(self, model: ModelConfig, sticky: str | None) -> str:
        shares = model.shares()
        if len(shares) == 1:
            return next(iter(shares))
        if sticky is not None:
            digest = hashlib.sha256(f"{model.name}\x00{sticky}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
            total = 0.0
            for version, share in sorted(shares.items()):
                total += share
                if point < total:
                    return version
            return sorted(shares)[-1]
        # smooth weighted round robin (nginx): exact proportions, well interleaved
        current = self._wrr.setdefault(model.name, dict.fromkeys(shares, 0.0))
        for version, share in shares.items():
            current[version] = current.get(version, 0.0) + share
        chosen = max(current, key=lambda v: current[v])
        current[chosen] -= 1.0
        return chosen

    def fallbacks(self, model: str) -> list[ServedVersion]:
        """The versions to try, in order, when ``model``'s own cannot take a request."""
        return self._fallbacks.get(model, [])

    def served_versions(self) -> list[ServedVersion]:
        return [
            ServedVersion(model=m.name, version=v, task=m.task)
            for m in self._models.values()
            for v in self.running(m.name)
        ]
