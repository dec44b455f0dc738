"""Retrieval: FAISS search speed against the memory-bandwidth bound, and the search endpoint.

1. On ``--vectors`` synthetic 384-d vectors (clustered, seeded): the machine's memory
   bandwidth (a large array copy), flat search QPS one query at a time next to the bound
   ``bandwidth / (N x d x 4 bytes)``, and IVF and HNSW at the smallest ``nprobe`` /
   ``efSearch`` that reaches recall@10 >= 0.95 against exact search: build time, index
   size, QPS.
2. Concurrent searches (``--clients`` 32) on the same flat index: one by one (each
   search takes the index in turn, as before batching) and batched
   (``retrieval.batcher.SearchBatcher``, as the service runs them), in one run, next to
   the single-query bound; every batched answer is checked against its one-by-one twin.
3. End to end: a mock engine that embeds (``bench.mock_engine``) and ``weir serve`` in
   front of it; ``--docs`` documents ingested through the API; ``POST
   /v1/collections/c/search`` p50/p99 next to a raw ``index.search`` on the same vectors,
   in the same run.

It uses Weir's index class for part 1 (what is measured is FAISS through it); part 2 is
black-box HTTP.

    python -m bench.retrieval_bench [--vectors 200000] [--docs 5000] [--clients 32]
        [--parts faiss,batched,endpoint]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench.config_builder import model, weir_toml
from bench.mock_engine import mock_vector
from bench.procs import free_port, start, start_gateway, stop_all, wait_for
from retrieval.batcher import SearchBatcher
from retrieval.index import GPUS, IndexParams, VectorIndex, normalise

DIM = 384


def config(port: int, mock: int, path: Path) -> str:
    return weir_toml(
        gateway={"port": port},
        retrieval={"path": path, "embedding_model": "mock-embed"},
        models=[model("mock-embed", "v", task="embed", url=f"http://127.0.0.1:{mock}")],
    )


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, DIM)).astype(np.float32)
    labels = rng.integers(0, 1000, n)
    return normalise(centres[labels] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32))


def bandwidth_gbs() -> float:
    data = np.ones(256 * 2**20 // 4, dtype=np.float32)  # 256 MiB
    out = np.empty_like(data)
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        np.copyto(out, data)
        elapsed = time.perf_counter() - started
        best = max(best, 2 * data.nbytes / elapsed / 1e9)  # read + write
    return best


def qps(index: Any, queries: np.ndarray) -> float:
    started = time.perf_counter()
    for row in queries:
        index.search(row.reshape(1, -1), 10)
    return len(queries) / (time.perf_counter() - started)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def part_one(n: int) -> dict[str, Any]:
    data = clustered(n, 1)
    queries = clustered(200, 2)
    ids = list(range(n))
    results: dict[str, Any] = {"vectors": n, "bandwidth_gbs": bandwidth_gbs()}
    flat = VectorIndex(DIM, IndexParams("flat"))
    started = time.perf_counter()
    flat.add(ids, data)
    results["flat"] = {"build_s": time.perf_counter() - started, "bytes": n * DIM * 4}
    _, truth = flat.search(queries, 10)
    results["flat"]["qps"] = qps(flat, queries[:50])
    results["flat"]["bound_qps"] = results["bandwidth_gbs"] * 1e9 / (n * DIM * 4)
    for kind, knob, values in (
        ("ivf", "nprobe", [8, 16, 32, 64, 128]),
        ("hnsw", "efSearch", [64, 128, 256, 384, 512, 1024]),
    ):
        params = IndexParams(kind, ivf_nlist=1024)  # type: ignore[arg-type]
        index = VectorIndex(DIM, params)
        started = time.perf_counter()
        index.add(ids, data)
        built = time.perf_counter() - started
        size = len(faiss.serialize_index(index._index))
        chosen: dict[str, Any] = {}
        for value in values:
            if kind == "ivf":
                faiss.extract_index_ivf(index._index).nprobe = value
            else:
                hnsw: Any = faiss.downcast_index(index._index.index)
                hnsw.hnsw.efSearch = value
            index._search_copy = None
            _, found = index.search(queries, 10)
            chosen = {knob: value, "recall": recall(found, truth)}
            if chosen["recall"] >= 0.95:
                break
        chosen |= {"build_s": built, "bytes": size, "qps": qps(index, queries[:100])}
        results[kind] = chosen
    return results


def part_batched(n: int, clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` concurrent clients, ``per_client`` searches each (top 10), one by one
    and then batched, on one flat index of ``n`` vectors."""
    index = VectorIndex(DIM, IndexParams("flat"))
    index.add(list(range(n)), clustered(n, 1))
    queries = clustered(clients * per_client, 3)
    batcher = SearchBatcher(index.search, window_s=0.001, max_batch=64)

    async def one_by_one(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return await asyncio.to_thread(index.search, row.reshape(1, -1), 10)

    async def run(search: Any) -> tuple[float, list[list[int]]]:
        found: list[list[int]] = [[] for _ in queries]

        async def client(c: int) -> None:
            for q in range(c, len(queries), clients):
                _, ids = await search(queries[q])
                found[q] = ids[0].tolist()

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return len(queries) / (time.perf_counter() - started), found

    def faiss_search(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with index.lock:  # FAISS's own flat scoring, as before retrieval.exact
            return index._index.search(normalise(vectors), k)  # type: ignore[no-any-return]

    through_faiss = SearchBatcher(faiss_search, window_s=0.001, max_batch=64)
    alone_qps, alone = asyncio.run(run(one_by_one))
    batched_qps, batched = asyncio.run(run(lambda row: batcher.search(row, 10)))
    faiss_qps, by_faiss = asyncio.run(run(lambda row: through_faiss.search(row, 10)))
    bandwidth = bandwidth_gbs()
    bound = bandwidth * 1e9 / (n * DIM * 4)
    return {
        "vectors": n, "clients": clients, "queries": len(queries),
        "gpus": GPUS.count(), "bandwidth_gbs": bandwidth, "bound_qps": bound,
        "one_by_one_qps": alone_qps, "batched_qps": batched_qps,
        "batches": batcher.batches, "mean_batch": len(queries) / batcher.batches,
        "batched_over_bound": batched_qps / bound, "faiss_batched_qps": faiss_qps,
        "identical_ids": sum(a == b for a, b in zip(alone, batched, strict=True)),
        "identical_to_faiss": sum(a == b for a, b in zip(by_faiss, batched, strict=True)),
    }  # fmt: skip


def part_two(docs: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    mock, port = free_port(), free_port()
    procs = [start([sys.executable, "-m", "bench.mock_engine", "--port", str(mock)],
                   work / "mock.log")]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    texts = [
        f"document {n} about topic {n % 97} and detail {n * 7919 % 10007}" for n in range(docs)
    ]
    samples: list[float] = []
    raw: list[float] = []
    try:
        wait_for(f"http://127.0.0.1:{mock}/health")
        text = config(port, mock, work / "retrieval")
        procs.append(start_gateway(text, work, "gateway"))
        wait_for(f"{base}/readyz")
        with httpx.Client(base_url=base, timeout=120) as client:
            client.post("/v1/collections", json={"name": "c"}).raise_for_status()
            for start_at in track(range(0, docs, 250), description="ingest over the API"):
                batch = [{"id": str(n), "text": texts[n]}
                         for n in range(start_at, min(start_at + 250, docs))]  # fmt: skip
                client.post("/v1/collections/c/documents", json={"documents": batch})
            queries = [texts[n] for n in range(0, docs, max(1, docs // 500))]
            for query in track(queries, description="search over HTTP"):
                started = time.perf_counter()
                client.post("/v1/collections/c/search", json={"query": query, "top_k": 10})
                samples.append((time.perf_counter() - started) * 1000)
    finally:
        stop_all(procs)
    index = VectorIndex(DIM, IndexParams("flat"))
    index.add(list(range(docs)), np.asarray([mock_vector(t) for t in texts], dtype=np.float32))
    for query in queries:
        vector = np.asarray([mock_vector(query)], dtype=np.float32)
        started = time.perf_counter()
        index.search(vector, 10)
        raw.append((time.perf_counter() - started) * 1000)

    def pct(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

    return {
        "documents": docs,
        "endpoint_ms": {"p50": pct(samples, 50), "p99": pct(samples, 99)},
        "raw_search_ms": {"p50": pct(raw, 50), "p99": pct(raw, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--parts", default="faiss,batched,endpoint")
    parser.add_argument("--out", default="bench-results/retrieval.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    console = Console()
    results: dict[str, Any] = {}
    if "faiss" in parts:
        results["faiss"] = one = part_one(args.vectors)
        table = Table(title=f"FAISS on {args.vectors:,} x {DIM} vectors, one query at a time")
        for column in ("index", "setting", "recall@10", "QPS", "build s", "size MB"):
            table.add_column(column, justify="right")
        flat = one["flat"]
        bound = f"bound {flat['bound_qps']:.0f} QPS at {one['bandwidth_gbs']:.1f} GB/s"
        table.add_row("flat", bound, "1.000", f"{flat['qps']:.0f}", f"{flat['build_s']:.1f}",
                      f"{flat['bytes'] / 1e6:.0f}")  # fmt: skip
        for kind, knob in (("ivf", "nprobe"), ("hnsw", "efSearch")):
            r = one[kind]
            table.add_row(kind, f"{knob}={r[knob]}", f"{r['recall']:.3f}", f"{r['qps']:.0f}",
                          f"{r['build_s']:.1f}", f"{r['bytes'] / 1e6:.0f}")  # fmt: skip
        console.print(table)
    if "batched" in parts:
        results["batched"] = b = part_batched(args.vectors, args.clients, args.per_client)
        table = Table(title=f"{b['clients']} concurrent clients, flat, {b['vectors']:,} x {DIM}"
                            f" ({b['queries']} searches, top 10, {b['gpus']} GPUs)")  # fmt: skip
        for column in ("searches", "QPS", "x single-query bound"):
            table.add_column(column, justify="right")
        table.add_row(f"bound ({b['bandwidth_gbs']:.1f} GB/s)", f"{b['bound_qps']:.1f}", "1.0")
        table.add_row("one by one", f"{b['one_by_one_qps']:.1f}",
                      f"{b['one_by_one_qps'] / b['bound_qps']:.2f}")  # fmt: skip
        table.add_row(f"batched (mean batch {b['mean_batch']:.1f})", f"{b['batched_qps']:.1f}",
                      f"{b['batched_over_bound']:.2f}")  # fmt: skip
        table.add_row("batched, FAISS's own scoring (before)", f"{b['faiss_batched_qps']:.1f}",
                      f"{b['faiss_batched_qps'] / b['bound_qps']:.2f}")  # fmt: skip
        console.print(table)
        console.print(f"identical top-10 ids: batched vs one by one {b['identical_ids']} of "
                      f"{b['queries']}, vs FAISS's own {b['identical_to_faiss']}")  # fmt: skip
    if "endpoint" in parts:
        results["endpoint"] = two = part_two(args.docs)
        table = Table(title=f"Search endpoint vs raw index.search, {args.docs:,} documents (ms)")
        for column in ("path", "p50", "p99"):
            table.add_column(column, justify="right")
        for name, key in (("POST /v1/collections/c/search", "endpoint_ms"),
                          ("index.search (flat)", "raw_search_ms")):  # fmt: skip
            table.add_row(name, f"{two[key]['p50']:.3f}", f"{two[key]['p99']:.3f}")
        console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
