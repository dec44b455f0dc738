"""Alert rules, the Prometheus config and the dashboard, held to what the gateway exports.

``promtool`` (Debian's ``prometheus`` package; ``.ci/run`` installs it) checks the rules
and the config; every PromQL expression, in the rules and the dashboard, may name only
metrics the gateway registers (``Metrics.create()``) or vLLM exports (``vllm:*``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.observe import metrics as ours
from serving.observe.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules/weir.rules.yml"
CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
BOARD = ROOT / "deploy/grafana/weir.json"
INSTALL = "promtool is missing: install it with `apt-get install -y prometheus` (Debian/Ubuntu)"
# PromQL words that look like names but are not metrics
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "inf", "nan"}  # fmt: skip
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("", "_count", "_sum"), "gauge": ("",)}  # fmt: skip


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(INSTALL)
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=60, check=False)


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_exprs() -> list[str]:
    return [str(rule["expr"]) for rule in rules()]


def board_exprs() -> list[str]:
    board = json.loads(BOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", var["definition"]))
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, grouping, ranges,
    function calls and keywords taken out)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings ($model, regexes)
    bare = re.sub(r"\{[^}]*\}", " ", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", " ", bare)  # ranges
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    words = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", bare)
    return {w for w in words if w.lower() not in KEYWORDS}


def exported() -> set[str]:
    """Every series name the gateway's registry can expose, children or not."""
    names: set[str] = set()
    for family in Metrics.create().registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def vllm_names() -> set[str]:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None
    assert spec.submodule_search_locations
    loggers = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    found = set(re.findall(r'"(vllm:[a-z_:]+)"', loggers.read_text()))
    assert found
    return found


def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_checks_the_config_and_it_loads_the_rules() -> None:
    assert "rules/weir.rules.yml" in yaml.safe_load(CONFIG.read_text())["rule_files"]
    done = promtool("check", "config", str(CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel's query, its variables set to All, as a recording rule promtool parses."""
    exprs = [e.replace("$model", ".*").replace("$version", ".*") for e in board_exprs()]
    records = [{"record": f"weir:dashboard:{n}", "expr": e} for n, e in enumerate(exprs)]
    checked = tmp_path / "dashboard.rules.yml"
    checked.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    done = promtool("check", "rules", str(checked))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(records)} rules found" in done.stdout


def test_the_parser_finds_names_and_only_names() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, model) (rate(weir_queue_wait_seconds_bucket"
        '{model=~"$model", x="a{b}"}[5m]))) > 0.5 and on (model) vllm:kv_cache_usage_perc'
        " / ignoring (le) sum without (type) (tokens_used_total offset 5m) or 1e3 + Inf"
    )
    assert metric_names(expr) == {
        "weir_queue_wait_seconds_bucket", "vllm:kv_cache_usage_perc", "tokens_used_total"
    }  # fmt: skip


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_expression_names_only_exported_metrics(source: str) -> None:
    exprs = rule_exprs() if source == "rules" else board_exprs()
    ours_ = exported()
    engines = vllm_names()
    queried = set().union(*(metric_names(e) for e in exprs))
    assert queried
    unknown = set()
    for name in sorted(queried):
        if name.startswith("vllm:"):
            # counters are exposed with _total; vLLM names them without it
            base = re.sub(r"(_total|_bucket|_count|_sum)$", "", name)
            if name not in engines and base not in engines:
                unknown.add(name)
        elif name not in ours_:
            unknown.add(name)
    assert not unknown, f"{source} query metrics nobody exports: {sorted(unknown)}"


def test_every_alert_names_a_runbook_that_exists() -> None:
    alerts = [r for r in rules() if "alert" in r]
    wanted = {"WeirHighErrorRate", "WeirTTFTHigh", "WeirBreakerOpen", "WeirQueueSaturated",
              "WeirQueueRejecting", "WeirRedisUnavailable"}  # fmt: skip
    assert wanted <= {a["alert"] for a in alerts}
    for alert in alerts:
        annotations = alert["annotations"]
        assert isinstance(annotations, dict)
        runbook = annotations["runbook"]
        assert re.fullmatch(r"docs/runbooks/[\w-]+\.md", runbook), runbook
        assert (ROOT / runbook).is_file(), runbook
        assert alert["labels"]["severity"] in ("warning", "critical")  # type: ignore[index]


def test_the_dashboard_filters_by_model_and_version() -> None:
    board = json.loads(BOARD.read_text())
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "model", "version"]
    titles = {p["title"]: [t["expr"] for t in p["targets"]] for p in board["panels"]}
    for expr in titles["Errors/s by type"] + titles["Gateway TTFT p50 / p95 / p99 by version"]:
        assert 'model=~"$model"' in expr, expr
        assert 'model_version=~"$version"' in expr, expr
        assert "model_version" in expr.split("sum by (")[1].split(")")[0], expr


def test_gateway_timings_resolve_milliseconds_and_the_overlays_stay_vllms() -> None:
    metrics = Metrics.create()
    for histogram in (metrics.duration, metrics.queue_wait):
        bounds = histogram._upper_bounds
        assert bounds[:4] == [0.0005, 0.001, 0.0025, 0.005]
        assert bounds[-2] == 600.0
        assert all(b / a <= 2.5 for a, b in itertools.pairwise(bounds[:-1]))  # to +Inf
    assert metrics.ttft._upper_bounds[:-1] == list(ours.TTFT_BUCKETS)
    assert metrics.itl._upper_bounds[:-1] == list(ours.ITL_BUCKETS)
    # a 2 ms embedding reads as milliseconds, not as vLLM's lowest bucket (0.3 s)
    metrics.duration.labels("m", "v", "/v1/embeddings", "false").observe(0.002)
    le = {
        s.labels["le"]: s.value
        for f in metrics.registry.collect()
        if f.name == "weir_request_duration_seconds"
        for s in f.samples
        if s.name.endswith("_bucket")
    }
    assert le["0.001"] == 0
    assert le["0.0025"] == 1
