"""The PromQL of deploy/grafana/dashboards/*.json, split by row: a row titled "... (learner.algorithm=X)"
holds panels only a run of algorithm X fills; every other row must fill in any run."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Grafana's variables, as the tests substitute them (all runs, all rewards; rate windows of 30 scrapes).
GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "5s", "$run": ".*", "$reward": ".*"}
ALGORITHM_ROW = re.compile(r"\(learner\.algorithm=(\w+)\)")


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def dashboard_queries(algorithm: str | None = None) -> dict[str, str]:
    """{expression with Grafana variables substituted: 'dashboard / panel title'} for every target of the
    panels of rows that any run fills (algorithm None: plus the templating queries, as count by (l) (m))
    or, given an algorithm, of the rows marked for it."""
    out = {}
    for path in sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        row_algorithm = None
        for panel in dash["panels"]:
            if panel["type"] == "row":
                m = ALGORITHM_ROW.search(panel["title"])
                row_algorithm = m.group(1) if m else None
                assert not panel.get("panels"), f"{path.name}: collapsed row {panel['title']!r} (keep rows open)"
            if row_algorithm != algorithm:
                continue
            for target in panel.get("targets", []):
                out[substitute(target["expr"])] = f"{path.name} / {panel['title']}"
        if algorithm is None:
            for var in dash["templating"]["list"]:
                if var["type"] == "query":
                    m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["definition"])
                    out[f"count by ({m.group(2)}) ({m.group(1)})"] = f"{path.name} / variable {var['name']}"
    return out


def metric_names(expr: str) -> set[str]:
    """The diffrl_* series an expression reads."""
    return set(re.findall(r"\b(diffrl_\w+)\{", expr))
