"""The controller's Prometheus metrics and its telemetry views against the
real server (``patronus controller run`` over TLS on loopback, real HTTP
clients); the telemetry is written into the state file with the store's own
writers, as the agents write it.

Covers: /metrics needs a token; request counters move by route template and
status; the latency histogram has its buckets; auth failures by reason;
sites by status; ``promtool check metrics`` accepts the output; paths with
their latest metrics and state; a path's metrics as a time series; flows
filtered and paginated (every row exactly once across pages, a bad cursor a
named 422); events by time range.
"""

from __future__ import annotations

import datetime
import itertools
import os
import shutil
import subprocess
import time
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
prom_parser = pytest.importorskip("prometheus_client.parser")
np = pytest.importorskip("numpy")

from patronus.abi import FLOW_DTYPE, NO_PATH  # noqa: E402
from patronus.controller.app import PREFIX  # noqa: E402
from patronus.controller.metrics import BUCKETS, UNMATCHED, ControllerMetrics  # noqa: E402
from patronus.store import Store  # noqa: E402

from .controller_server import Controller, running_controller  # noqa: E402

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"
_n = itertools.count(1)
T0 = float(int(time.time()) - 3 * 86400)   # telemetry timestamps: days from now (other tests' rows never fall
# in a window) and within the retention the controller applies every minute (a week)


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_controller(tmp_path_factory.mktemp("ctlm") / "state") as c:
        c.tokens = {"admin": c.login("admin", c.admin_password)["access_token"]}
        with c.client(c.tokens["admin"]) as a:
            r = a.post(f"{PREFIX}/users", json={"name": "u-viewer", "password": PASSWORD, "role": "viewer"})
            assert r.status_code == 201, r.text
        c.tokens["viewer"] = c.login("u-viewer", PASSWORD)["access_token"]
        yield c


def admin(ctl: Controller) -> httpx.Client:
    return ctl.client(ctl.tokens["admin"])


def store(ctl: Controller) -> Store:
    return Store(ctl.info["state"])


def is_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    return r.json()


def scrape(ctl: Controller) -> str:
    with ctl.client(ctl.tokens["viewer"]) as c:
        r = c.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers
    return r.text


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value."""
    out = {}
    for fam in prom_parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def make_sites(ctl: Controller, n: int = 2, extra_uplink: bool = False) -> list[str]:
    names = []
    with admin(ctl) as a:
        for _ in range(n):
            k = next(_n)
            body = {"name": f"m{k}", "subnets": [f"10.{200 + k // 250}.{k % 250}.0/24"],
                    "uplinks": [{"name": "isp1", "address": f"198.18.{k // 250}.{k % 250 + 1}"}]}
            if extra_uplink:
                body["uplinks"].append({"name": "lte", "address": f"198.19.{k // 250}.{k % 250 + 1}"})
            a.post(f"{PREFIX}/sites", json=body).raise_for_status()
            names.append(body["name"])
    return names


# -- /metrics ----------------------------------------------------------------------------


def test_metrics_needs_a_token(ctl: Controller) -> None:
    with ctl.client() as c:
        r = c.get("/metrics")
        is_problem(r, 401)
        assert "Bearer" in r.headers["www-authenticate"]
        is_problem(c.get("/metrics", headers={"Authorization": "Bearer nonsense"}), 401)
    scrape(ctl)   # a viewer may scrape


def test_request_counters_move_and_latency_has_buckets(ctl: Controller) -> None:
    before = scrape(ctl)
    name = make_sites(ctl, 1)[0]
    with admin(ctl) as a:
        for _ in range(5):
            assert a.get(f"{PREFIX}/sites").status_code == 200
        for _ in range(3):
            assert a.get(f"{PREFIX}/sites/{name}").status_code == 200
        assert a.get(f"{PREFIX}/sites/nosuch").status_code == 404
        assert a.get(f"{PREFIX}/no/such/route/{next(_n)}").status_code == 404
        # refused before routing (413): still counted under its route
        assert a.post(f"{PREFIX}/sites", content=b"x" * (2 << 20),
                      headers={"content-type": "application/json"}).status_code == 413
    after = scrape(ctl)

    def delta(**labels: str) -> float:
        return (value(after, "patronus_controller_requests_total", **labels)
                - value(before, "patronus_controller_requests_total", **labels))

    assert delta(route=f"{PREFIX}/sites", method="GET", status="200") == 5
    # by route template, never by the raw path: one series for every site name
    assert delta(route=f"{PREFIX}/sites/{{name}}", method="GET", status="200") == 3
    assert delta(route=f"{PREFIX}/sites/{{name}}", method="GET", status="404") == 1
    assert delta(route=f"{PREFIX}/sites", method="POST", status="201") == 1
    assert delta(route=UNMATCHED, method="GET", status="404") == 1
    assert delta(route=f"{PREFIX}/sites", method="POST", status="413") == 1
    assert not any(name in line for line in after.splitlines() if "requests_total" in line)

    # the latency histogram: every bucket, cumulative, +Inf == count
    hist = "patronus_controller_request_duration_seconds"
    route = f"{PREFIX}/sites"
    s = samples(after)
    les = sorted(float(dict(lbl)["le"]) for (n, lbl) in s if n == f"{hist}_bucket" and dict(lbl)["route"] == route)
    assert les == [*BUCKETS, float("inf")]
    counts = [s[(f"{hist}_bucket", frozenset({"route": route, "le": le}.items()))]
              for le in [*(str(b) for b in BUCKETS), "+Inf"]]
    assert counts == sorted(counts)
    assert counts[-1] == s[(f"{hist}_count", frozenset({"route": route}.items()))]
    assert counts[-1] - value(before, f"{hist}_count", route=route) >= 5
    assert s[(f"{hist}_sum", frozenset({"route": route}.items()))] > 0


def test_auth_failures_by_reason(ctl: Controller) -> None:
    before = scrape(ctl)
    with ctl.client() as c:
        c.get(f"{PREFIX}/sites")
        c.get(f"{PREFIX}/sites", headers={"Authorization": "Bearer a.b.c"})
        c.post(f"{PREFIX}/auth/login", json={"name": "admin", "password": "wrong password!!"})
    with ctl.client(ctl.tokens["viewer"]) as c:
        assert c.get(f"{PREFIX}/users").status_code == 403
    after = scrape(ctl)
    name = "patronus_controller_auth_failures_total"
    for reason in ("missing_bearer_token", "malformed_token", "bad_credentials", "forbidden"):
        assert value(after, name, reason=reason) - value(before, name, reason=reason) == 1, reason


def test_sites_by_status(ctl: Controller) -> None:
    before = scrape(ctl)
    make_sites(ctl, 2)
    after = scrape(ctl)
    name = "patronus_controller_sites"
    assert value(after, name, status="pending") - value(before, name, status="pending") == 2
    with admin(ctl) as a:
        n_sites = len(a.get(f"{PREFIX}/sites").json()["items"])
    assert sum(value(after, name, status=st) for st in ("pending", "active", "degraded", "inactive")) == n_sites
    assert ("patronus_controller_connected_agents", frozenset()) in samples(after)


def test_promtool_accepts_the_metrics(ctl: Controller) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        msg = "promtool not installed (apt-get install --no-install-recommends prometheus)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with admin(ctl) as a:   # a few series of every kind first
        a.get(f"{PREFIX}/sites")
        a.get(f"{PREFIX}/nosuch")
    with ctl.client() as c:
        c.get("/metrics")
    text = scrape(ctl)
    assert "patronus_controller_auth_failures_total{" in text
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert p.stdout.strip() == "" and p.stderr.strip() == "", (p.stdout, p.stderr)


def test_connected_agents_setter_and_callback() -> None:
    m = ControllerMetrics()
    m.set_connected_agents(7)
    assert value(m.render().decode(), "patronus_controller_connected_agents") == 7
    n = [3]
    m.connected_agents_from(lambda: n[0])
    n[0] = 11
    assert value(m.render().decode(), "patronus_controller_connected_agents") == 11
    assert ControllerMetrics().registry is not m.registry   # a registry of its own, never the global one


# -- paths with their metrics and state ------------------------------------------------------


def test_paths_have_latest_metrics_and_state(ctl: Controller) -> None:
    x, y = make_sites(ctl, 2, extra_uplink=True)
    with admin(ctl) as a:
        paths = [p for p in a.get(f"{PREFIX}/paths").raise_for_status().json()["items"]
                 if set(p["sites"]) == {x, y}]
        assert len(paths) == 4 and all(p["metrics"] is None and p["state"] is None for p in paths)
        measured, down, quiet = paths[0]["id"], paths[1]["id"], paths[2]["id"]
        with store(ctl) as st:
            st.add_path_metrics(T0 + 1, [(measured, 20.0, 1.0, 0.0, 4.4, 1420, 100.0), (down, 30.0, 2.0, 5.0, 4.0,
                                                                                       1420, float("nan"))])
            st.add_path_metrics(T0 + 2, [(measured, 25.5, 1.5, 0.5, 4.3, 1400, 90.0)])
            st.add_event("bfd_up", to_path=measured, ts=T0 + 1)
            st.add_event("bfd_up", to_path=down, ts=T0 + 1)
            st.add_event("damped", from_path=down, detail="penalty 1500 > 1000", ts=T0 + 2)
            st.add_event("bfd_down", policy="voice", site=y, from_path=down, to_path=quiet,
                         detail=f"{down} down", ts=T0 + 3)
        by_id = {p["id"]: p for p in a.get(f"{PREFIX}/paths").raise_for_status().json()["items"]}
    m = by_id[measured]["metrics"]
    assert m == {"ts": T0 + 2, "rtt_ms": 25.5, "jitter_ms": 1.5, "loss_pct": 0.5, "mos": 4.3, "mtu": 1400,
                 "bandwidth_mbps": 90.0}
    assert by_id[measured]["state"]["status"] == "up"
    assert by_id[down]["metrics"]["bandwidth_mbps"] is None   # NaN is stored as NULL
    assert by_id[down]["state"] == {"status": "down", "reason": "bfd_down", "since": T0 + 3,
                                    "detail": f"{down} down"}
    # a move onto a path says nothing of the path's own state
    assert by_id[quiet]["metrics"] is None and by_id[quiet]["state"] is None


def test_path_metrics_time_series(ctl: Controller) -> None:
    x, y = make_sites(ctl, 2)
    with admin(ctl) as a:
        pid = next(p["id"] for p in a.get(f"{PREFIX}/paths").json()["items"] if set(p["sites"]) == {x, y})
        with store(ctl) as st:
            for i in range(30):
                st.add_path_metrics(T0 + i, [(pid, 10.0 + i, 1.0, 0.0, 4.4, 1420, 100.0)])
            st.add_path_metrics(T0 + 5, [("other~path", 99.0, 1.0, 0.0, 4.4, 1420, 100.0)])
        url = f"{PREFIX}/paths/{pid}/metrics"
        r = a.get(url).raise_for_status().json()
        assert r["path"] == pid and r["in_mesh"] is True and r["next_cursor"] is None
        assert [p["ts"] for p in r["items"]] == [T0 + i for i in range(30)]
        assert [p["rtt_ms"] for p in r["items"]] == [10.0 + i for i in range(30)]

        # [start, end), in seconds or RFC 3339
        r = a.get(url, params={"start": T0 + 10, "end": T0 + 20}).json()
        assert [p["ts"] for p in r["items"]] == [T0 + i for i in range(10, 20)]
        iso = datetime.datetime.fromtimestamp(T0 + 25, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        r = a.get(url, params={"start": iso}).json()
        assert [p["ts"] for p in r["items"]] == [T0 + i for i in range(25, 30)]

        # pages
        got, cursor = [], None
        while True:
            r = a.get(url, params={"start": T0 + 3, "limit": 4, **({"cursor": cursor} if cursor else {})})
            body = r.raise_for_status().json()
            assert len(body["items"]) <= 4
            got += [p["ts"] for p in body["items"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert got == [T0 + i for i in range(3, 30)]

        # a path nothing was measured for, or no longer in the mesh: an empty series, not an error
        r = a.get(f"{PREFIX}/paths/nosuch/metrics").raise_for_status().json()
        assert r == {"path": "nosuch", "in_mesh": False, "columns": r["columns"], "items": [], "next_cursor": None}
        assert is_problem(a.get(url, params={"start": "last tuesday"}), 422)["field"] == "start"
        assert is_problem(a.get(url, params={"start": T0 + 5, "end": T0 + 1}), 422)["field"] == "end"
        assert is_problem(a.get(url, params={"limit": 10_001}), 422)["field"] == "limit"


# -- flows ---------------------------------------------------------------------------------------


def flows(n: int, seed: int) -> Any:
    a = np.zeros(n, dtype=FLOW_DTYPE)
    for i in range(n):
        a["src"][i, :4] = [10, 1, seed % 250, i % 250]
        a["dst"][i, :4] = [10, 2, 0, 1]
        a["sport"][i] = 10_000 + i
        a["packets"][i] = i + 1
        a["bytes"][i] = 100 * (i + 1)
        a["first_ns"][i] = i
        a["last_ns"][i] = i + 1
        a["policy"][i] = i % 3 - 1     # -1: no policy (None), 0: "web", 1: "voice"
        a["path"][i] = NO_PATH if i % 2 else i % 5
    a["family"] = 4
    a["dport"] = 443
    a["proto"] = 6
    return a


def write_flows(ctl: Controller, site: str, snapshots: int = 6, per: int = 37,
                t: float = T0) -> list[tuple[Any, ...]]:
    with store(ctl) as st:
        for k in range(snapshots):
            st.add_flow_snapshot(t + 100 * k, site, flows(per, k), ["web", "voice"])
    with store(ctl) as st:
        return [key(r) for r in st.flow_snapshots() if r["site"] == site]


def key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["ts"], r["site"], r["src"], r["sport"], r["policy"], r["path"], r["packets"])


def pages(a: httpx.Client, params: dict[str, Any]) -> tuple[list[tuple[Any, ...]], int]:
    got, cursor, n = [], None, 0
    while True:
        r = a.get(f"{PREFIX}/flows", params={**params, **({"cursor": cursor} if cursor else {})})
        body = r.raise_for_status().json()
        n += 1
        assert len(body["items"]) <= params.get("limit", 100)
        got += [key(x) for x in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return got, n


def test_flows_pagination_visits_every_row_once(ctl: Controller) -> None:
    site, other = f"fl{next(_n)}", f"fl{next(_n)}"
    rows = write_flows(ctl, site)
    write_flows(ctl, other, snapshots=2)
    assert len(rows) == 6 * 37
    with admin(ctl) as a:
        got, n = pages(a, {"site": site, "limit": 10})
        assert n == 23                        # 222 rows, 10 a page
        assert len(got) == len(set(got)) == len(rows) and set(got) == set(rows)
        assert [r[0] for r in got] == sorted(r[0] for r in got)   # in the order they were stored: by time here

        # by policy, and by time range [start, end)
        got, _ = pages(a, {"site": site, "policy": "voice", "limit": 7})
        assert set(got) == {r for r in rows if r[4] == "voice"} and len(got) == len(set(got)) == 6 * 12
        got, _ = pages(a, {"site": site, "start": T0 + 100, "end": T0 + 300, "limit": 50})
        assert set(got) == {r for r in rows if T0 + 100 <= r[0] < T0 + 300} and len(got) == 2 * 37
        iso = datetime.datetime.fromtimestamp(T0 + 400, datetime.timezone.utc).isoformat()
        got, _ = pages(a, {"site": site, "start": iso, "limit": 1000})
        assert len(got) == 2 * 37 and all(r[0] >= T0 + 400 for r in got)

        # one page: the default limit is 100, the maximum 1000
        body = a.get(f"{PREFIX}/flows", params={"site": site}).json()
        assert len(body["items"]) == 100 and body["next_cursor"]
        flow = body["items"][0]
        assert flow["site"] == site and flow["dst"] == "10.2.0.1" and flow["proto"] == 6
        assert is_problem(a.get(f"{PREFIX}/flows", params={"limit": 1001}), 422)["field"] == "limit"
        assert is_problem(a.get(f"{PREFIX}/flows", params={"limit": 0}), 422)["field"] == "limit"

        # rows written while paging come on later pages, the earlier ones are not repeated
        first = a.get(f"{PREFIX}/flows", params={"site": site, "limit": 200}).json()
        more = write_flows(ctl, site, snapshots=1, per=5, t=T0 + 1000)
        rest, _ = pages(a, {"site": site, "limit": 200})   # fresh walk, for the total
        seen = [key(x) for x in first["items"]]
        r = a.get(f"{PREFIX}/flows", params={"site": site, "limit": 200, "cursor": first["next_cursor"]})
        seen += [key(x) for x in r.json()["items"]]
        assert len(seen) == len(set(seen)) == len(rest) == len(more)


def test_bad_cursor_is_a_named_422(ctl: Controller) -> None:
    site = f"fl{next(_n)}"
    write_flows(ctl, site, snapshots=1, per=20)
    with admin(ctl) as a:
        cursor = a.get(f"{PREFIX}/flows", params={"site": site, "limit": 5}).json()["next_cursor"]
        assert cursor
        for bad in ("garbage!", "eyJ2IjoxfQ", cursor[:-3], "x" * 600):
            p = is_problem(a.get(f"{PREFIX}/flows", params={"site": site, "limit": 5, "cursor": bad}), 422)
            assert p["field"] == "cursor", p
        # a cursor of another query (other filters) is refused by name, not silently misread
        p = is_problem(a.get(f"{PREFIX}/flows", params={"site": "elsewhere", "limit": 5, "cursor": cursor}), 422)
        assert p["field"] == "cursor" and p["title"] == "Bad Cursor" and "another query" in p["detail"]
        # the same query with the same cursor goes on
        r = a.get(f"{PREFIX}/flows", params={"site": site, "limit": 5, "cursor": cursor})
        assert r.status_code == 200 and len(r.json()["items"]) == 5
        assert is_problem(a.get(f"{PREFIX}/flows", params={"end": "not a time"}), 422)["field"] == "end"


# -- events ---------------------------------------------------------------------------------------


def test_events_by_time_range(ctl: Controller) -> None:
    tag = f"ev{next(_n)}"
    base = T0 + 10_000 * next(_n)
    with store(ctl) as st:
        for i in range(10):
            st.add_event("reroute", policy=tag, from_path="a", to_path="b", ts=base + i)
    with admin(ctl) as a:
        def events(**params: Any) -> list[dict[str, Any]]:
            return [e for e in a.get(f"{PREFIX}/events", params=params).raise_for_status().json()["items"]
                    if e["policy"] == tag]

        assert [e["ts"] for e in events(start=base, end=base + 10)] == [base + i for i in range(10)]
        assert [e["ts"] for e in events(start=base + 3, end=base + 6)] == [base + 3, base + 4, base + 5]
        # limit keeps the latest, oldest first
        assert [e["ts"] for e in events(start=base, end=base + 10, limit=2)] == [base + 8, base + 9]
        assert events(start=base + 10, end=base + 20) == []
        assert is_problem(a.get(f"{PREFIX}/events", params={"start": "soon"}), 422)["field"] == "start"
        assert is_problem(a.get(f"{PREFIX}/events", params={"limit": 0}), 422)["field"] == "limit"


def test_new_routes_are_readable_by_every_role(ctl: Controller) -> None:
    with ctl.client(ctl.tokens["viewer"]) as c:
        for path in (f"{PREFIX}/flows", f"{PREFIX}/paths/x/metrics", f"{PREFIX}/events", "/metrics"):
            assert c.get(path).status_code == 200, path
    with ctl.client() as c:
        for path in (f"{PREFIX}/flows", f"{PREFIX}/paths/x/metrics"):
            is_problem(c.get(path), 401)
