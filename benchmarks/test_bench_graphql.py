"""GraphQL on the controller (issue 18), each with its baseline in the same run.

- 1,000 open subscriptions (``policyChanges``, graphql-transport-ws over
  TLS, 10 sockets x 100 subscriptions: a dashboard opens several on one
  socket) receiving one policy change made through REST: per subscription
  the time from just before the REST call to the event. Baseline: one
  subscription alone, the same kind of change.

Run: .venv/bin/python -m pytest benchmarks/test_bench_graphql.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("strawberry")
websockets = pytest.importorskip("websockets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SOCKETS, PER_SOCKET = 10, 100


from conftest import pct_ms as _pct  # noqa: E402  (benchmark_only is a conftest fixture)


async def _subscribers(ctl, token: str, sockets: int, per_socket: int):
    url = ctl.url.replace("https://", "wss://") + "/api/graphql"
    conns = []
    for _ in range(sockets):
        ws = await websockets.connect(url, ssl=ctl.ssl_context(), subprotocols=["graphql-transport-ws"],
                                      max_size=None, ping_interval=None, open_timeout=60)
        await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        for i in range(per_socket):
            await ws.send(json.dumps({"id": str(i), "type": "subscribe",
                                      "payload": {"query": "subscription { policyChanges { target etag } }"}}))
        conns.append(ws)
    return conns


def _change(ctl, token: str, name: str, priority: int) -> None:
    with ctl.client(token) as a:
        a.post("/api/v1/policies", json={"name": name, "priority": priority,
                                         "match": {"proto": "tcp", "dst_ports": "443"}}).raise_for_status()


def test_fanout_to_1000_subscriptions(benchmark, benchmark_only, tmp_path):
    from tests.controller_server import Controller

    ctl = Controller(tmp_path / "state").start()
    try:
        token = ctl.login("admin", ctl.admin_password)["access_token"]
        n = iter(range(1000))

        async def round_(sockets: int, per_socket: int) -> list[float]:
            conns = await _subscribers(ctl, token, sockets, per_socket)
            # subscriptions register as the server reads them: one warm-up change every one must see
            k = next(n)
            await asyncio.to_thread(_change, ctl, token, f"warm{k}", 100 + k)
            for ws in conns:
                for _ in range(per_socket):
                    assert json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] == "next"
            got: list[float] = []

            async def drain(ws):
                for _ in range(per_socket):
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    assert msg["type"] == "next", msg
                    got.append(time.perf_counter() - t0)

            waiting = [asyncio.ensure_future(drain(ws)) for ws in conns]
            k = next(n)
            t0 = time.perf_counter()
            await asyncio.to_thread(_change, ctl, token, f"p{k}", 100 + k)
            await asyncio.gather(*waiting)
            for ws in conns:
                await ws.close()
            return got

        def both():
            return {"one": asyncio.run(round_(1, 1)), "thousand": asyncio.run(round_(SOCKETS, PER_SOCKET))}

        out = benchmark.pedantic(both, rounds=1, iterations=1)
        info = {"baseline_one_subscription_ms": _pct(out["one"], 0.5), "subscriptions": len(out["thousand"]),
                "p50_ms": _pct(out["thousand"], 0.5), "p99_ms": _pct(out["thousand"], 0.99),
                "max_ms": _pct(out["thousand"], 1.0)}
        benchmark.extra_info.update(info)
        print("\ngraphql fan-out:", info)
    finally:
        ctl.stop()


def test_topology_query_1000_sites(benchmark, benchmark_only, tmp_path):
    """The map's query on a 1,000-site full mesh (499,500 paths): sites as
    nodes with their uplinks, the edge count and the first 1,000 edges;
    100 requests in a row over one connection, p50/p99 (the first, cold,
    separately). Baselines in the same run: REST GET /api/v1/sites (the same
    nodes) at the same count, and REST /api/v1/topology once (every edge)."""
    import httpx

    from test_bench_controller import _controller, big_mesh

    ctl, _ = _controller(tmp_path, big_mesh(1000), False)
    try:
        token = ctl.login("admin", ctl.admin_password)["access_token"]
        query = """{ topology { mesh nodes { id subnets uplinks } edgeCount
                     edges(first: 1000) { items { id source target sourceUplink targetUplink } nextCursor } } }"""
        with httpx.Client(base_url=ctl.url, verify=ctl.ssl_context(), timeout=600,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            def timed(fn):
                t = time.perf_counter()
                r = fn()
                r.raise_for_status()
                return time.perf_counter() - t, r

            cold, r = timed(lambda: c.post("/api/graphql", json={"query": query}))
            body = r.json()
            assert not body.get("errors") and body["data"]["topology"]["edgeCount"] == 499_500

            def runs():
                g = [timed(lambda: c.post("/api/graphql", json={"query": query}))[0] for _ in range(100)]
                s = [timed(lambda: c.get("/api/v1/sites"))[0] for _ in range(100)]
                return g, s

            g, s = benchmark.pedantic(runs, rounds=1, iterations=1)
            full, r = timed(lambda: c.get("/api/v1/topology"))
        info = {"graphql_cold_ms": round(cold * 1000, 1), "graphql_p50_ms": _pct(g, 0.5), "graphql_p99_ms": _pct(g, 0.99),
                "rest_sites_p50_ms": _pct(s, 0.5), "rest_sites_p99_ms": _pct(s, 0.99),
                "rest_full_topology_ms": round(full * 1000, 1), "rest_full_topology_mb": round(len(r.content) / 1e6, 1)}
        benchmark.extra_info.update(info)
        print("\ngraphql topology, 1,000 sites:", info)
    finally:
        ctl.stop()
