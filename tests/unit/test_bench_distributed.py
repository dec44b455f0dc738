"""Locust's master/worker mode against the mock engine: every worker's raw samples reach
one results.json, with the same latency accounting as a single process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.distributed import settle_file
from tests.bench_targets import bench, mock_engine

CHUNKS = 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("mock")
    with mock_engine(logs, "--chunks", str(CHUNKS), "--interval-ms", "2") as url:
        yield url


def run(engine: str, out: Path, *extra: str) -> dict[str, Any]:
    done = bench(
        "run", "--scenario", "stream-chat", "--users", "8", "--duration", "4", "--host", engine,
        "--model", "mock", "--out", str(out), *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(json.loads((out / "results.json").read_text()))


def samples(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_two_workers_send_every_sample_to_the_master(engine: str, tmp_path: Path) -> None:
    results = run(engine, tmp_path, "--processes", "2")
    workers = json.loads((tmp_path / "workers.json").read_text())
    assert len(workers) == 2
    assert all(w["final_batch"] and w["samples"] > 0 for w in workers.values())
    got = samples(tmp_path)
    assert len(got) == sum(w["samples"] for w in workers.values())
    assert {s["worker"] for s in got} == set(workers)
    for sample in got:  # on the master's clock, by that worker's offset
        offset = workers[sample["worker"]]["clock_offset_ns"]
        assert sample["start_wall_ns"] - sample["worker_start_wall_ns"] == offset
    assert results["context"]["load_processes"] == 2
    assert results["context"]["workers"] == workers
    assert results["variants"]["gateway"]["requests"] == len(got)
    assert results["variants"]["gateway"]["error_rate"] == 0
    # a stream in flight at the end is in the samples: the master waited for it
    assert results["counting"]["samples"] == len(got)


def test_one_process_and_two_account_for_latency_alike(engine: str, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    run(engine, one)
    run(engine, two, "--processes", "2")
    for out in (one, two):
        for sample in samples(out):
            assert sample["error"] is None
            assert sample["status"] == 200
            assert sample["completion_tokens"] == CHUNKS  # from the server's usage
            assert len(sample["gaps_ns"]) == CHUNKS - 1  # every content chunk timed
            assert 0 < sample["ttft_ns"] <= sample["e2e_ns"]
            assert all(isinstance(g, int) for g in sample["gaps_ns"])
    keys = {k for s in samples(one) for k in s}
    assert {k for s in samples(two) for k in s} == keys | {"worker", "worker_start_wall_ns"}


def test_open_loop_splits_the_rate_over_the_workers(engine: str, tmp_path: Path) -> None:
    results = run(engine, tmp_path, "--scenario", "open-loop", "--rate", "20", "--processes", "2")
    got = samples(tmp_path)
    per_worker: dict[str, int] = {}
    for sample in got:
        per_worker[sample["worker"]] = per_worker.get(sample["worker"], 0) + 1
    assert len(per_worker) == 2  # one arrival user a worker, each at half the rate
    # 20/s for 4 s is 80 Poisson arrivals: 6 standard deviations either side
    assert 26 <= len(got) <= 134, len(got)
    assert results["variants"]["gateway"]["error_rate"] == 0


def test_settle_moves_each_worker_onto_the_master_clock(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    rows = [{"worker": "a", "start_wall_ns": 1000}, {"worker": "b", "start_wall_ns": 1000}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settle_file(path, {"a": 250, "b": -40})
    settled = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["start_wall_ns"] for s in settled] == [1250, 960]
    assert [s["worker_start_wall_ns"] for s in settled] == [1000, 1000]
