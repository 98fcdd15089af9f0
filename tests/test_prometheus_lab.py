"""A real Prometheus server (Debian's) scrapes a lab run: the controller and
two site agents, with the rules of deploy/prometheus loaded. After the run
(a refused announcement, a failed login, voice traffic, an uplink cut)
every query of every Grafana dashboard and every rule returns data through
Prometheus's HTTP API (so no panel points at a series that does not exist),
and the path-down alert fires for the cut paths."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from patronus.lab.net import Lab
from patronus.netns import socket_in
from patronus.wireguard.keys import write_secret_file

from .controller_server import Controller
from .netns import require_xdp, unique

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "patronus.rules.yml"
PROM = f"http://{Lab.CONTROLLER_HOST}:9090"
sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
import dashboards  # noqa: E402  (deploy/grafana/dashboards.py: the panels' queries)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"),
                                reason="needs root and wireguard-go")


def rule_queries() -> list[str]:
    """Each recording rule's expression, and each alert's with its threshold
    taken off (the series it compares must exist; the comparison holds only
    while something is wrong)."""
    out = []
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            expr = r["expr"]
            if "alert" in r:
                expr = re.split(r"\s(?:==|!=|>=|<=|>|<)\s", expr)[0]
            out.append(expr)
    return out


def wait(what: str, cond: Any, timeout: float, context: Any = lambda: "") -> Any:
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"{what}: not after {timeout:g} s\n{context()}")
        time.sleep(0.5)


def test_prometheus_scrapes_a_lab_run_every_query_answers_and_the_path_down_alert_fires(tmp_path):
    if not shutil.which("prometheus"):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("prometheus not installed (apt-get install prometheus)")
    require_xdp()
    lab = Lab(unique("P")[:6], sites=2, uplinks=2, state_dir=tmp_path)
    ctl: Controller | None = None
    prom: subprocess.Popen[bytes] | None = None
    try:
        lab.up(tunnels=False)
        ns = lab.add_controller_net()
        mesh = lab.mesh
        token = tmp_path / "metrics.token"
        write_secret_file(token, b"scrape-" + os.urandom(16).hex().encode())
        ctl = Controller(tmp_path / "ctl", netns=ns, listen="0.0.0.0:8443",
                         url=f"https://{Lab.CONTROLLER_HOST}:8443").start()
        admin = ctl.login("admin", ctl.admin_password)["access_token"]
        with ctl.client(admin) as a:
            for site in mesh.sites:
                a.post("/api/v1/sites", json=site.to_dict()).raise_for_status()
            a.post("/api/v1/policies", json={"name": "voip", "priority": 10, "app": "voip", "prefer": ["u0"],
                                             "match": {"proto": "udp", "dst_ports": "5060"}}).raise_for_status()
            key = a.post("/api/v1/api-keys", json={"name": "prometheus", "role": "viewer"}).raise_for_status().json()
            enrol = {x.name: a.post("/api/v1/tokens", json={"site": x.name}).raise_for_status().json()["token"]
                     for x in mesh.sites}
        # the agents take their desired state from the controller; off loopback their metrics
        # endpoint needs the bearer token: Prometheus has it
        lab.start_agents(backend="xdp", controller=f"https://{Lab.CONTROLLER_WAN}:8443", tokens=enrol,
                         extra=["--metrics-listen", "0.0.0.0:9464", "--metrics-token-file", str(token)])
        lab.wait_agents()
        with ctl.client("not-a-token") as c:   # a refused announcement, counted by route and status
            assert c.post("/api/v1/agent/announce", json={}).status_code == 401
        with ctl.client() as c:                # a failed login
            assert c.post("/api/v1/auth/login", json={"name": "admin", "password": "wrong"}).status_code == 401
        keyfile = tmp_path / "controller.key"
        write_secret_file(keyfile, key["secret"].encode())

        conf = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "patronus-controller", "scheme": "https",
                 "authorization": {"credentials_file": str(keyfile)},
                 "tls_config": {"ca_file": ctl.cert}, "static_configs": [{"targets": ["127.0.0.1:8443"]}]},
                {"job_name": "patronus-agent", "authorization": {"credentials_file": str(token)},
                 # by their first uplinks (the routes back to this namespace leave by them)
                 "static_configs": [{"targets": [f"172.16.{s}.2:9464" for s in range(2)]}]},
            ]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
        plog = open(tmp_path / "prometheus.log", "w")   # noqa: SIM115 - closed below
        prom = subprocess.Popen(["ip", "netns", "exec", ns, "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--web.listen-address=0.0.0.0:9090"],
                                stdout=plog, stderr=subprocess.STDOUT)
        api = httpx.Client(base_url=PROM, timeout=10)

        def context() -> str:
            return (tmp_path / "prometheus.log").read_text()[-3000:] + "\n" + lab.agent_logs(10)

        def ready() -> bool:
            assert prom is not None and prom.poll() is None, context()
            try:
                return api.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait("Prometheus ready", ready, 60, context)

        def targets_up() -> bool:
            active = api.get("/api/v1/targets").json()["data"]["activeTargets"]
            return len(active) == 3 and all(t["health"] == "up" for t in active)

        wait("every target scraped", targets_up, 60,
             lambda: str(api.get("/api/v1/targets").json()["data"]["activeTargets"]) + context())
        # voice through the policy: per-policy counters move
        tx = socket_in(lab.lan_ns(0), socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(50):
            tx.sendto(i.to_bytes(4, "big") + bytes(160), (lab.lan_addr(1), 5060))
        tx.close()

        # the cut: s0's second uplink drops everything; the paths over it go down at both ends
        lab.set_loss(0, 1, 100)

        def path_down_firing() -> list[dict]:
            alerts = api.get("/api/v1/alerts").json()["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "PatronusPathDown" and a["state"] == "firing"]

        firing = wait("PatronusPathDown firing", path_down_firing, 90, context)
        cut = {p.id for p in mesh.paths() if "s0.u1" in p.id}
        assert {a["labels"]["path"] for a in firing} <= cut and firing

        def query(expr: str) -> list[Any]:
            r = api.get("/api/v1/query", params={"query": expr}).json()
            assert r["status"] == "success", (expr, r)
            return r["data"]["result"]

        queries = sorted(set(dashboards.expressions() + rule_queries()))
        wait("every dashboard and rule query answered", lambda: all(query(q) for q in queries), 90,
             lambda: "no data: " + ", ".join(q for q in queries if not query(q)) + "\n" + context())
        lab.set_loss(0, 1, 0)
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(20)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        if ctl is not None:
            ctl.stop()
        lab.down()
