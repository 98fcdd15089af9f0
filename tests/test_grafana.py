"""The Grafana dashboards in deploy/grafana: what deploy/grafana/dashboards.py
writes (regenerating gives the committed files), loadable as Grafana's
provisioning expects. That every query returns data is checked against a
real Prometheus scraping a lab run (tests/test_prometheus_lab.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
sys.path.insert(0, str(DIR))
import dashboards  # noqa: E402


def test_regenerating_gives_the_committed_files():
    files = dashboards.render()
    assert sorted(files) == sorted(p.name for p in (DIR / "dashboards").glob("*.json"))
    for name, text in files.items():
        assert (DIR / "dashboards" / name).read_text() == text, f"{name}: run python deploy/grafana/dashboards.py"


def test_the_script_writes_them():
    out = subprocess.run([sys.executable, str(DIR / "dashboards.py")], capture_output=True, text=True, check=True)
    assert "wrote 4 dashboards" in out.stdout


def test_dashboards_and_provisioning_are_well_formed():
    uids = set()
    for f in (DIR / "dashboards").glob("*.json"):
        d = json.loads(f.read_text())
        assert d["uid"] == f.stem and d["uid"] not in uids and d["title"].startswith("patronus: ")
        uids.add(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and all(p["targets"] and p["datasource"]["type"] == "prometheus"
                                                 for p in d["panels"])
        for p in d["panels"]:
            assert all(t["expr"].strip() and t["refId"] for t in p["targets"])
    assert {"patronus-overview", "patronus-paths", "patronus-policies", "patronus-security"} == uids
    prov = yaml.safe_load((DIR / "provisioning" / "dashboards" / "patronus.yml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"
    ds = yaml.safe_load((DIR / "provisioning" / "datasources" / "patronus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
