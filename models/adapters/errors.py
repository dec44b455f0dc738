"""Errors about LoRA adapters. The tree (under ``models.errors``)::

StoreError
├── AdapterRefused      ``weir adapters add``: the adapter would not load (every reason)
└── AdapterNotInStore   an adapter name the store does not hold
EngineUnavailable
└── AdapterLoadFailed   an engine would not load an adapter (503, with its reason)
"""

from __future__ import annotations

from models.errors import EngineUnavailable, StoreError


class AdapterRefused(StoreError):
    def __init__(self, name: str, problems: list[str]) -> None:
        super().__init__(f"Adapter '{name}' refused: " + "; ".join(problems))
        self.name = name
        self.problems = problems


class AdapterNotInStore(StoreError):
    def __init__(self, name: str, root: str) -> None:
        super().__init__(
            f"Adapter '{name}' is not in the store at {root}."
            f" Add it: weir adapters add {name} --base MODEL --path DIR"
        )
        self.name = name


class AdapterLoadFailed(EngineUnavailable):
    """An engine refused or failed to load an adapter; the others keep serving."""
