"""The chart's retrieval (issue 28): on by default, the docstore in PostgreSQL, a
StatefulSet of index workers that the gateways scatter searches to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serving.settings import load_settings
from tests.unit.test_helm_chart import by_kind, docs


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
