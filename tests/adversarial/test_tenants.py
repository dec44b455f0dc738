"""A hostile tenant against the others: what a key may use, see and forge.

A key limited to some models gets nothing of the others (not through a fallback, not in
``/v1/models`` or ``/weir/engines``), engine URLs are for the admin key only, and a field
name a client sends cannot forge a log line.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.config import ModelConfig, RoutingConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.errors import EngineUnavailable
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.log_config import TextLines, one_line
from serving.settings import KeysConfig, Settings
from tests.fakes.engine import FakeEngine

ADMIN = "admin-for-tenant-tests"
FAST = RoutingConfig(breaker_failures=1, breaker_open_s=60, backoff_base_s=0, retries=0)


class Rig:
    def __init__(self, client: TestClient, engines: dict[str, FakeEngine]) -> None:
        self.client, self.engines = client, engines

    def key(self, **fields: Any) -> dict[str, str]:
        made = self.client.post(
            "/weir/admin/keys", json={"name": "t", **fields}, headers=bearer(ADMIN)
        )
        assert made.status_code in (200, 201), made.text
        return bearer(made.json()["key"])


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Chat models ``a`` (falls back to ``b``) and ``b``; ``a``'s only engine is down."""
    models = [
        ModelConfig(
            name=name, task="chat", current="v1", routing=FAST,
            versions=[VersionConfig(version="v1", url=f"http://10.0.0.{n}:8000")],
            fallbacks=["b"] if name == "a" else [],
        )
        for n, name in enumerate(("b", "a"), start=1)
    ]  # fmt: skip
    engines = {
        "a": FakeEngine(name="a", fail_with=EngineUnavailable("down")),
        "b": FakeEngine(name="b"),
    }

    def fleet(_: object) -> Fleet:
        replicas = []
        for n, (name, engine) in enumerate(sorted(engines.items()), start=1):
            engine.base_url = f"http://10.0.0.{n}:8000"  # type: ignore[attr-defined]
            replicas.append(Replica(ReplicaKey(name, "v1", 0), engine, name))
        return Fleet(replicas, health_interval_s=0.05)

    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    app = create_app(Settings(models=models, keys=keys), fleet_factory=fleet, counters={})
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Rig(client, engines)


def test_a_fallback_never_answers_with_a_model_the_key_may_not_use(rig: Rig) -> None:
    only_a = rig.key(models=["a"])
    first = rig.client.post("/v1/chat/completions", json=chat("a"), headers=only_a)
    assert first.status_code == 503  # a's engine is down (its breaker opens)
    again = rig.client.post("/v1/chat/completions", json=chat("a"), headers=only_a)
    assert again.status_code == 503, again.headers
    assert "x-weir-fallback" not in again.headers
    assert rig.engines["b"].calls == []  # b never saw this key's prompt
    # a key that may use both is moved to b, as before
    both = rig.key(models=["a", "b"])
    moved = rig.client.post("/v1/chat/completions", json=chat("a"), headers=both)
    assert moved.status_code == 200
    assert moved.headers["x-weir-fallback"] == "b@v1"


def test_models_lists_only_what_the_key_may_use(rig: Rig) -> None:
    listed = rig.client.get("/v1/models", headers=rig.key(models=["a"])).json()["data"]
    assert {card["id"] for card in listed} == {"a", "a@v1"}
    everything = rig.client.get("/v1/models", headers=rig.key()).json()["data"]
    assert {card["id"] for card in everything} == {"a", "a@v1", "b", "b@v1"}


def test_engines_show_urls_to_the_admin_key_only(rig: Rig) -> None:
    tenant = rig.client.get("/weir/engines", headers=rig.key(models=["a"]))
    assert tenant.status_code == 200
    assert [e["model"] for e in tenant.json()["data"]] == ["a"]
    assert all(e["base_url"] is None and e["pid"] is None for e in tenant.json()["data"])
    assert [b["version"] for b in tenant.json()["bulkheads"]] == ["a@v1"]
    assert "10.0.0." not in tenant.text
    unrestricted = rig.client.get("/weir/engines", headers=rig.key()).json()["data"]
    assert {e["model"] for e in unrestricted} == {"a", "b"}
    assert all(e["base_url"] is None for e in unrestricted)
    admin = rig.client.get("/weir/engines", headers=bearer(ADMIN))
    assert admin.status_code == 200
    urls = {e["model"]: e["base_url"] for e in admin.json()["data"]}
    assert urls == {"a": "http://10.0.0.1:8000", "b": "http://10.0.0.2:8000"}
    assert rig.client.get("/weir/engines", headers=bearer("sk-wrong")).status_code == 401


def test_a_field_name_cannot_forge_a_log_line(rig: Rig) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextLines("%(levelname)s %(name)s: %(message)s"))
    forged = "x\nINFO weir.access: /v1/chat/completions admin@v1 200 1.0ms\r\u2028"
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        body = chat("b") | {forged: 1, "ok\x1b[2J": "\n\nvalue"}
        answer = rig.client.post("/v1/chat/completions", json=body, headers=rig.key())
        assert answer.status_code == 200
    finally:
        root.removeHandler(handler)
        root.setLevel(before)
    lines = out.getvalue().splitlines()
    assert lines, "nothing logged"
    assert not any(
        line.startswith("INFO weir.access: /v1/chat/completions admin") for line in lines
    )
    unknown = [line for line in lines if "unknown request fields" in line]
    assert len(unknown) == 1
    assert "x\\nINFO weir.access" in unknown[0]
    assert "ok\\x1b[2J" in unknown[0]


def test_one_line_escapes_every_break() -> None:
    for text in ("a\nb", "a\rb", "a\x0bb", "a\x0cb", "a\x1cb", "a\x85b", "a\u2028b", "a\u2029b"):
        assert len(one_line(text).splitlines()) == 1, repr(text)
    assert one_line("plain: é ✓") == "plain: é ✓"
