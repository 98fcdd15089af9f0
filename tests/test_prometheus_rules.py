"""The Prometheus rules shipped in deploy/prometheus: valid (`promtool check
rules`) and doing what their unit tests say (`promtool test rules`), and the
example configuration loads them (`promtool check config`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


@pytest.fixture
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("promtool not installed (apt-get install prometheus)")
    return exe


def test_the_rules_are_valid(promtool):
    r = subprocess.run([promtool, "check", "rules", str(DIR / "patronus.rules.yml")], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_the_rules_unit_tests_pass(promtool):
    r = subprocess.run([promtool, "test", "rules", str(DIR / "tests" / "patronus.rules.test.yml")],
                       capture_output=True, text=True, cwd=DIR / "tests")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_unit_test(promtool):
    import yaml

    rules = yaml.safe_load((DIR / "patronus.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DIR / "tests" / "patronus.rules.test.yml").read_text())
    tested = {a["alertname"] for t in tests["tests"] for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert alerts - tested == set(), "alerts without a test that makes them fire"


def test_the_example_configuration_loads_the_rules(promtool, tmp_path):
    conf = (DIR / "prometheus.yml").read_text().replace("/etc/prometheus/patronus.rules.yml",
                                                        str(DIR / "patronus.rules.yml"))
    for name in ("patronus-controller.key", "patronus-controller.crt", "patronus-agent.token"):
        (tmp_path / name).write_text("x")
        conf = conf.replace(f"/etc/prometheus/{name}", str(tmp_path / name))
    (tmp_path / "prometheus.yml").write_text(conf)
    r = subprocess.run([promtool, "check", "config", "--syntax-only", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
