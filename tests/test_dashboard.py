"""The Grafana dashboard shipped in docs/grafana/: a model Grafana 10 imports as it is,
and every metric its queries name is one a real daemon's /metrics exports, used as
its type allows (rate() of counters and histogram series, gauges as they are).

A query names series (`x_total`, `x_bucket`); /metrics declares families (`x`, a
counter). `series_of` turns each family into the series names its type gives, so a
`_count` is accepted only for a histogram that has one, never by cutting any name
that happens to end so.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.config import HttpSettings, LoggingSettings
from tests.support.data import drop_leads
from tests.support.http import http_get
from tests.support.processes import MakeRunner
from tests.support.settings import LEADS, SIM_KNOBS, fast_settings, free_port
from tests.support.simulators import MakeSimulator

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docs" / "grafana" / "marketo-orchestrator.json"
METRIC = re.compile(r"\bmarketo_orchestrator_[a-z_]+")
# A metric under one of these functions must be a counter (or a histogram's series).
RATED = re.compile(r"\b(?:rate|irate|increase)\(\s*(marketo_orchestrator_[a-z_]+)")
# The series each family type gives, as suffixes of the family's name.
SERIES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
# Variables Grafana defines itself.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
# What issue 22 asks the dashboard to show, by the metric that shows it.
TOPICS = {
    "queue slots": "marketo_orchestrator_jobs_outstanding",
    "rows per second": "marketo_orchestrator_rows_total",
    "failures": "marketo_orchestrator_marketo_errors_total",
    "API calls against the budget": "marketo_orchestrator_api_calls_total",
    "the daily quota": "marketo_orchestrator_api_calls_today",
    "the subscription's calls today": "marketo_orchestrator_subscription_api_calls_today",
    "the line past which no job is created": "marketo_orchestrator_daily_quota_limit",
    "creates paused by the quota": "marketo_orchestrator_quota_creates_paused",
    "when the quota resets": "marketo_orchestrator_quota_reset_timestamp_seconds",
    "chunks the key rule holds": "marketo_orchestrator_chunks_held",
    "backoff waits": "marketo_orchestrator_backoff_seconds_total",
    "files by status": "marketo_orchestrator_files",
}


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every query: each panel's targets and the query variables."""
    found = [(p["title"], t["expr"]) for p in query_panels(dashboard) for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["definition"]))
    return found


def series_of(metrics_text: str) -> dict[str, str]:
    """Every series name the exposition can hold -> its family's type."""
    series = {}
    for family in text_string_to_metric_families(metrics_text):
        for suffix in SERIES[family.type]:
            series[family.name + suffix] = family.type
    return series


def test_dashboard_is_a_grafana_model_importable_as_is() -> None:
    dashboard = load_dashboard()
    [source] = dashboard["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"]
    assert dashboard["id"] is None, "an id would clash with the importing Grafana's own"
    assert dashboard["schemaVersion"] >= 36
    required = {r["id"]: r for r in dashboard["__requires"]}
    assert int(required["grafana"]["version"].split(".")[0]) >= 10
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), "panel ids are unique"
    assert {p["type"] for p in panels} - {"row"} <= set(required), "__requires names each panel"

    cells: Counter[tuple[int, int]] = Counter()
    for panel in panels:
        pos = panel["gridPos"]
        assert min(pos["w"], pos["h"], pos["x"] + 1, pos["y"] + 1) > 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']}: the grid is 24 columns wide"
        cells.update(
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        )
    assert max(cells.values()) == 1, "no two panels overlap"

    variables = {v["name"] for v in dashboard["templating"]["list"]}
    inputs = {i["name"] for i in dashboard["__inputs"]}
    for panel in query_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["description"], f"{panel['title']}: say what it shows"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs, panel["title"]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()
    text = DASHBOARD.read_text(encoding="utf-8")
    for name in re.findall(r"\$\{([A-Za-z0-9_]+)\}", text):
        assert name in inputs | variables, f"${{{name}}} is defined nowhere"
    for title, expr in exprs(dashboard):
        for name in re.findall(r"\$(\w+)", expr):
            assert name in variables | GRAFANA_VARIABLES, f"{title}: ${name} is defined nowhere"
        for opening, closing in ("()", "[]", "{}"):
            assert expr.count(opening) == expr.count(closing), f"{title}: {expr}"

    used = {name for _, expr in exprs(dashboard) for name in METRIC.findall(expr)}
    for topic, metric in TOPICS.items():
        assert metric in used, f"no panel shows {topic} ({metric})"


async def test_every_metric_the_dashboard_queries_is_in_a_real_metrics(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    port = free_port()
    settings = replace(
        fast_settings(sim.base_url, tmp_path / "data", (LEADS,)),
        http=HttpSettings(listen=f"127.0.0.1:{port}"),
        logging=LoggingSettings(format="json", level="info"),
    )
    drop_leads(settings.data_dir, "seen.csv", 30, bad={3})
    daemon = await daemons(settings).daemon()
    await daemon.wait_for_event("file_finished")
    async with aiohttp.ClientSession() as session:
        status, text = await http_get(session, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    daemon.terminate()
    assert await daemon.wait() == 0

    exported = series_of(text)
    assert exported["marketo_orchestrator_rows_total"] == "counter"
    for title, expr in exprs(load_dashboard()):
        named = METRIC.findall(expr)
        assert named or "vector(" in expr, f"{title}: {expr} names no metric"
        for name in named:
            assert name in exported, f"{title}: {name} is not in /metrics"
        rated = set(RATED.findall(expr))
        for name in rated:
            assert exported[name] in ("counter", "histogram"), f"{title}: rate() of {name}"
        for name in set(named) - rated:
            assert exported[name] == "gauge", f"{title}: {name} is a counter: rate() it"
