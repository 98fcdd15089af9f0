"""The controller store: SQLite (one machine) against a 3-member etcd
cluster (replicas), in one run, on this machine's loopback.

- write: one change of the mesh through the service (a policy replaced,
  with its audit row and change event; the service's whole write path),
  and one row updated in a transaction (the store alone);
- read: the mesh as a request gets it (``Service.mesh()``: cached, checked
  current), and one row read in a read-only transaction;
- push: a policy change made on replica A until an agent's channel open on
  replica B has the new version (controller processes, real WebSocket).

p50 and p99 of each in ``extra_info`` and printed. Baseline: SQLite, same run.

Run: .venv/bin/python -m pytest benchmarks/test_bench_store.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.etcd_cluster import EtcdCluster, missing  # noqa: E402

N = int(os.environ.get("PN_STORE_OPS", "500"))
PUSHES = int(os.environ.get("PN_STORE_PUSHES", "100"))

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: Any) -> Any:
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), 3) as c:
        yield c


def open_db(engine: str, etcd: EtcdCluster, base: Path) -> Any:
    if engine == "sqlite":
        from patronus.controller.db import ControllerDB

        return ControllerDB(base / f"c-{uuid.uuid4().hex[:6]}.db")
    from patronus.controller.etcd import EtcdDB

    return EtcdDB(etcd.url + f"/b{uuid.uuid4().hex[:6]}", local=base / f"l-{uuid.uuid4().hex[:6]}.db")


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def report(benchmark: Any, name: str, samples: dict[str, list[float]]) -> None:
    for engine, xs in samples.items():
        benchmark.extra_info[f"{engine}_p50_ms"] = round(pct(xs, 0.5) * 1e3, 3)
        benchmark.extra_info[f"{engine}_p99_ms"] = round(pct(xs, 0.99) * 1e3, 3)
    print(f"\n{name}: " + "; ".join(f"{e} p50 {pct(x, 0.5) * 1e3:.2f} ms p99 {pct(x, 0.99) * 1e3:.2f} ms"
                                    for e, x in samples.items()))


@pytest.mark.benchmark(group="store")
def test_write_latency_sqlite_vs_etcd(benchmark: Any, etcd: EtcdCluster, tmp_path: Path) -> None:
    from patronus.controller.service import Service

    change: dict[str, list[float]] = {}
    row: dict[str, list[float]] = {}
    for engine in ("sqlite", "etcd"):
        db = open_db(engine, etcd, tmp_path)
        svc = Service(tmp_path / f"state-{engine}.db", db)
        try:
            svc.create_site({"name": "hq", "subnets": ["10.1.0.0/24"],
                             "uplinks": [{"name": "isp", "address": "192.0.2.1"}]}, actor="bench")
            svc.create_policy({"name": "p", "priority": 10, "match": {"proto": "udp", "dst_ports": "1"}},
                              actor="bench")
            change[engine] = timed(lambda i: svc.replace_policy(
                "p", {"name": "p", "priority": 10, "match": {"proto": "udp", "dst_ports": str(2 + i)}},
                actor="bench"), N)
            with db.transaction() as t:
                t.insert("revoked_jti", {"jti": "j", "expires": 0.0})

            def update(i: int) -> None:
                with db.transaction() as t:
                    t.update("revoked_jti", "j", expires=float(i))

            row[engine] = timed(update, N)
        finally:
            svc.close()
            db.close()
    benchmark.pedantic(lambda: None, rounds=1)
    report(benchmark, "policy change (service)", change)
    report(benchmark, "row update (transaction)", {f"row_{k}": v for k, v in row.items()})


@pytest.mark.benchmark(group="store")
def test_read_latency_sqlite_vs_etcd(benchmark: Any, etcd: EtcdCluster, tmp_path: Path) -> None:
    from patronus.controller.service import Service

    mesh: dict[str, list[float]] = {}
    row: dict[str, list[float]] = {}
    for engine in ("sqlite", "etcd"):
        db = open_db(engine, etcd, tmp_path)
        svc = Service(tmp_path / f"state-r-{engine}.db", db)
        try:
            svc.create_site({"name": "hq", "subnets": ["10.1.0.0/24"],
                             "uplinks": [{"name": "isp", "address": "192.0.2.1"}]}, actor="bench")
            mesh[engine] = timed(lambda i: svc.mesh(), N)
            with db.transaction() as t:
                t.insert("revoked_jti", {"jti": "j", "expires": 0.0})

            def get(i: int) -> None:
                with db.reading() as t:
                    t.get("revoked_jti", "j")

            row[engine] = timed(get, N)
        finally:
            svc.close()
            db.close()
    benchmark.pedantic(lambda: None, rounds=1)
    report(benchmark, "mesh read (service)", mesh)
    report(benchmark, "row read (transaction)", {f"row_{k}": v for k, v in row.items()})


def push_lags(a: Any, b: Any, tmp_path: Path) -> list[float]:
    """Seconds from a policy change sent to controller ``a`` until the agent channel on ``b`` delivers it."""
    from patronus.agent import ControllerSource

    from tests.wsclient import connect

    token = a.login("admin", a.admin_password)["access_token"]
    with a.client(token) as c:
        c.post("/api/v1/sites", json={"name": "hq", "subnets": ["10.1.0.0/24"],
                                      "uplinks": [{"name": "isp", "address": "192.0.2.1"}]}).raise_for_status()
        c.post("/api/v1/policies", json={"name": "p", "priority": 10,
                                         "match": {"proto": "udp", "dst_ports": "1"}}).raise_for_status()
        t = c.post("/api/v1/tokens", json={"site": "hq"}).raise_for_status().json()["token"]
    src = ControllerSource(b.url, tmp_path / f"hq-{uuid.uuid4().hex[:6]}.json", token=t)
    src.load()
    ctx = ssl.create_default_context(cafile=b.cert)
    lags = []
    with connect(b.url.replace("https://", "wss://") + "/api/v1/agent/ws", ssl=ctx,
                 additional_headers={"Authorization": f"Bearer {src.credential()}"}, open_timeout=10) as ws, \
            a.client(token) as c:
        ws.send(json.dumps({"since": None}))
        version = json.loads(ws.recv(timeout=10))["version"]
        for i in range(PUSHES):
            r = c.get("/api/v1/policies/p")
            t0 = time.perf_counter()
            c.put("/api/v1/policies/p", json={**r.json(), "match": {"proto": "udp", "dst_ports": str(2 + i)}},
                  headers={"If-Match": r.headers["etag"]}).raise_for_status()
            while True:
                msg = json.loads(ws.recv(timeout=30))
                if msg["version"] > version:
                    version = msg["version"]
                    break
            lags.append(time.perf_counter() - t0)
    return lags


@pytest.mark.benchmark(group="store")
def test_change_on_replica_a_to_push_on_replica_b(benchmark: Any, etcd: EtcdCluster, tmp_path: Path) -> None:
    """Wall time from a policy change sent to replica A until the agent channel on replica B delivers it
    (includes A's request: what an operator waits for). Baseline, same run: one controller on SQLite,
    the change and the channel on it."""
    from tests.controller_server import Controller

    base = tmp_path / "ctl"
    a = Controller(base / "a", store=etcd.url + f"/p{uuid.uuid4().hex[:6]}")
    shutil.copytree(base / "a", base / "b")
    b = Controller(base / "b")
    one = Controller(base / "sqlite")
    try:
        for c in (a, b, one):
            c.start()
        lags = {"sqlite_same_controller": push_lags(one, one, tmp_path), "etcd_a_to_b": push_lags(a, b, tmp_path)}
    finally:
        for c in (a, b, one):
            c.stop()
    benchmark.pedantic(lambda: None, rounds=1)
    report(benchmark, "change to push", lags)
