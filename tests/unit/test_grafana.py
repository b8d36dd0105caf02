"""The Grafana dashboard in deploy/ reads only metrics the worker exports, in PromQL that
parses; and the checker `make deploy-check` runs does catch what it is there to catch."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import promql_parser

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "vlmq.json"
checker: dict[str, Any] = runpy.run_path(str(ROOT / "tests" / "deploy" / "check_grafana.py"))


def test_the_dashboard_passes() -> None:
    assert checker["check"](DASHBOARD) == []


def test_the_checker_finds_every_metric_a_query_reads() -> None:
    expr = "histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) / on() sum(b) + -c"
    assert checker["metrics_in"](promql_parser.parse(expr)) == {"a_bucket", "b", "c"}


def test_a_renamed_metric_or_broken_query_fails(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    dash["panels"][0]["targets"][0]["expr"] = "sum(rate(vlmq_jobs_done_total[5m]))"
    dash["panels"][1]["targets"][0]["expr"] = "sum(vlmq_consumer_lag"
    dash["panels"][2]["datasource"] = {"type": "prometheus", "uid": "prom-prod"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dash))
    problems = checker["check"](bad)
    assert any("vlmq_jobs_done_total" in p for p in problems)
    assert any("does not parse" in p for p in problems)
    assert any("datasource" in p for p in problems)
