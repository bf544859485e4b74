"""The Grafana dashboard and the Prometheus config agree with the metrics the services export.

Metric names are read from the registry after importing the three metrics modules, not from a
list kept here, so renaming a metric without fixing the dashboard fails this test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

import services.scheduler.metrics  # noqa: F401 - importing registers the metrics
import services.tokenizer.metrics  # noqa: F401
import services.worker.metrics  # noqa: F401

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "switchyard.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
DESIGN_PORTS = {"tokenizer": [9101], "scheduler": [9102], "worker": [9111, 9112]}

_NAME = re.compile(r"switchyard_[a-z0-9_]+")
_SERIES_SUFFIX = re.compile(r"_(bucket|sum|count|created)$")


def exported_names() -> set[str]:
    """Family names of every switchyard metric registered in this process; a counter's family
    drops `_total`, so both spellings count."""
    names = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("switchyard_"):
            names.add(family.name)
            if family.type == "counter":
                names.add(family.name + "_total")
    return names


def leaf_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Data panels, including those folded inside collapsed rows."""
    found = []
    for panel in panels:
        if panel.get("type") == "row":
            found.extend(leaf_panels(panel.get("panels", [])))
        else:
            found.append(panel)
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_a_current_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    rows = [p for p in dashboard["panels"] if p.get("type") == "row"]
    ids = [p["id"] for p in rows + leaf_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_title_a_prometheus_source_and_a_query(dashboard: dict[str, Any]) -> None:
    for row in (p for p in dashboard["panels"] if p.get("type") == "row"):
        assert row.get("title"), row
    panels = leaf_panels(dashboard["panels"])
    assert len(panels) >= 13
    for panel in panels:
        assert panel.get("title"), panel
        assert panel["datasource"]["uid"] in ("${DS_PROMETHEUS}", "prometheus"), panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), panel["title"]


def test_every_metric_in_the_dashboard_is_exported(dashboard: dict[str, Any]) -> None:
    exported = exported_names()
    assert "switchyard_generation_tokens_total" in exported and "switchyard_step_duration_seconds" in exported
    queries = [t["expr"] for p in leaf_panels(dashboard["panels"]) for t in p["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    used = {_SERIES_SUFFIX.sub("", name) for expr in queries for name in _NAME.findall(expr)}
    assert used, "no switchyard metric in any query"
    assert not used - exported, f"not exported by any service: {sorted(used - exported)}"


@pytest.mark.parametrize("topic, needle", [
    ("output token throughput", "rate(switchyard_generation_tokens_total"),
    ("TTFT quantiles", "switchyard_time_to_first_token_seconds_bucket"),
    ("ITL quantiles", "switchyard_inter_token_latency_seconds_bucket"),
    ("e2e quantiles", "switchyard_e2e_request_latency_seconds_bucket"),
    ("queue time", "switchyard_request_queue_time_seconds_bucket"),
    ("running", "switchyard_requests_running"),
    ("waiting", "switchyard_requests_waiting"),
    ("KV use", "switchyard_kv_blocks_used_ratio"),
    ("prefix hits", "switchyard_prefix_cache_hits_total"),
    ("prefix queries", "switchyard_prefix_cache_queries_total"),
    ("preemptions", "switchyard_preemptions_total"),
    ("error rate", 'finish_reason=~"abort|error"'),
    ("workers up", "switchyard_worker_up"),
    ("front door codes", "sum by (api, code) (rate(switchyard_frontend_requests_total"),
])
def test_dashboard_covers(dashboard: dict[str, Any], topic: str, needle: str) -> None:
    assert any(needle in t["expr"] for p in leaf_panels(dashboard["panels"]) for t in p["targets"]), topic


def test_latency_quantiles_are_per_pool(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in leaf_panels(dashboard["panels"]) for t in p["targets"]]
    for metric in ("time_to_first_token", "inter_token_latency"):
        for quantile in ("0.5", "0.99"):
            assert any(e.startswith(f"histogram_quantile({quantile}, sum by (pool, le)") and metric in e
                       for e in exprs), (metric, quantile)


def test_prometheus_scrapes_the_design_ports() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in config["scrape_configs"]}
    for service, ports in DESIGN_PORTS.items():
        job = next(name for name in targets if service in name)
        assert sorted(int(t.rpartition(":")[2]) for t in targets[job]) == ports, job


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [(d["type"], d["uid"]) for d in datasources] == [("prometheus", "prometheus")]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "switchyard.yml").read_text())["providers"]
    assert providers and all(p["type"] == "file" and p["options"]["path"] for p in providers)
    compose = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.compose.yml").read_text())
    assert {job["job_name"] for job in compose["scrape_configs"]} == {
        job["job_name"] for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
