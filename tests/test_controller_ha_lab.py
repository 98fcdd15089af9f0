"""High availability in the lab (issue 22): three sites with real agents
(``patronus agent``, WireGuard tunnels through wireguard-go), three
controller replicas and a 3-member etcd cluster in the controller's
namespace. The agents are given every controller address, the leader's
first; the leader is killed with SIGKILL in the middle of a stream of
policy changes: every agent moves to another replica, forwarding never
stops, every acknowledged change stays and the next change reaches every
data plane through the survivors.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

from patronus.lab.net import Lab  # noqa: E402

from .controller_server import Controller, Replicas  # noqa: E402
from .etcd_cluster import EtcdCluster, missing  # noqa: E402
from .netns import unique  # noqa: E402
from .test_mesh_forwarding import _raw_ping, icmp  # noqa: E402

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"),
                                 reason="needs root and wireguard-go"),
              pytest.mark.root, pytest.mark.slow]

PREFIX = "/api/v1"
SITES, UPLINKS = 3, 2
PORTS = (8443, 8444, 8445)
READY_S = 150.0
EVENT_S = 60.0


class HaLab(Replicas):
    def __init__(self, lab: Lab, base: Path) -> None:
        super().__init__()
        self.lab, self.base = lab, base
        self.etcd: EtcdCluster | None = None
        self.password = ""

    def start(self) -> HaLab:
        ns = self.lab.controller_ns
        self.etcd = EtcdCluster(self.base, 3, host=Lab.CONTROLLER_HOST, netns=ns).start()
        first = self.base / "r0"
        for i, port in enumerate(PORTS):
            d = self.base / f"r{i}"
            if i:
                shutil.copytree(first, d)   # the same signing key and certificate on every replica
            c = Controller(d, netns=ns, listen=f"0.0.0.0:{port}", url=f"https://{Lab.CONTROLLER_HOST}:{port}",
                           store=self.etcd.url if i == 0 else None, args=["--log-level", "info"])
            self.password = self.password or c.admin_password
            self.ctls.append(c)
        for c in self.ctls:
            c.start()
        for i, c in enumerate(self.ctls):
            self.tokens[i] = c.login("admin", self.password)["access_token"]
        return self

    def status(self, s: int) -> dict[str, Any]:
        st = self.lab.agent_status(s)
        assert st is not None, f"no status file for s{s}"
        return st

    def context(self) -> str:
        out = []
        for s in range(SITES):
            st = self.lab.agent_status(s) or {}
            out.append(f"s{s} version {st.get('version')} controller {st.get('controller')}")
        for i, c in enumerate(self.ctls):
            if c.log.exists():
                out.append(f"--- r{i} log:\n" + c.log.read_text(errors="replace")[-1500:])
        return "\n".join(out) + "\n" + self.lab.agent_logs(15)

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = EVENT_S) -> Any:
        end = time.monotonic() + timeout
        while True:
            for s, p in self.lab.agents.items():
                if p.poll() is not None:
                    pytest.fail(f"agent s{s} exited rc={p.returncode}\n{self.context()}")
            v = cond()
            if v is not None and v is not False:
                return v
            if time.monotonic() > end:
                pytest.fail(f"{what}: not after {timeout:g} s\n{self.context()}")
            time.sleep(0.1)

    def voip_uplinks(self, s: int) -> set[str]:
        out = set()
        for r in self.status(s)["routes"]:
            if r["class"] == "voip" and r["path"] is not None:
                p = self.lab.mesh.path(r["path"])
                out.add(p.local_uplink if p.local_site == f"s{s}" else p.remote_uplink)
        return out

    def stop(self) -> None:
        for c in self.ctls:
            c.stop()
        if self.etcd is not None:
            self.etcd.stop()


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[HaLab]:
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    lab = Lab(unique("J")[:6], sites=SITES, uplinks=UPLINKS, state_dir=tmp_path)
    h = HaLab(lab, tmp_path)
    try:
        lab.up(tunnels=False)
        lab.add_controller_net()
        yield h.start()
    finally:
        try:
            if lab.agents:
                lab.stop_agents()
        finally:
            h.stop()
            lab.down()


def set_prefer(h: HaLab, i: int, uplink: str) -> int:
    """PUT the voip policy preferring ``uplink`` through replica ``i`` (If-Match); the HTTP status."""
    with h.client(i) as a:
        r = a.get(f"{PREFIX}/policies/voip").raise_for_status()
        return a.put(f"{PREFIX}/policies/voip", json={**r.json(), "prefer": [uplink]},
                     headers={"If-Match": r.headers["etag"]}).status_code


def test_agents_move_to_another_replica_and_traffic_flows_when_the_leader_dies(ha: HaLab,
                                                                             record_property: Any) -> None:
    lab = ha.lab
    with ha.client(1) as a:
        for site in lab.mesh.sites:
            a.post(f"{PREFIX}/sites", json=site.to_dict()).raise_for_status()
        a.post(f"{PREFIX}/policies", json={"name": "voip", "priority": 10, "app": "voip", "prefer": ["u0"],
                                            "match": {"proto": "udp", "dst_ports": "5060-5061,10000-20000"}}
               ).raise_for_status()
        a.post(f"{PREFIX}/policies", json={"name": "bulk", "priority": 20, "match": {"proto": "tcp",
                                                                                   "dst_ports": "30000"}}
               ).raise_for_status()
        r = a.get(f"{PREFIX}/failover").raise_for_status()
        a.put(f"{PREFIX}/failover", json={**r.json(), "failback_hold_s": 2, "cooldown_s": 0.5,
                                          "damp_half_life_s": 3}, headers={"If-Match": r.headers["etag"]}
              ).raise_for_status()
    with ha.client(2) as a:   # tokens from another replica: one store
        tokens = {s.name: a.post(f"{PREFIX}/tokens", json={"site": s.name}).raise_for_status().json()["token"]
                  for s in lab.mesh.sites}
    leader = ha.wait("one leader among the replicas", ha.leader)
    order = [leader] + [i for i in range(len(PORTS)) if i != leader]
    urls = ",".join(f"https://{Lab.CONTROLLER_WAN}:{PORTS[i]}" for i in order)
    lab.start_agents(backend="auto", controller=urls, tokens=tokens)
    lab.wait_agents(READY_S)
    killed_url = f"https://{Lab.CONTROLLER_WAN}:{PORTS[leader]}"
    ha.wait("every agent on the leader's channel", lambda: all(
        ha.status(s)["controller"]["connected"] and ha.status(s)["controller"]["url"] == killed_url
        for s in range(SITES)))
    for s in range(SITES):
        for d in range(SITES):
            if s != d:
                assert icmp(lab, s, d) is None, f"s{s} -> s{d}\n{ha.context()}"
    ha.wait("voip over u0 everywhere", lambda: all(ha.voip_uplinks(s) == {"u0"} for s in range(SITES)))

    # forwarding, watched across the kill: echo requests from s0 to s1 every 200 ms, in batches of 5
    pinging = threading.Event()
    echoes = [0, 0]   # sent, answered

    def ping() -> None:
        while not pinging.is_set():
            echoes[1] += _raw_ping(lab.lan_ns(0), lab.lan_addr(1), 5)
            echoes[0] += 5

    pinger = threading.Thread(target=ping)
    pinger.start()
    acked: list[str] = []
    try:
        # a stream of policy changes through the replicas; the leader dies in the middle of it
        stream_stop = threading.Event()
        errors: list[str] = []

        # (each change rewrites the bulk policy's ports: the data planes take it in place; a policy added
        # or removed re-opens the data plane, which is not what this test is about)
        def stream() -> None:
            n = 0
            while not stream_stop.is_set():
                for i in ha.alive():
                    ports = str(30000 + n)
                    try:
                        with ha.client(i) as a:
                            r = a.get(f"{PREFIX}/policies/bulk", timeout=10)
                            r = a.put(f"{PREFIX}/policies/bulk", json={**r.json(), "match": {
                                "proto": "tcp", "dst_ports": ports}}, headers={"If-Match": r.headers["etag"]},
                                timeout=10)
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 200:
                        acked.append(ports)
                    else:
                        errors.append(f"r{i}: {r.status_code} {r.text[:200]}")
                    break
                n += 1
                stream_stop.wait(0.2)

        writer = threading.Thread(target=stream)
        writer.start()
        try:
            ha.wait("changes flowing", lambda: len(acked) >= 5)
            t_kill = time.monotonic()
            ha.ctls[leader].proc.kill()
            ha.ctls[leader].proc.wait(10)
            moved = ha.wait("every agent on another replica's channel", lambda: all(
                ha.status(s)["controller"]["connected"] and ha.status(s)["controller"]["url"] != killed_url
                for s in range(SITES)))
            reconnect_s = time.monotonic() - t_kill
            new_leader = ha.wait("the leader role moved", lambda: (lambda x: x if x not in (None, leader)
                                                                   else None)(ha.leader()))
            leader_s = time.monotonic() - t_kill
            n0 = len(acked)
            ha.wait("changes flowing after the kill", lambda: len(acked) >= n0 + 5)
        finally:
            stream_stop.set()
            writer.join(60)
        assert moved and not errors, errors[:5]
        record_property("agents_reconnect_s", round(reconnect_s, 3))
        record_property("leader_moved_s", round(leader_s, 3))
        print(f"SIGKILL of r{leader}: every agent on another replica after {reconnect_s * 1000:.0f} ms, "
              f"leader r{new_leader} after {leader_s * 1000:.0f} ms; {len(acked)} changes acknowledged")
    finally:
        pinging.set()
        pinger.join(30)
    sent, got = echoes
    record_property("echoes_lost", sent - got)
    print(f"forwarding across the kill: {got} of {sent} echo replies")
    assert sent >= 20 and got >= sent - 1, f"{got} of {sent} echo replies\n{ha.context()}"

    # every acknowledged change is kept (the last one is what every replica has, each one is in the
    # audit log), and the next one reaches every data plane through the survivors
    for i in ha.alive():
        with ha.client(i) as a:
            assert a.get(f"{PREFIX}/policies/bulk").raise_for_status().json()["match"]["dst_ports"] == acked[-1]
            audit = a.get(f"{PREFIX}/audit", params={"limit": 1000}).raise_for_status().json()["items"]
            audited = [x["after"]["match"]["dst_ports"] for x in audit
                       if x["action"] == "policy.replace" and x["target"] == "policy/bulk" and x["ok"]]
            assert set(acked) <= set(audited)
    before = {s: ha.status(s)["version"] for s in range(SITES)}
    survivor = next(i for i in ha.alive() if i != new_leader)
    assert set_prefer(ha, survivor, "u1") == 200
    ha.wait("voip on u1 everywhere after the kill", lambda: all(
        ha.status(s)["version"] != before[s] and ha.voip_uplinks(s) == {"u1"} for s in range(SITES)))
    for d in (1, 2):
        assert icmp(lab, 0, d) is None, f"s0 -> s{d}\n{ha.context()}"
