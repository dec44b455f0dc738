"""A real vLLM engine started with ``--api-key``: the version's ``headers`` carry the key
on every request the gateway sends it (health, chat, streamed chat), and the key is in
no log line. Without it, the engine refuses (checked directly, so the test would notice a
vLLM that stopped enforcing its key)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bench.config_builder import model, weir_toml
from tests.integration.stack import Stack, start_stack

pytestmark = pytest.mark.integration
ENGINE_KEY = "sk-engine-9f3c1e"


def keyed_config(port: int, logs: Path) -> str:
    return weir_toml(
        gateway={"port": port},
        engines={"log_dir": logs},
        retrieval={"enabled": False},
        models=[
            model("smollm2", "135m-instruct", weights="smollm2-135m-instruct",
                  engine_args=["--max-model-len", "2048", "--api-key", ENGINE_KEY],
                  headers={"Authorization": f"Bearer {ENGINE_KEY}"}),
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("engine-key"), keyed_config)
    try:
        running.wait_ready()  # every replica healthy: /health went through h1
        yield running
    finally:
        running.stop()


def test_the_version_headers_open_an_engine_behind_its_key(keyed: Stack) -> None:
    engines = httpx.get(f"{keyed.base_url}/weir/engines", timeout=5).json()["data"]
    engine_url = engines[0]["base_url"]
    refused = httpx.post(f"{engine_url}/v1/chat/completions", json={}, timeout=10)
    assert refused.status_code == 401  # the engine does hold a key

    client = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="unused", max_retries=0)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Say hi"}
    ]
    answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8)
    assert answer.choices[0].message.content
    stream = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert ENGINE_KEY not in keyed.log_path.read_text(errors="replace")  # the gateway's log
