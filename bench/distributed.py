"""Raw samples across Locust's own master/worker mode, merged on the master.

Locust aggregates its own stats across workers, but our raw samples (integer
nanoseconds, one per request) live on the worker that made the request. Each worker
buffers its samples and ships them to the master with Locust's periodic stats report
(``report_to_master``, every 3 s); the master appends them to ``--weir-samples``.

The end of a run is a handshake, because Locust's own ``--run-time`` on a master sends
``quit`` and waits 0.5 s for the workers' last reports (a stream in flight takes longer,
and its sample would be lost). With ``--weir-run-time`` the master instead sends
``weir_finish`` to every worker when the time is up; each worker stops its users
(in-flight requests get ``--stop-timeout``), then sends its remaining samples marked
final, over the same socket, so they arrive in order. Once every worker has sent its
final batch (or ``stop_timeout + FINISH_GRACE_S`` passed), the master quits.

Clocks: every duration (TTFT, gaps, end to end) is measured on the one host that made the
request, with its monotonic clock. Only ``start_wall_ns``, used to place a request on the
run's timeline, comes from the worker's wall clock; the master maps it onto its own by
the smallest ``master receive - worker send`` it saw from that worker (the true offset
plus the fastest one-way delay, so the error is at most that delay: well under a
millisecond on a LAN). The raw value is kept as ``worker_start_wall_ns``, and the
offsets go to ``workers.json`` beside the samples.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent

if TYPE_CHECKING:  # importing Locust monkey-patches the process: the locustfile does that
    from locust.env import Environment
    from locust.runners import MasterRunner, WorkerRunner

MSG_SAMPLES = "weir_samples"
MSG_FINISH = "weir_finish"
FINISH_GRACE_S = 30.0  # past the stop timeout, how long the master waits for final batches


class WorkerOutbox:
    """A worker's samples, waiting for the next report to the master."""

    def __init__(self, environment: Environment, runner: WorkerRunner) -> None:
        self.environment = environment
        self.runner = runner
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        environment.events.report_to_master.add_listener(self._report)
        runner.register_message(MSG_FINISH, self._finish)

    def write(self, record: dict[str, Any]) -> None:
        record["worker"] = self.runner.client_id
        with self._lock:
            self._pending.append(record)

    def close(self) -> None:
        return None

    def batch(self, final: bool = False) -> dict[str, Any]:
        with self._lock:
            samples, self._pending = self._pending, []
        return {"sent_ns": time.time_ns(), "samples": samples, "final": final}

    def _report(self, client_id: str, data: dict[str, Any], **_: Any) -> None:
        data[MSG_SAMPLES] = self.batch()

    def _finish(self, **_: Any) -> None:
        def finish() -> None:
            self.runner.stop()  # users finish what is in flight, within the stop timeout
            self.runner.send_message(MSG_SAMPLES, self.batch(final=True))

        gevent.spawn(finish)


class MasterInbox:
    """The master's side: samples from every worker into one file, clock offsets noted."""

    def __init__(self, environment: Environment, runner: MasterRunner, path: str) -> None:
        self.environment = environment
        self.runner = runner
        self.path = Path(path) if path else None
        self._file = self.path.open("a", buffering=1) if self.path else None
        self.offsets: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.finals: set[str] = set()
        environment.events.worker_report.add_listener(self._report)
        runner.register_message(MSG_SAMPLES, self._message)

    def write(self, record: dict[str, Any]) -> None:  # the master makes no requests
        raise RuntimeError("the master makes no requests")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _report(self, client_id: str, data: dict[str, Any], **_: Any) -> None:
        if MSG_SAMPLES in data:
            self.take(client_id, data[MSG_SAMPLES])

    def _message(self, environment: Environment, msg: Any, **_: Any) -> None:
        self.take(str(msg.node_id), msg.data)

    def take(self, worker: str, batch: dict[str, Any], now_ns: int | None = None) -> None:
        offset = (time.time_ns() if now_ns is None else now_ns) - int(batch["sent_ns"])
        self.offsets[worker] = min(offset, self.offsets.get(worker, offset))
        samples = batch.get("samples") or []
        self.counts[worker] = self.counts.get(worker, 0) + len(samples)
        if self._file is not None and samples:
            self._file.write("".join(json.dumps(s) + "\n" for s in samples))
        if batch.get("final"):
            self.finals.add(worker)

    def finish(self) -> None:
        """Ask every worker for its last samples, wait for them, then quit the run."""
        expected = {client.id for client in self.runner.clients.all}
        self.runner.send_message(MSG_FINISH)
        deadline = time.monotonic() + (self.environment.stop_timeout or 0) + FINISH_GRACE_S
        while not expected <= self.finals and time.monotonic() < deadline:
            gevent.sleep(0.1)
        self.close()
        self.settle(expected)
        self.runner.quit()

    def settle(self, expected: set[str]) -> None:
        """Put every sample on the master's clock; write ``workers.json`` beside them."""
        if self.path is None:
            return
        if self.path.exists():
            settle_file(self.path, self.offsets)
        workers = {
            worker: {
                "clock_offset_ns": self.offsets.get(worker),
                "samples": self.counts.get(worker, 0),
                "final_batch": worker in self.finals,
            }
            for worker in sorted(expected | set(self.counts))
        }
        self.path.with_name("workers.json").write_text(json.dumps(workers, indent=2))


def settle_file(path: Path, offsets: dict[str, int]) -> None:
    """Rewrite ``path`` with each sample's ``start_wall_ns`` on the master's clock."""
    temporary = path.with_name(path.name + ".settling")
    with path.open() as source, temporary.open("w") as target:
        for line in source:
            if not line.strip():
                continue
            sample = json.loads(line)
            offset = offsets.get(str(sample.get("worker")), 0)
            sample["worker_start_wall_ns"] = sample["start_wall_ns"]
            sample["start_wall_ns"] = sample["start_wall_ns"] + offset
            target.write(json.dumps(sample) + "\n")
    os.replace(temporary, path)


def schedule_finish(environment: Environment, inbox: MasterInbox, run_time_s: float) -> None:
    """On the master: end the run ``run_time_s`` after the test starts, by the handshake."""

    def start(**_: Any) -> None:
        gevent.spawn_later(run_time_s, inbox.finish)

    environment.events.test_start.add_listener(start)
