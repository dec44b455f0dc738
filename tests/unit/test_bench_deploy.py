"""The Locust master/worker manifest (``deploy/locust/locust.yaml``): valid Kubernetes,
and its parts agree (workers find the master's Service, the master waits for them all)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy/locust/locust.yaml"
K8S = "1.30.0"


def docs() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(MANIFEST.read_text())}


def test_every_document_is_valid_kubernetes() -> None:
    found = docs()
    assert len(found) == 3
    assert {kind for kind, _ in found} == {"Service", "Job"}
    for doc in found.values():
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_workers_reach_the_master_and_the_master_waits_for_all_of_them() -> None:
    found = docs()
    service = found["Service", "weir-locust-master"]
    master = found["Job", "weir-locust-master"]
    workers = found["Job", "weir-locust-workers"]
    port = service["spec"]["ports"][0]["port"]
    pod = master["spec"]["template"]
    assert all(pod["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    master_args = " ".join(pod["spec"]["containers"][0]["args"]).split()
    assert master_args[master_args.index("--master-port") + 1] == str(port)
    expected = int(master_args[master_args.index("--expect-workers") + 1])
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] == expected
    worker = workers["spec"]["template"]["spec"]["containers"][0]["command"]
    assert worker[worker.index("--master-host") + 1] == service["metadata"]["name"]
    assert worker[worker.index("--master-port") + 1] == str(port)
    assert worker[worker.index("-f") + 1] == "/opt/weir/bench/locustfile.py"
    # the image the manifest names is the one deploy/locust/Dockerfile builds: bench/ in it
    dockerfile = (ROOT / "deploy/locust/Dockerfile").read_text()
    assert "COPY bench ./bench" in dockerfile
    assert "WORKDIR /opt/weir" in dockerfile
