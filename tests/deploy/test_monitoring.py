"""Alerts and the Grafana dashboard only use metrics that spool/metrics.py defines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from spool import metrics
from tests.deploy.conftest import DOCKER

ALERTS = DOCKER / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboard.json"
PROMETHEUS = DOCKER / "prometheus.yml"
NAME = re.compile(r"\bspool_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return exprs


@pytest.fixture(scope="module")
def exposed_types() -> dict[str, str]:
    """Family name -> type, as a single process exposes them (`# TYPE` lines of render())."""
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    code = "import sys; from spool import metrics; sys.stdout.buffer.write(metrics.render()[0])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=60
    ).stdout.decode()
    types = dict(re.findall(r"^# TYPE (spool_\S+) (\S+)$", out, flags=re.MULTILINE))
    # prometheus-client's creation-time series of unlabelled counters and histograms.
    return {name: kind for name, kind in types.items() if not name.endswith("_created")}


def _known(name: str, types: dict[str, str]) -> bool:
    if name in metrics.ALL_METRIC_NAMES:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return True
    return False


def test_all_metric_names_match_what_render_exposes(exposed_types: dict[str, str]) -> None:
    # LiveCollector families only appear once the API registers one; the rest always do.
    live = {name for name, _, _ in metrics.LIVE_METRICS.values()} | {metrics.LIVE_SOURCE_UP}
    assert set(exposed_types) == metrics.ALL_METRIC_NAMES - live


@pytest.mark.parametrize(
    ("source", "exprs"), [("alerts", _alert_exprs()), ("dashboard", _dashboard_exprs())]
)
def test_every_referenced_metric_exists(
    source: str, exprs: list[str], exposed_types: dict[str, str]
) -> None:
    assert exprs, f"no expressions found in the {source}"
    unknown = {n for expr in exprs for n in NAME.findall(expr) if not _known(n, exposed_types)}
    assert not unknown, f"{source} uses metrics spool/metrics.py does not define: {sorted(unknown)}"


def test_histogram_suffixes_only_on_histograms(exposed_types: dict[str, str]) -> None:
    for expr in _alert_exprs() + _dashboard_exprs():
        for name in NAME.findall(expr):
            if name.endswith("_bucket"):
                assert exposed_types.get(name.removesuffix("_bucket")) == "histogram", name


def test_every_metric_is_watched_somewhere() -> None:
    used = {n for e in _alert_exprs() + _dashboard_exprs() for n in NAME.findall(e)}
    bases = {n.removesuffix(s) for n in used for s in HISTOGRAM_SUFFIXES if n.endswith(s)}
    missing = metrics.ALL_METRIC_NAMES - used - bases
    assert not missing, f"neither a panel nor an alert uses {sorted(missing)}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    uids = {d["uid"] for d in datasources}
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# --- promtool, when installed (Debian package `prometheus`) ----------------------------


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return binary


def _run(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_accepts_rules_and_config(tmp_path: Path) -> None:
    promtool = _promtool()
    _run(promtool, "check", "rules", str(ALERTS))
    config = PROMETHEUS.read_text().replace("/etc/prometheus/alerts.yml", str(ALERTS))
    (tmp_path / "prometheus.yml").write_text(config)
    _run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    promtool = _promtool()
    rules: list[dict[str, Any]] = []
    for i, expr in enumerate(_dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        # Grafana's variables, replaced by what they expand to at query time.
        expr = expr.replace("$__rate_interval", "5m").replace("$model", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    _run(promtool, "check", "rules", str(tmp_path / "dash.yml"))


ALERT_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'spool_jobs_queued{{model="tiny-sd", instance="api-1"}}'
        values: '3x20'
      - series: 'spool_jobs_queued{{model="tiny-sd", instance="api-2"}}'
        values: '3x20'
      - series: 'spool_workers_online{{model="tiny-sd", instance="api-1"}}'
        values: '0x20'
      - series: 'spool_jobs_queued{{model="tiny-llm", instance="api-1"}}'
        values: '5x20'
      - series: 'spool_workers_online{{model="tiny-llm", instance="api-1"}}'
        values: '1x20'
      - series: 'spool_http_requests_total{{endpoint="/v1/jobs", method="POST", status="202"}}'
        values: '0+100x20'
      - series: 'spool_http_requests_total{{endpoint="/v1/jobs", method="POST", status="503"}}'
        values: '0+50x20'
      - series: 'spool_webhook_deliveries_total{{event="job.completed", outcome="gave_up"}}'
        values: '0 0 0 1 1 1 1 1 1 1 1'
      - series: 'spool_model_out_of_memory_total{{model="tiny-sd", instance="worker-1"}}'
        values: '0 0 0 0 2 2 2 2 2 2 2'
      - series: 'spool_model_out_of_memory_total{{model="tiny-llm", instance="worker-1"}}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 10m
        alertname: SpoolNoWorkerForModel
        exp_alerts:
          - exp_labels: {{severity: critical, model: tiny-sd}}
            exp_annotations:
              summary: No worker online for model tiny-sd
              description: >-
                3 jobs are queued for tiny-sd and no worker has announced itself for it in the
                last 5 minutes.
      # 503s are a dependency outage, not a bug: SpoolApi5xx stays quiet.
      - eval_time: 10m
        alertname: SpoolApi5xx
        exp_alerts: []
      - eval_time: 10m
        alertname: SpoolApiDependencyDown
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: "API answers 503: PostgreSQL or Redis is unavailable"
      - eval_time: 5m
        alertname: SpoolWebhookGiveUps
        exp_alerts:
          - exp_labels: {{severity: warning, event: job.completed}}
            exp_annotations:
              summary: 1 job.completed webhook deliveries given up in the last hour
      - eval_time: 3m
        alertname: SpoolModelOutOfMemory
        exp_alerts: []
      - eval_time: 6m
        alertname: SpoolModelOutOfMemory
        exp_alerts:
          - exp_labels: {{severity: warning, model: tiny-sd}}
            exp_annotations:
              summary: tiny-sd ran out of GPU memory in the last 15 minutes
              description: >-
                Calls of tiny-sd ran out of device memory. Lower its max_batch_size, or its
                size and token limits, in the model registry, or give it a GPU of its own.
"""


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    promtool = _promtool()
    (tmp_path / "alerts_test.yml").write_text(ALERT_TESTS.format(alerts=json.dumps(str(ALERTS))))
    _run(promtool, "test", "rules", str(tmp_path / "alerts_test.yml"))
