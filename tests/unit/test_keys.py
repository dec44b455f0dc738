"""API keys: stores (a real Redis and the file), auth on the gateway, admin API, CLI."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.cli.main import main
from serving.http.app import create_app
from serving.keys.issue import KeyCreate, create_key
from serving.keys.records import PREFIX, KeyRecord, hash_secret
from serving.keys.store import (
    FileKeyStore,
    KeyStore,
    KeyStoreUnavailable,
    RedisKeyStore,
    UnknownKey,
)
from serving.settings import KeysConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.redis_server import dead_port

ADMIN = "admin-secret-for-tests"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
EMBED = {"model": "minilm", "input": "hello"}


@pytest.fixture(params=["file", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> AsyncIterator[KeyStore]:
    if request.param == "file":
        made: KeyStore = FileKeyStore(tmp_path / "keys.json")
    else:
        redis.Redis.from_url(redis_url).flushdb()
        made = RedisKeyStore(redis_url)
    yield made
    await made.aclose()


@pytest.mark.anyio
async def test_store_keeps_hashes_not_secrets(
    store: KeyStore, redis_url: str, tmp_path: Path
) -> None:
    secret, record = await create_key(store, KeyCreate(name="team-a", models=["smollm2"], rpm=60))
    assert secret.startswith(PREFIX)
    assert record.hash == hash_secret(secret)
    found = await store.lookup(secret)
    assert found is not None
    assert (found.name, found.models, found.rpm) == ("team-a", ("smollm2",), 60)
    assert await store.lookup(secret + "x") is None
    assert [r.id for r in await store.list()] == [record.id]
    revoked = await store.revoke(record.id[:8])
    assert revoked.revoked
    again = await store.lookup(secret)
    assert again is not None
    assert again.revoked
    with pytest.raises(UnknownKey):
        await store.revoke("ffffffffffff")
    # the secret itself is stored nowhere
    if isinstance(store, FileKeyStore):
        assert secret not in store.path.read_text()
        assert oct(store.path.stat().st_mode)[-3:] == "600"
    else:
        client = redis.Redis.from_url(redis_url)
        dumped = [str(client.get(k)) for k in client.keys("*")]
        assert dumped
        assert not any(secret in value for value in dumped)


@pytest.mark.anyio
async def test_unreachable_redis_fails_fast() -> None:
    with dead_port() as port:
        store = RedisKeyStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        with pytest.raises(KeyStoreUnavailable):
            await store.lookup("sk-weir-anything")
    await store.aclose()


def make_client(keys: KeysConfig) -> TestClient:
    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "135m-instruct", 0), FakeEngine(), "smollm2"),
                Replica(ReplicaKey("minilm", "l6-v2", 0), FakeEngine(name="embed"), "minilm"),
            ],
            health_interval_s=0.05,
        )

    app = create_app(Settings(keys=keys), fleet_factory=fleet, counters={})
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[TestClient]:
    config = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    with make_client(config) as client:
        yield client


def admin(client: TestClient, method: str, path: str, **kwargs: Any) -> Any:
    response = client.request(method, path, headers={"authorization": f"Bearer {ADMIN}"}, **kwargs)
    return response


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def test_keys_are_required_and_checked(keyed: TestClient) -> None:
    created = admin(keyed, "POST", "/weir/admin/keys", json={"name": "team"}).json()
    secret = created["key"]
    assert keyed.post("/v1/chat/completions", json=CHAT).status_code == 401
    wrong = keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(secret + "x"))
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(secret)).status_code == 200
    assert keyed.get("/healthz").status_code == 200  # probes stay open
    admin(keyed, "DELETE", f"/weir/admin/keys/{created['id']}")
    assert keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(secret)).status_code == 401


def test_model_allow_list_gives_403_without_saying_what_exists(keyed: TestClient) -> None:
    secret = admin(
        keyed, "POST", "/weir/admin/keys", json={"name": "e", "models": ["minilm"]}
    ).json()["key"]
    assert keyed.post("/v1/embeddings", json=EMBED, headers=bearer(secret)).status_code == 200
    real = keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    ghost = keyed.post(
        "/v1/chat/completions", json=CHAT | {"model": "ghost"}, headers=bearer(secret)
    )
    assert real.status_code == ghost.status_code == 403
    assert real.json() == ghost.json()
    assert real.json()["error"]["code"] == "permission_denied"


def test_admin_api(keyed: TestClient) -> None:
    assert keyed.post("/weir/admin/keys", json={"name": "x"}).status_code == 401
    created = admin(keyed, "POST", "/weir/admin/keys", json={"name": "x", "rpm": 10}).json()
    listed = admin(keyed, "GET", "/weir/admin/keys").json()["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "hash" not in listed[0]
    assert created["key"] not in str(listed)
    assert admin(keyed, "DELETE", "/weir/admin/keys/ffffffffffff").status_code == 404
    assert admin(keyed, "POST", "/weir/admin/keys", json={"name": "", "rpm": 0}).status_code == 400


def test_admin_api_is_off_without_an_admin_key(tmp_path: Path) -> None:
    with make_client(KeysConfig(enabled=True, file=tmp_path / "k.json")) as client:
        response = client.get("/weir/admin/keys", headers=bearer("anything"))
    assert response.status_code == 403


def test_unreachable_key_store_is_a_503(tmp_path: Path) -> None:
    with dead_port() as port:
        url = f"redis://127.0.0.1:{port}/0"
        config = KeysConfig(enabled=True, redis_url=url, timeout_s=0.3)
        with make_client(config) as client:
            response = client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-weir-x"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "auth_unavailable"


def test_secrets_never_reach_the_logs(keyed: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        secret = admin(keyed, "POST", "/weir/admin/keys", json={"name": "l"}).json()["key"]
        keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(secret + "-wrong"))
        keyed.get("/weir/admin/keys", headers=bearer(ADMIN + "-wrong"))
    text = caplog.text
    assert secret not in text
    assert ADMIN not in text


def test_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "weir.toml"
    config.write_text(f'[keys]\nfile = "{tmp_path / "keys.json"}"\n')
    assert (
        main(
            [
                "--config",
                str(config),
                "keys",
                "create",
                "--name",
                "ops",
                "--models",
                "smollm2",
                "--tpm",
                "1000",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    secret = next(line for line in out.splitlines() if line.startswith(PREFIX))
    key_id = hash_secret(secret)[:12]
    assert main(["--config", str(config), "keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed
    assert secret not in listed
    assert main(["--config", str(config), "keys", "revoke", key_id]) == 0
    assert main(["--config", str(config), "keys", "revoke", "ffffffffffff"]) == 1
    stored = FileKeyStore(tmp_path / "keys.json")._read()
    record: KeyRecord = next(iter(stored.values()))
    assert record.revoked
    assert record.tpm == 1000


@pytest.mark.anyio
async def test_file_store_sees_keys_written_by_another_process(tmp_path: Path) -> None:
    gateway, cli = FileKeyStore(tmp_path / "keys.json"), FileKeyStore(tmp_path / "keys.json")
    first, _ = await create_key(cli, KeyCreate(name="one"))
    assert await gateway.lookup(first) is not None  # read and cached
    second, _ = await create_key(cli, KeyCreate(name="two"))  # within the same mtime tick, likely
    assert await gateway.lookup(second) is not None


def test_a_model_name_with_a_lone_surrogate_is_a_400(keyed: TestClient) -> None:
    """``models`` items had no string check: a lone surrogate (no UTF-8) was stored, the
    answer failed to render (500, the key made) and so did every list after it."""
    body = b'{"name": "s", "models": ["smollm2", "m\\udfff"]}'
    headers = bearer(ADMIN) | {"content-type": "application/json"}
    made = keyed.post("/weir/admin/keys", content=body, headers=headers)
    assert made.status_code == 400, made.text
    assert made.json()["error"]["param"] == "models"
    listed = admin(keyed, "GET", "/weir/admin/keys")
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"] == []
    kept = admin(keyed, "POST", "/weir/admin/keys", json={"name": "é\x00", "models": ["m é"]})
    assert kept.status_code == 200, kept.text  # other text, NUL too, is stored as it is
    assert kept.json()["models"] == ["m é"]
