"""A FAISS index for one collection: inner product on normalised vectors, ids mapped.

``flat`` (exact) is the default; ``ivf`` and ``hnsw`` are for large collections. FAISS
ids are our chunk ids (flat and HNSW through an id map, IVF natively). HNSW cannot remove
vectors: removed ids stay as tombstones, filtered out of results (and saved with the
snapshot). An IVF index
trains on the vectors it is built with; until there are enough, it searches exactly.

On a host with CUDA and faiss-gpu, searches run on a GPU copy of the index (refreshed
after writes); the CPU index is always the one saved. The same code runs everywhere:
``gpu_mirror`` is the identity without a GPU.

Snapshots are FAISS's own binary format with a JSON trailer (never a pickle), written to a
temporary file and renamed into place, so a crash leaves the old snapshot or the new.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval import exact

Kind = Literal["flat", "ivf", "hnsw"]
SNAPSHOT = "index.snapshot"


class _LazyFaiss:
    """``faiss`` imported on first use: a gateway with retrieval off never needs it (the
    CPU gateway image has no faiss; engines' hosts have faiss-cpu or faiss-gpu)."""

    def __getattr__(self, name: str) -> Any:
        try:
            module = importlib.import_module("faiss")
        except ImportError as exc:
            raise ImportError(
                "retrieval needs faiss: install faiss-cpu (or faiss-gpu on CUDA hosts)"
            ) from exc
        return getattr(module, name)


faiss: Any = _LazyFaiss()


@dataclass(frozen=True)
class IndexParams:
    kind: Kind = "flat"
    ivf_nlist: int = 256
    ivf_nprobe: int = 16
    hnsw_m: int = 32
    hnsw_ef_search: int = 384  # recall@10 >= 0.95 on clustered 384-d data (see the test)
    hnsw_ef_construction: int = 80


def normalise(vectors: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


class Gpus:
    """The host's GPUs as FAISS sees them (``faiss.get_num_gpus()``; none without
    faiss-gpu), one ``StandardGpuResources`` per device made on first use and kept (they
    hold the device's scratch memory), and devices handed out in turn, so the indexes
    (a worker's shards) spread over them."""

    def __init__(self) -> None:
        self._resources: dict[int, Any] = {}
        self._turn = 0
        self._lock = threading.Lock()
        self.unsupported: set[str] = set()  # index types FAISS would not clone to a GPU

    def count(self) -> int:
        if not hasattr(faiss, "StandardGpuResources"):
            return 0  # faiss-cpu
        return int(faiss.get_num_gpus())

    def mirror(self, index: Any) -> Any:
        """A GPU copy of ``index`` on a CUDA host with faiss-gpu; the index itself
        otherwise, and for an index FAISS has no GPU version of (HNSW)."""
        count = self.count()
        if count == 0:
            return index
        with self._lock:
            device = self._turn % count
            self._turn += 1
            resources = self._resources.get(device)
            if resources is None:
                resources = self._resources[device] = faiss.StandardGpuResources()
        try:
            return faiss.index_cpu_to_gpu(resources, device, index)
        except RuntimeError:  # FAISS: "not implemented for this type of index"
            self.unsupported.add(type(index).__name__)
            return index


GPUS = Gpus()


def gpu_mirror(index: Any) -> Any:
    return GPUS.mirror(index)


@dataclass
class VectorIndex:
    dim: int
    params: IndexParams = field(default_factory=IndexParams)
    seq: int = 0  # the last docstore op this index contains
    tombstones: set[int] = field(default_factory=set)
    _index: Any = None
    _trained: bool = False
    _search_copy: Any = None
    created: float = 0.0  # the collection's incarnation (its creation time in the docstore)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        if self._index is None:
            self._index = self._empty()

    def _empty(self) -> Any:
        kind = self.params.kind
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params.hnsw_ef_construction
            inner.hnsw.efSearch = self.params.hnsw_ef_search
            self._trained = True
            return faiss.IndexIDMap2(inner)
        self._trained = kind == "flat"
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def size(self) -> int:
        return int(self._index.ntotal) - len(self.tombstones)

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        if not ids:
            return
        with self._lock:
            self._index.add_with_ids(normalise(vectors), np.asarray(ids, dtype=np.int64))
            self._search_copy = None
            if not self._trained and self._index.ntotal >= self.params.ivf_nlist * 39:
                self._train_ivf()

    def remove(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            if self.params.kind == "hnsw":
                self.tombstones.update(ids)
            else:
                self._index.remove_ids(np.asarray(ids, dtype=np.int64))
            self._search_copy = None

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids, best first; id -1 where there are fewer than ``k``."""
        with self._lock:
            if self._search_copy is None:
                self._search_copy = gpu_mirror(self._index)
            queries = normalise(vectors)
            flat = self._flat_on_cpu()
            if flat is not None:
                return exact.top_k(queries, *flat, k)
            extra = min(len(self.tombstones), 4 * k)
            scores, ids = self._search_copy.search(queries, k + extra)
            if self.tombstones:
                return _without(scores, ids, self.tombstones, k)
            return scores, ids

    def _flat_on_cpu(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The stored vectors and their ids (views into FAISS's arrays, valid while the
        lock is held) of a flat index searched on the CPU, which ``exact`` scores faster
        than the faiss-cpu wheel; None for a GPU copy, IVF and HNSW."""
        if self._search_copy is not self._index or not isinstance(self._index, faiss.IndexIDMap2):
            return None
        inner = faiss.downcast_index(self._index.index)
        if not isinstance(inner, faiss.IndexFlatIP):
            return None
        count = int(inner.ntotal)
        if count == 0:
            return np.empty((0, self.dim), np.float32), np.empty(0, np.int64)
        stored = faiss.rev_swig_ptr(inner.get_xb(), count * self.dim).reshape(count, self.dim)
        return stored, faiss.rev_swig_ptr(self._index.id_map.data(), count)

    def _train_ivf(self) -> None:
        """Rebuild as IVF, trained on everything held now (exact search until then)."""
        flat = faiss.downcast_index(self._index.index)
        vectors = flat.reconstruct_n(0, flat.ntotal)
        ids = faiss.vector_to_array(self._index.id_map).copy()
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(
            quantizer, self.dim, self.params.ivf_nlist, faiss.METRIC_INNER_PRODUCT
        )
        ivf.train(vectors)
        ivf.nprobe = self.params.ivf_nprobe
        # IVF keeps our ids itself (an id map over it would lose them on removal)
        ivf.add_with_ids(vectors, ids)
        self._index, self._trained = ivf, True

    def save(self, directory: Path) -> None:
        """An atomic snapshot in one file: FAISS's index, then a JSON trailer naming the op
        it reached (and its length, in the last 8 bytes), renamed into place. Processes
        sharing ``directory`` may each save: a reader sees one whole snapshot or another."""
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            tmp = directory / f".snapshot-{os.getpid()}-{threading.get_ident()}.tmp"
            faiss.write_index(self._index, str(tmp))
            meta = json.dumps({"seq": self.seq, "dim": self.dim, "kind": self.params.kind,
                               "trained": self._trained, "created": self.created,
                               "tombstones": sorted(self.tombstones)}).encode()  # fmt: skip
            with tmp.open("ab") as out:
                out.write(meta)
                out.write(len(meta).to_bytes(8, "little"))
            _fsync(tmp)
            os.replace(tmp, directory / SNAPSHOT)
            _fsync_dir(directory)

    @classmethod
    def load(cls, directory: Path, params: IndexParams, created: float = 0.0) -> VectorIndex | None:
        """The saved snapshot, or None if there is none, or it does not match (another
        index kind, or another incarnation of a collection by that name)."""
        path = directory / SNAPSHOT
        try:
            with path.open("rb") as file:
                file.seek(-8, os.SEEK_END)
                length = int.from_bytes(file.read(8), "little")
                file.seek(-8 - length, os.SEEK_END)
                meta = json.loads(file.read(length))
        except (OSError, ValueError):
            return None  # none, or torn: rebuild from the docstore
        if meta.get("kind") != params.kind or meta.get("created") != created:
            return None  # configuration changed, or the collection was made anew
        index = faiss.read_index(str(path))
        made = cls(int(meta["dim"]), params, int(meta["seq"]), set(meta["tombstones"]), index)
        made.created = created
        made._trained = bool(meta["trained"])
        if params.kind == "ivf" and made._trained:
            faiss.extract_index_ivf(index).nprobe = params.ivf_nprobe
        return made


def _without(
    scores: np.ndarray, ids: np.ndarray, dropped: set[int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    for row in range(len(ids)):
        kept = [(s, i) for s, i in zip(scores[row], ids[row], strict=True) if i not in dropped]
        for col, (s, i) in enumerate(kept[:k]):
            out_scores[row, col], out_ids[row, col] = s, i
    return out_scores, out_ids


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)
