"""Write the Grafana dashboards of patronus (deploy/grafana/dashboards/*.json)
from the panel lists below: `python deploy/grafana/dashboards.py`.

The JSON files are committed; tests/test_grafana.py requires that running
this again gives them byte for byte, that every panel's query is one the
Prometheus rules or the exporters make, and (with a Prometheus server
scraping a lab run) that each returns data. Grafana loads them through
deploy/grafana/provisioning/ as they are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# (title, unit, kind, [(expr, legend)]) per panel; kind: timeseries or stat
DASHBOARDS: dict[str, dict[str, Any]] = {
    "patronus-overview": {
        "title": "patronus: network overview",
        "panels": [
            ("Paths up", "none", "stat", [("patronus:paths_up:sum", "up"), ("patronus:paths:count", "paths")]),
            ("Sites by status", "none", "stat", [("patronus_controller_sites", "{{status}}")]),
            ("Agents connected to the controller", "none", "stat",
             [("patronus_controller_connected_agents", "agents")]),
            ("BFD up per path", "none", "timeseries", [("patronus:path_bfd_up:min", "{{path}}")]),
            ("Failover moves per second", "ops", "timeseries",
             [("patronus:failover_moves:rate5m", "{{instance}}")]),
            ("Traffic by policy", "Bps", "timeseries", [("sum by (policy) (patronus:dataplane_bytes:rate1m)",
                                                         "{{policy}}")]),
        ],
    },
    "patronus-paths": {
        "title": "patronus: path performance",
        "panels": [
            ("Round-trip time", "s", "timeseries", [("patronus_path_rtt_seconds", "{{path}}")]),
            ("Jitter", "s", "timeseries", [("patronus_path_jitter_seconds", "{{path}}")]),
            ("Loss", "percentunit", "timeseries", [("patronus_path_loss_ratio", "{{path}}")]),
            ("MOS", "none", "timeseries", [("patronus_path_mos", "{{path}}")]),
            ("SLA met, by application", "none", "timeseries", [("patronus_path_sla_met", "{{path}} {{app}}")]),
            ("BFD Downs in the last hour", "none", "timeseries",
             [("increase(patronus_path_bfd_downs_total[1h])", "{{path}}")]),
        ],
    },
    "patronus-policies": {
        "title": "patronus: application and policy performance",
        "panels": [
            ("Bytes per second by policy", "Bps", "timeseries",
             [("patronus:dataplane_bytes:rate1m", "{{instance}} {{policy}}")]),
            ("Packets per second by policy", "pps", "timeseries",
             [("sum by (policy) (rate(patronus_dataplane_packets_total[1m]))", "{{policy}}")]),
            ("Live flows and table size", "none", "timeseries",
             [("patronus_dataplane_flows", "{{instance}} flows"),
              ("patronus_dataplane_flow_capacity", "{{instance}} capacity")]),
            ("Failover moves", "none", "timeseries",
             [("increase(patronus_failover_moves_total[10m])", "{{instance}}")]),
            ("Flows evicted from a full table", "ops", "timeseries",
             [("patronus:dataplane_evicted:rate5m", "{{instance}}")]),
        ],
    },
    "patronus-security": {
        "title": "patronus: security",
        "panels": [
            ("Authentication failures by reason", "ops", "timeseries",
             [("patronus:controller_auth_failures:rate5m", "{{reason}}")]),
            ("Refused agent announcements", "ops", "timeseries",
             [('sum(rate(patronus_controller_requests_total{route="/api/v1/agent/announce",status=~"4.."}[5m]))',
               "refused")]),
            ("Requests by status", "ops", "timeseries",
             [("sum by (status) (rate(patronus_controller_requests_total[5m]))", "{{status}}")]),
            ("Malformed frames by reason", "ops", "timeseries",
             [("sum by (reason) (rate(patronus_dataplane_malformed_total[5m]))", "{{reason}}")]),
            ("Agents' event-loop stalls", "none", "timeseries",
             [("increase(patronus_agent_loop_stalls_total[10m])", "{{instance}}")]),
        ],
    },
}


def panel(i: int, title: str, unit: str, kind: str, targets: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "id": i + 1, "type": kind, "title": title, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else
                   {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [{"refId": chr(ord("A") + k), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for k, (expr, legend) in enumerate(targets)],
    }


def dashboard(uid: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "uid": uid, "title": spec["title"], "tags": ["patronus"], "schemaVersion": 39, "version": 1,
        "editable": True, "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": [panel(i, *p) for i, p in enumerate(spec["panels"])],
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{uid}.json": json.dumps(dashboard(uid, spec), indent=2, sort_keys=True) + "\n"
            for uid, spec in DASHBOARDS.items()}


def expressions() -> list[str]:
    """Every query of every panel."""
    return [expr for spec in DASHBOARDS.values() for p in spec["panels"] for expr, _ in p[3]]


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
    sys.stdout.write(f"wrote {len(DASHBOARDS)} dashboards to {OUT}\n")
