"""The chart's retrieval (issue 28): on by default, the docstore in PostgreSQL, a
StatefulSet of index workers that the gateways scatter searches to."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.settings import load_settings
from tests.helm import helm_binary
from tests.unit.test_helm_chart import ROOT, by_kind, docs


def named(rendered: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in by_kind(rendered, kind) if d["metadata"]["name"] == name)


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("name", ["default", "gpu"])
def test_retrieval_runs_on_index_workers_and_postgresql(name: str, tmp_path: Path) -> None:
    rendered = docs(name)
    config = tmp_path / "weir.toml"
    config.write_text(named(rendered, "ConfigMap", "weir-config")["data"]["weir.toml"])
    retrieval = load_settings(config).retrieval
    assert retrieval.enabled
    assert retrieval.index_workers
    assert retrieval.database_url is not None
    assert retrieval.database_url.get_secret_value() == "postgresql://weir@weir-postgres:5432/weir"
    assert named(rendered, "Service", "weir-postgres")["spec"]["ports"][0]["port"] == 5432
    password = {"secretKeyRef": {"name": "weir-keys", "key": "retrieval-database-password"}}
    secret = named(rendered, "Secret", "weir-keys")
    assert "retrieval-database-password" in secret["stringData"]

    workers = named(rendered, "StatefulSet", "weir-index")
    assert workers["spec"]["replicas"] == 2
    assert workers["spec"]["serviceName"] == "weir-index"
    assert named(rendered, "Service", "weir-index")["spec"]["clusterIP"] == "None"
    worker = workers["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"][2:4] == ["retrieval", "serve"]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/health"
    variables = env(worker)
    assert variables["WEIR_WORKER_ID"] == "$(POD_NAME)"
    assert variables["WEIR_WORKER_URL"] == "http://$(POD_NAME).weir-index.weir.svc:8100"
    assert variables["PGPASSWORD"] == password
    gateway = named(rendered, "Deployment", "weir-gateway")
    assert env(gateway["spec"]["template"]["spec"]["containers"][0])["PGPASSWORD"] == password


@pytest.mark.parametrize("name", ["default", "gpu"])
def test_gateways_and_index_workers_share_one_token_from_the_secret(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = docs(name)
    token = {"secretKeyRef": {"name": "weir-keys", "key": "retrieval-worker-token"}}
    workers = named(rendered, "StatefulSet", "weir-index")["spec"]["template"]["spec"]
    gateway = named(rendered, "Deployment", "weir-gateway")["spec"]["template"]["spec"]
    assert env(workers["containers"][0])["WEIR_RETRIEVAL__WORKER_TOKEN"] == token
    assert env(gateway["containers"][0])["WEIR_RETRIEVAL__WORKER_TOKEN"] == token
    value = named(rendered, "Secret", "weir-keys")["stringData"]["retrieval-worker-token"]
    config = tmp_path / "weir.toml"
    config.write_text(named(rendered, "ConfigMap", "weir-config")["data"]["weir.toml"])
    monkeypatch.setenv("WEIR_RETRIEVAL__WORKER_TOKEN", value)  # as the pods get it
    worker_token = load_settings(config).retrieval.worker_token
    assert worker_token is not None
    assert worker_token.get_secret_value() == value


def secret(*values: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_binary()), "template", "weir", "deploy/helm/weir", "-n", "weir",
         "-s", "templates/secret.yaml", *values],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_worker_token_is_made_at_install_unless_given() -> None:
    made = [yaml.safe_load(secret().stdout)["stringData"]["retrieval-worker-token"]
            for _ in range(2)]  # fmt: skip
    assert all(re.fullmatch(r"[A-Za-z0-9]{48}", t) for t in made), made
    assert made[0] != made[1]  # random, not a default every install shares
    given = secret("--set", "retrieval.workerToken=a-token-of-our-own-choosing")
    assert yaml.safe_load(given.stdout)["stringData"]["retrieval-worker-token"] == (
        "a-token-of-our-own-choosing"
    )
    short = secret("--set", "retrieval.workerToken=too-short")
    assert short.returncode != 0
    assert "retrieval.workerToken needs at least 16 characters" in short.stderr


def configmap(*values: str) -> str:
    made = subprocess.run(
        [str(helm_binary()), "template", "weir", "deploy/helm/weir", "-n", "weir",
         "-s", "templates/gateway-configmap.yaml", *values],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    toml: str = yaml.safe_load(made.stdout)["data"]["weir.toml"]
    return toml


@pytest.mark.parametrize("name", ["default", "gpu"])
def test_gateways_keep_batches_in_the_shared_postgresql(name: str, tmp_path: Path) -> None:
    """Issue 23: a batch or file made through one gateway pod is found through every
    other, and one pod at a time runs it: the store is the chart's PostgreSQL (its
    password in every gateway's PGPASSWORD), not a file of each pod's own."""
    rendered = docs(name)
    config = tmp_path / "weir.toml"
    config.write_text(named(rendered, "ConfigMap", "weir-config")["data"]["weir.toml"])
    settings = load_settings(config)
    assert settings.batches.enabled
    assert settings.batches.database_url is not None
    assert settings.retrieval.database_url is not None
    url = settings.batches.database_url.get_secret_value()
    assert url == settings.retrieval.database_url.get_secret_value()
    assert url == "postgresql://weir@weir-postgres:5432/weir"
    gateway = named(rendered, "Deployment", "weir-gateway")
    password = {"secretKeyRef": {"name": "weir-keys", "key": "retrieval-database-password"}}
    assert env(gateway["spec"]["template"]["spec"]["containers"][0])["PGPASSWORD"] == password

    elsewhere = ["--set", "retrieval.postgres.enabled=false",
                 "--set", "retrieval.postgres.url=postgresql://weir@db:5432/w"]  # fmt: skip
    config.write_text(configmap(*elsewhere))
    own = load_settings(config).batches.database_url
    assert own is not None
    assert own.get_secret_value() == "postgresql://weir@db:5432/w"
    config.write_text(
        configmap("--set", "retrieval.enabled=false", "--set", "batches.enabled=false")
    )
    off = load_settings(config).batches  # off: the routes, never a per-pod store
    assert (off.enabled, off.database_url) == (False, None)
