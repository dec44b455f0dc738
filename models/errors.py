"""Errors raised by the ``models`` package.

The tree::

    WeirModelError
    ├── ConfigError             the registry config is inconsistent
    ├── ModelNotFound           no model or version by that public name
    │   └── VersionNotRunning   the version exists but its engines are stopped
    ├── StoreError
    │   ├── UnknownSource       ``weir models pull`` has no recipe for that name
    │   ├── ModelNotInStore     the registry names weights that were never pulled
    │   └── VerificationFailed  a weight file's size or sha256 differs from the manifest
    └── EngineError             an engine replica failed to serve a request
        ├── EngineUnavailable   no healthy replica, or the connection was refused
        ├── EngineOverloaded    the engine said it is at capacity (HTTP 503)
        ├── EngineTimeout       no answer (or no next chunk) in time
        ├── EngineRejected      the engine refused the request (HTTP 4xx): the client's fault
        └── EngineFailed        the engine broke (HTTP 5xx, a bad body, a lost stream)

Every third-party exception met while talking to an engine is translated into one of
these in ``engine_client``; ``serving.errors`` maps them to HTTP in one table.
"""

from __future__ import annotations


class WeirModelError(Exception):
    """Base of every error raised by ``models``."""


class ConfigError(WeirModelError):
    """The model registry configuration is inconsistent."""


class ModelNotFound(WeirModelError):
    def __init__(self, name: str) -> None:
        super().__init__(f"The model '{name}' does not exist.")
        self.name = name
        self.param = "model"


class VersionNotRunning(ModelNotFound):
    def __init__(self, name: str, running: list[str]) -> None:
        super().__init__(name)
        self.args = (f"The model '{name}' is not running; running versions: {', '.join(running)}.",)


class StoreError(WeirModelError):
    """Something is wrong with the local model store."""


class UnknownSource(StoreError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"No pull recipe for '{name}'. Known: {', '.join(sorted(known))}.")
        self.name = name


class ModelNotInStore(StoreError):
    def __init__(self, entry: str, store: str) -> None:
        super().__init__(
            f"Model '{entry}' is not in the store at {store}. Run: weir models pull {entry}"
        )
        self.entry = entry


class VerificationFailed(StoreError):
    def __init__(self, entry: str, problems: list[str]) -> None:
        super().__init__(f"Model '{entry}' failed verification: " + "; ".join(problems))
        self.entry = entry
        self.problems = problems


class EngineError(WeirModelError):
    """An engine replica could not serve the request."""

    def __init__(self, message: str, *, engine: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.engine = engine


class EngineUnavailable(EngineError):
    pass


class EngineOverloaded(EngineError):
    pass


class EngineTimeout(EngineError):
    pass


class EngineFailed(EngineError):
    pass


class EngineRejected(EngineError):
    """The engine answered 4xx: the request itself is at fault."""

    def __init__(
        self, message: str, *, status: int, param: str | None = None, engine: str = ""
    ) -> None:
        super().__init__(message, engine=engine)
        self.status = status
        self.param = param
