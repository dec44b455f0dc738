"""The adapter store: checked, copied and hashed LoRA adapters, beside the weights.

Layout: ``<models store>/adapters/<name>/`` holds ``adapter_config.json``,
``adapter_model.safetensors`` and ``weir-manifest.json`` (the sizes and sha256 of the
files, as for weights, and in ``source`` the base the adapter was checked against:
model, version, rank, target modules). An adapter is added only when ``check.problems``
finds nothing against its base version's weights and ``--max-lora-rank``; the copy is
built in a ``.partial-`` directory and renamed into place, then verified against the
source's hashes. What a base version serves is read from here, so an adapter added
while the gateway runs is served again after a restart.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models.adapters import check
from models.adapters.errors import AdapterNotInStore, AdapterRefused
from models.store import MANIFEST, Manifest, ModelStore, record_directory

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")  # no ':' or '@': they join public names
FILES = (check.CONFIG, check.WEIGHTS)
MAX_BYTES = 2 << 30  # an adapter this large is not an adapter


@dataclass(frozen=True)
class Base:
    """The base version an adapter is checked against, and served on."""

    model: str
    version: str
    weights: Path
    max_rank: int  # the base engine's --max-lora-rank


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    path: Path
    base_model: str
    base_version: str
    rank: int
    targets: tuple[str, ...]
    bytes: int

    @classmethod
    def of(cls, path: Path, manifest: Manifest) -> StoredAdapter:
        source = manifest.source
        return cls(
            name=manifest.name,
            path=path,
            base_model=source.get("base_model", ""),
            base_version=source.get("base_version", ""),
            rank=int(source.get("rank", "0")),
            targets=tuple(t for t in source.get("targets", "").split(",") if t),
            bytes=manifest.total_bytes,
        )


class AdapterStore:
    def __init__(self, models_root: Path) -> None:
        self.root = models_root.expanduser() / "adapters"
        self._files = ModelStore(self.root)  # manifest, verify, swap-in: as for weights

    def __repr__(self) -> str:
        return f"AdapterStore(root={str(self.root)!r})"

    def has(self, name: str) -> bool:
        return self._files.has(name)

    def get(self, name: str) -> StoredAdapter:
        if not NAME.match(name) or not self.has(name):
            raise AdapterNotInStore(name, str(self.root))
        return StoredAdapter.of(self._files.entry_dir(name), self._files.manifest(name))

    def entries(self) -> list[StoredAdapter]:
        return [StoredAdapter.of(self._files.entry_dir(m.name), m) for m in self._files.entries()]

    def of_base(self, model: str, version: str) -> list[StoredAdapter]:
        return [a for a in self.entries() if (a.base_model, a.base_version) == (model, version)]

    def verify(self, name: str) -> StoredAdapter:
        """Sizes and sha256 against the manifest; ``VerificationFailed``."""
        self.get(name)
        self._files.verify(name)
        return self.get(name)

    def add(self, name: str, directory: Path, base: Base) -> StoredAdapter:
        """Check ``directory`` against ``base``; copy, hash and verify it in; ``AdapterRefused``
        with every reason (nothing is written then)."""
        found: list[str] = []
        if not NAME.match(name):
            found.append(f"name '{name}' must match {NAME.pattern}")
        elif self.has(name):
            found.append(f"the store has an adapter '{name}' already (remove it first)")
        problems, info = check.problems(directory, base.weights, base.max_rank)
        found += problems
        size = sum(p.stat().st_size for p in (directory / f for f in FILES) if p.is_file())
        if size > MAX_BYTES:
            found.append(f"{size} bytes is over the {MAX_BYTES} an adapter may have")
        if found or info is None:
            raise AdapterRefused(name, found)
        self.root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".partial-{name}-", dir=self.root))
        try:
            for file in FILES:
                shutil.copyfile(directory / file, partial / file)
            source = {
                "kind": "lora",
                "path": str(directory),
                "base_model": base.model,
                "base_version": base.version,
                "rank": str(info.rank),
                "alpha": f"{info.alpha:g}",
                "targets": ",".join(info.targets),
                "peft_base": info.base_name,
            }
            manifest = record_directory(partial, name, source)
            originals = record_directory(directory, name, source)
            copied = {f.path: f.sha256 for f in manifest.files}
            if any(copied.get(f.path) != f.sha256 for f in originals.files if f.path in FILES):
                raise AdapterRefused(
                    name, ["the copy differs from the source (changed meanwhile?)"]
                )
            (partial / MANIFEST).write_text(manifest.to_json())
            partial.chmod(0o755)
            self._files._swap_in(partial, name)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return self.verify(name)

    def remove(self, name: str) -> StoredAdapter:
        adapter = self.get(name)
        gone = adapter.path.with_name(f".partial-{name}-removed")
        adapter.path.rename(gone)  # out of sight at once, then deleted
        shutil.rmtree(gone, ignore_errors=True)
        return adapter
