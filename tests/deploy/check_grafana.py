"""Check a Grafana dashboard offline (`make deploy-check`): its shape, every query parses
as PromQL, and every metric it reads is one the worker exports (worker/metrics.py), so a
renamed metric fails here, not in front of an operator looking at empty panels."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import promql_parser
from prometheus_client import REGISTRY

import vlmq.worker.metrics  # noqa: F401  # registers the worker's metrics

PANEL_TYPES = {"stat", "timeseries", "gauge", "table", "bargauge"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def exported() -> set[str]:
    """Every series name the worker's metrics expose (counters' _total, histograms' parts)."""
    names = set()
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            names.add(sample.name)
        names.add(metric.name)
        if metric.type == "histogram":
            names |= {f"{metric.name}_{s}" for s in ("bucket", "sum", "count")}
        if metric.type == "counter":
            names.add(f"{metric.name}_total")
    return names


def metrics_in(node: Any) -> set[str]:
    """The metric names a parsed PromQL expression reads."""
    found = set()
    if isinstance(node, promql_parser.VectorSelector) and node.name:
        found.add(node.name)
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            found |= metrics_in(child)
    for child in getattr(node, "args", None) or []:
        found |= metrics_in(child)
    return found


def check(path: Path) -> list[str]:
    dash = json.loads(path.read_text())
    problems = [
        f"missing {k}" for k in ("title", "uid", "panels", "schemaVersion", "templating") if k not in dash
    ]
    known = exported()
    ids = [p.get("id") for p in dash.get("panels", [])]
    if len(ids) != len(set(ids)):
        problems.append("panel ids repeat")
    for p in dash.get("panels", []):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        if p.get("type") not in PANEL_TYPES or p.get("datasource") != DATASOURCE or "gridPos" not in p:
            problems.append(f"{where}: needs a known type, the ${{datasource}} variable and a gridPos")
        for t in p.get("targets") or [None]:
            if t is None or not t.get("expr"):
                problems.append(f"{where}: a target without a query")
                continue
            expr = t["expr"].replace("$__rate_interval", "5m")
            try:
                unknown = metrics_in(promql_parser.parse(expr)) - known
            except Exception as exc:  # the parser's own error type: not exported by the package
                problems.append(f"{where}: {expr!r} does not parse: {exc}")
                continue
            if unknown:
                problems.append(f"{where}: reads metrics the worker does not export: {sorted(unknown)}")
    return problems


if __name__ == "__main__":
    bad = {p: check(Path(p)) for p in sys.argv[1:]}
    for path, problems in bad.items():
        for problem in problems:
            print(f"{path}: {problem}")
    sys.exit(1 if any(bad.values()) else 0)
