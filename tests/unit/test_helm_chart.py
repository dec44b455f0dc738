"""The Helm chart: rendered by a real ``helm`` (``tests/helm.py``), linted, and equal to
the checked-in render (``deploy/helm/rendered``), which these tests hold to Kubernetes
1.30's schemas (strict: no unknown fields), to Weir's own settings, and to what the chart
promises: engines found by DNS through headless Services, readiness on ``/health``, GPUs
and parallelism where asked.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serving.rollout.shared import rollout_url
from serving.settings import load_settings
from tests.helm import helm_binary

ROOT = Path(__file__).resolve().parents[2]
RENDERED = ROOT / "deploy/helm/rendered"
K8S = "1.30.0"
CRDS = {"ServiceMonitor", "LeaderWorkerSet", "ScaledObject"}  # no schemas ship: checked by hand


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((RENDERED / f"{name}.yaml").read_text()) if d]


def by_kind(rendered: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered if d["kind"] == kind]


VALUES = {"default": [], "gpu": ["-f", "deploy/helm/weir/values-gpu.yaml"]}


@pytest.mark.parametrize("name", ["default", "gpu"])
def test_the_checked_in_render_is_what_helm_renders(name: str) -> None:
    """Issue 29: the render was written by hand and never compared with the templates."""
    helm = str(helm_binary())
    chart = ["deploy/helm/weir", *VALUES[name]]
    lint = subprocess.run([helm, "lint", "--strict", *chart], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
    made = subprocess.run([helm, "template", "weir", *chart, "--namespace", "weir"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    rendered = [d for d in yaml.safe_load_all(made.stdout) if d]
    checked_in = docs(name)
    # the index workers' token is made at install (48 random characters); the checked-in
    # render holds a placeholder in its place
    (secret,) = by_kind(rendered, "Secret")
    made_token = secret["stringData"]["retrieval-worker-token"]
    assert re.fullmatch(r"[A-Za-z0-9]{48}", made_token), made_token
    (kept,) = by_kind(checked_in, "Secret")
    secret["stringData"]["retrieval-worker-token"] = kept["stringData"]["retrieval-worker-token"]
    for doc in checked_in:  # helm template leaves the namespace to kubectl apply -n weir
        assert doc["metadata"].pop("namespace", "weir") == "weir"

    def named(found: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(d["kind"], d["metadata"]["name"]): d for d in found}  # helm orders by kind

    assert len(rendered) == len(checked_in) == len(named(rendered))
    assert named(rendered) == named(checked_in)


def pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}


@pytest.mark.parametrize("name", ["default", "gpu"])
def test_every_resource_validates_against_the_kubernetes_schemas(name: str) -> None:
    rendered = docs(name)
    assert rendered
    for doc in rendered:
        if doc["kind"] in CRDS:
            continue
        kubernetes_validate.validate(doc, K8S, strict=True)
    for lws in by_kind(rendered, "LeaderWorkerSet"):  # its pod templates are plain PodSpecs
        template = lws["spec"]["leaderWorkerTemplate"]
        for part in ("leaderTemplate", "workerTemplate"):
            kubernetes_validate.validate(pod(template[part]["spec"]), K8S, strict=True)


@pytest.mark.parametrize("name", ["default", "gpu"])
def test_gateways_find_every_engine_through_a_headless_service(name: str, tmp_path: Path) -> None:
    rendered = docs(name)
    config = tmp_path / "weir.toml"
    config.write_text(by_kind(rendered, "ConfigMap")[0]["data"]["weir.toml"])
    settings = load_settings(config)  # the chart's config is valid Weir configuration
    services = {s["metadata"]["name"]: s for s in by_kind(rendered, "Service")}
    workloads = by_kind(rendered, "Deployment") + by_kind(rendered, "LeaderWorkerSet")
    for model in settings.models:
        for version in model.versions:
            assert version.dns is not None
            host, port = version.dns.rsplit(":", 1)
            service = services[host.split(".")[0]]
            assert service["spec"]["clusterIP"] == "None"
            assert service["spec"]["ports"][0]["port"] == int(port)
            selector = service["spec"]["selector"]
            matched = [w for w in workloads if _pod_labels(w).items() >= _plain(selector).items()]
            assert len(matched) == 1, (host, selector)
            for container in _containers(matched[0]):
                if container["name"] in ("vllm", "vllm-leader"):
                    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    gateway = next(
        d for d in by_kind(rendered, "Deployment") if d["metadata"]["name"].endswith("gateway")
    )
    probe = gateway["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    assert by_kind(rendered, "HorizontalPodAutoscaler")
    assert len(by_kind(rendered, "ServiceMonitor")) == 2


def test_gpu_values_ask_for_gpus_and_parallelism() -> None:
    rendered = docs("gpu")
    engines = {
        d["metadata"]["name"]: d for d in rendered if d["kind"] in ("Deployment", "LeaderWorkerSet")
    }
    tp4 = engines["weir-llama-70b-v1"]["spec"]["template"]["spec"]["containers"][0]
    assert "--tensor-parallel-size=4" in tp4["args"]
    assert tp4["resources"]["limits"]["nvidia.com/gpu"] == 4
    multi = engines["weir-llama-405b-v1"]
    assert multi["kind"] == "LeaderWorkerSet"
    assert multi["spec"]["leaderWorkerTemplate"]["size"] == 2
    leader = multi["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    assert "--pipeline-parallel-size=2" in leader["args"][0]
    assert "--distributed-executor-backend=ray" in leader["args"][0]
    config = by_kind(rendered, "ConfigMap")[0]["data"]["weir.toml"]
    assert "split = { v1 = 90, v2 = 10 }" in config


def test_engines_scale_on_their_queue_depth_when_asked() -> None:
    """Issue 26: KEDA scales each version's engine Deployment on vllm:num_requests_waiting
    (off by default); the Deployment then leaves ``replicas`` to it; gateways on CPU."""
    assert not by_kind(docs("default"), "ScaledObject")
    rendered = docs("gpu")
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in by_kind(rendered, "ScaledObject")}
    deployments = {d["metadata"]["name"]: d for d in by_kind(rendered, "Deployment")}
    services = {d["metadata"]["name"] for d in by_kind(rendered, "Service")}
    assert set(scaled) == {"weir-smollm2-v1", "weir-smollm2-v2", "weir-llama-70b-v1"}
    for name, scaler in scaled.items():
        assert "replicas" not in deployments[name]["spec"]  # KEDA's to set
        assert name in services
        (trigger,) = scaler["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert query == f'sum(vllm:num_requests_waiting{{namespace="weir",service="{name}"}})'
        assert float(trigger["metadata"]["threshold"]) == 4
    assert scaled["weir-smollm2-v2"]["spec"]["maxReplicaCount"] == 2  # the version's own
    assert scaled["weir-smollm2-v1"]["spec"]["maxReplicaCount"] == 8
    assert "replicas" not in deployments["weir-gateway"]["spec"]  # the HPA's, on CPU
    (hpa,) = by_kind(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize("name", ["default", "gpu"])
def test_gateways_share_rollouts_through_their_redis(name: str, tmp_path: Path) -> None:
    """Issue 26: a deploy, rollback or split through one gateway pod reaches every pod,
    and one rollout per model runs at a time across them (``deploy.shared``: the
    rollout state and its lease in ``keys.redis_url``)."""
    config = tmp_path / "weir.toml"
    config.write_text(by_kind(docs(name), "ConfigMap")[0]["data"]["weir.toml"])
    settings = load_settings(config)
    assert settings.deploy.shared
    assert rollout_url(settings) == settings.keys.redis_url == "redis://weir-redis:6379/0"
    own = subprocess.run(
        [str(helm_binary()), "template", "weir", "deploy/helm/weir", "-n", "weir",
         "-s", "templates/gateway-configmap.yaml", "--set", "redis.enabled=false",
         "--set", "redis.url=redis://redis.example:6379/2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    config.write_text(yaml.safe_load(own.stdout)["data"]["weir.toml"])
    assert rollout_url(load_settings(config)) == "redis://redis.example:6379/2"


def test_with_retrieval_off_the_batch_api_keeps_its_shared_postgresql(tmp_path: Path) -> None:
    """The chart's PostgreSQL is made when retrieval or batches needs it: with retrieval
    off (and batches on, the default) the gateways keep the Batch API in it, shared by
    every pod, instead of turning it off; with both off there is no database."""

    def render(*values: str) -> list[dict[str, Any]]:
        made = subprocess.run(
            [str(helm_binary()), "template", "weir", "deploy/helm/weir", "-n", "weir", *values],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return [d for d in yaml.safe_load_all(made.stdout) if d]

    rendered = render("--set", "retrieval.enabled=false")
    config = tmp_path / "weir.toml"
    config.write_text(by_kind(rendered, "ConfigMap")[0]["data"]["weir.toml"])
    settings = load_settings(config)
    assert not settings.retrieval.enabled
    assert settings.batches.enabled
    assert settings.batches.database_url is not None
    assert settings.batches.database_url.get_secret_value() == (
        "postgresql://weir@weir-postgres:5432/weir"
    )
    sets = {d["metadata"]["name"] for d in by_kind(rendered, "StatefulSet")}
    assert "weir-postgres" in sets
    assert "weir-index" not in sets  # no index workers without retrieval
    services = {d["metadata"]["name"] for d in by_kind(rendered, "Service")}
    assert "weir-postgres" in services
    (gateway,) = [
        d for d in by_kind(rendered, "Deployment") if d["metadata"]["name"] == "weir-gateway"
    ]
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "retrieval-database-password"
    assert "WEIR_RETRIEVAL__WORKER_TOKEN" not in env  # the Secret holds none then

    neither = render("--set", "retrieval.enabled=false", "--set", "batches.enabled=false")
    assert not [d for d in neither if d["metadata"]["name"] == "weir-postgres"]
    config.write_text(by_kind(neither, "ConfigMap")[0]["data"]["weir.toml"])
    assert not load_settings(config).batches.enabled


def test_the_chart_ships_the_same_dashboard() -> None:
    chart_copy = (ROOT / "deploy/helm/weir/files/weir.json").read_text()
    assert chart_copy == (ROOT / "deploy/grafana/weir.json").read_text()


def _plain(labels: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in labels.items()}


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    if workload["kind"] == "LeaderWorkerSet":
        leader = workload["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
        return {**_plain(leader), "leaderworkerset.sigs.k8s.io/worker-index": "0"}
    return _plain(workload["spec"]["template"]["metadata"]["labels"])


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    if workload["kind"] == "LeaderWorkerSet":
        spec = workload["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    else:
        spec = workload["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = spec["containers"]
    return containers
