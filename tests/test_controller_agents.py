"""The agent channel against the real server (uvicorn over TLS in a
subprocess): enrolment tokens, agent credentials and their scope, desired
state versions with deltas, WebSocket pushes, telemetry bounds, agent
status, and the agent's ControllerSource (pinning, cache, offline).
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import ssl
import stat
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
websockets = pytest.importorskip("websockets")

from patronus.agent import CertificatePinError, ControllerSource, apply, digest, parse_token  # noqa: E402
from patronus.controller import agents  # noqa: E402
from patronus.controller.app import PREFIX  # noqa: E402

from . import controller_server as cs  # noqa: E402

pytestmark = pytest.mark.slow


_n = itertools.count(1)


class AgentController(cs.Controller):
    def start(self, timeout: float = 30.0) -> AgentController:
        super().start(timeout)
        self.token = self.login("admin", self.admin_password)["access_token"]
        return self

    def admin(self) -> httpx.Client:
        return self.client(self.token)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(f"file:{self.state_dir / 'controller.db'}?mode=ro", uri=True)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()


def site_body(name: str) -> dict[str, Any]:
    n = next(_n)
    return {"name": name, "subnets": [f"10.{n}.0.0/24"],
            "uplinks": [{"name": "isp1", "address": f"198.18.{n}.1"}, {"name": "lte", "address": f"198.19.{n}.1"}]}


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = AgentController(tmp_path_factory.mktemp("actl") / "state")
    c.start()
    try:
        with c.admin() as a:
            for s in ("hq", "br1", "br2"):
                a.post(f"{PREFIX}/sites", json=site_body(s)).raise_for_status()
        yield c
    finally:
        c.stop()


def make_token(ctl: AgentController, site: str, **kw: Any) -> dict[str, Any]:
    with ctl.admin() as a:
        r = a.post(f"{PREFIX}/tokens", json={"site": site, **kw})
        assert r.status_code == 201, r.text
        return r.json()


def enrol(ctl: AgentController, token: str, **body: Any) -> httpx.Response:
    with ctl.client(token) as c:
        return c.post(f"{PREFIX}/agent/enrol", json=body)


def credential(ctl: AgentController, site: str, **body: Any) -> str:
    r = enrol(ctl, make_token(ctl, site)["token"], **body)
    assert r.status_code == 201, r.text
    return str(r.json()["credential"])


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    return dict(r.json())


# -- tokens and enrolment ----------------------------------------------------------------


def test_token_pins_the_certificate_and_enrols_once(ctl: AgentController) -> None:
    t = make_token(ctl, "br1", ttl_s=600)
    site, _, pin = parse_token(t["token"])
    assert site == "br1" and pin == agents.cert_sha256(ctl.cert)
    assert pin == ctl.info["cert_sha256"].replace(":", "").lower()
    with ctl.admin() as a:
        listed = {x["id"]: x for x in a.get(f"{PREFIX}/tokens").raise_for_status().json()["items"]}
    assert t["id"] in listed and "token" not in listed[t["id"]] and listed[t["id"]]["used"] is None
    assert not ctl.rows("SELECT 1 FROM agent_tokens WHERE hash LIKE ?", (f"%{t['token'].split('.')[2]}%",))

    r = enrol(ctl, t["token"], interval_s=5, public_key="x" * 44)
    assert r.status_code == 201, r.text
    cred = r.json()["credential"]
    assert cred.startswith("pna_") and r.json()["site"] == "br1"
    with ctl.client(cred) as c:
        assert c.get(f"{PREFIX}/agent/state").json()["full"]["site"] == "br1"

    again = problem(enrol(ctl, t["token"]), 401)
    assert "already used" in again["detail"]
    audit = ctl.rows("SELECT action, target, ok, after FROM audit WHERE action = 'agent.enrol' ORDER BY id")
    assert (1, "site/br1") in {(ok, target) for _, target, ok, _ in audit}
    assert any(ok == 0 and "already used" in after for _, _, ok, after in audit)
    assert not any(t["token"].split(".")[2] in (after or "") for *_, after in audit)   # no secret in the log


def test_revoked_expired_foreign_and_malformed_tokens_are_refused(ctl: AgentController) -> None:
    t = make_token(ctl, "br2")
    with ctl.admin() as a:
        assert a.delete(f"{PREFIX}/tokens/{t['id']}").status_code == 204
        problem(a.delete(f"{PREFIX}/tokens/nosuch"), 404)
        assert problem(a.post(f"{PREFIX}/tokens", json={"site": "nosuch"}), 422)["field"] == "site"
    assert "revoked" in problem(enrol(ctl, t["token"]), 401)["detail"]
    short = make_token(ctl, "br2", ttl_s=0.001)
    time.sleep(0.01)
    assert "expired" in problem(enrol(ctl, short["token"]), 401)["detail"]
    good = make_token(ctl, "br2")["token"]
    other_pin = good[:-64] + "0" * 64
    assert "another controller certificate" in problem(enrol(ctl, other_pin), 401)["detail"]
    assert "malformed" in problem(enrol(ctl, "pnt1.br2.nope.abc"), 401)["detail"]
    assert "unknown" in problem(enrol(ctl, good.replace("pnt1.br2.", "pnt1.hq.")), 401)["detail"]
    assert enrol(ctl, good).status_code == 201   # none of the refusals used it up
    # a user's token on the enrolment route: authenticated, but not an enrolment token
    problem(enrol(ctl, ctl.token), 403)


# -- scope of an agent credential ---------------------------------------------------------------


def test_agent_credential_is_bound_to_its_site(ctl: AgentController) -> None:
    cred = credential(ctl, "br1")
    with ctl.client(cred) as c:
        problem(c.get(f"{PREFIX}/sites"), 401)           # not a user or API key
        problem(c.post(f"{PREFIX}/tokens", json={"site": "br1"}), 401)
        before = ctl.rows("SELECT count(*) FROM agent_telemetry")[0][0]
        body = {"site": "hq", "metrics": [{"ts": 1.0, "path": "br1.isp1~hq.isp1", "rtt_ms": 5}]}
        problem(c.post(f"{PREFIX}/agent/telemetry", json=body), 403)
        assert ctl.rows("SELECT count(*) FROM agent_telemetry")[0][0] == before
    audit = ctl.rows("SELECT actor, target, ok FROM audit WHERE action = 'agent.telemetry' ORDER BY id DESC LIMIT 1")
    assert audit and audit[0][1] == "site/hq" and audit[0][2] == 0 and audit[0][0].startswith("agent:br1:")
    with ctl.admin() as a:   # staff on an agent route: authenticated, not an agent
        problem(a.get(f"{PREFIX}/agent/state"), 403)
    with ctl.client() as c:
        problem(c.get(f"{PREFIX}/agent/state"), 401)
        problem(c.get(f"{PREFIX}/agent/state", headers={"Authorization": "Bearer pna_0123456789abcdef_" + "x" * 43}),
                401)


# -- desired state: versions, deltas, full copies ----------------------------------------------


def test_state_versions_delta_and_full(ctl: AgentController) -> None:
    cred = credential(ctl, "hq")
    with ctl.client(cred) as c:
        first = c.get(f"{PREFIX}/agent/state").raise_for_status().json()
        v1, s1 = first["version"], first["full"]
        assert s1["site"] == "hq" and set(s1["sites"]) >= {"hq", "br1", "br2"}
        assert all("hq." in pid for pid in s1["paths"])
        assert digest(s1) == first["digest"]
        assert c.get(f"{PREFIX}/agent/state", params={"since": v1}).json() == \
            {"version": v1, "digest": first["digest"], "unchanged": True}
        with ctl.admin() as a:
            a.post(f"{PREFIX}/policies", json={"name": "voice", "match": {"proto": "udp", "dst_ports": "5060"},
                                               "priority": 10, "prefer": ["lte"]}).raise_for_status()
        d = c.get(f"{PREFIX}/agent/state", params={"since": v1}).json()
        assert d["version"] == v1 + 1 and "delta" in d
        assert [op["item"] for op in d["delta"]] == ["voice"]
        s2 = apply(s1, d["delta"])
        assert digest(s2) == d["digest"]
        full = c.get(f"{PREFIX}/agent/state", params={"since": v1 - 1 if v1 > 1 else 999}).json()
        assert full["version"] == v1 + 1 and full["full"] == s2
        assert c.get(f"{PREFIX}/agent/state").json()["full"] == s2
        problem(c.get(f"{PREFIX}/agent/state", params={"since": "x"}), 422)


def test_websocket_pushes_new_versions(ctl: AgentController) -> None:
    from .wsclient import connect

    cred = credential(ctl, "br2")
    ctx = ssl.create_default_context(cafile=ctl.cert)
    url = ctl.url.replace("https://", "wss://") + f"{PREFIX}/agent/ws"
    with connect(url, ssl=ctx, additional_headers={"Authorization": f"Bearer {cred}"}, open_timeout=10) as ws:
        ws.send(json.dumps({"since": None}))
        first = json.loads(ws.recv(timeout=10))
        assert first["full"]["site"] == "br2"
        with ctl.admin() as a:
            a.post(f"{PREFIX}/policies", json={"name": f"p{next(_n)}", "match": {"proto": "tcp"},
                                               "priority": 100 + next(_n)}).raise_for_status()
        pushed = json.loads(ws.recv(timeout=10))
        assert pushed["version"] == first["version"] + 1 and len(pushed["delta"]) == 1
        assert digest(apply(first["full"], pushed["delta"])) == pushed["digest"]
    with connect(url, ssl=ctx, open_timeout=10) as ws:   # the credential in the first message
        ws.send(json.dumps({"credential": cred, "since": pushed["version"]}))
        ws.send("ping")
        with ctl.admin() as a:
            a.post(f"{PREFIX}/policies", json={"name": f"p{next(_n)}", "match": {"proto": "tcp"},
                                               "priority": 100 + next(_n)}).raise_for_status()
        assert json.loads(ws.recv(timeout=10))["version"] == pushed["version"] + 1
    with connect(url, ssl=ctx, open_timeout=10) as ws:   # a user's token is not an agent credential
        ws.send(json.dumps({"credential": ctl.token}))
        assert json.loads(ws.recv(timeout=10))["error"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed):
            ws.recv(timeout=10)


# -- telemetry ------------------------------------------------------------------------------------


def test_telemetry_is_bounded_validated_and_stored(ctl: AgentController) -> None:
    cred = credential(ctl, "br1")
    count = "SELECT count(*) FROM agent_telemetry WHERE site = 'br1'"
    m = {"ts": 1.5, "path": "br1.isp1~hq.isp1", "rtt_ms": 12.5, "jitter_ms": 1.0, "loss_pct": 0.0}
    with ctl.client(cred) as c:
        before = ctl.rows(count)[0][0]
        r = c.post(f"{PREFIX}/agent/telemetry", json={
            "site": "br1", "metrics": [m], "bfd": [{"ts": 1.5, "path": "br1.lte~hq.isp1", "state": "up"}],
            "events": [{"ts": 1.6, "reason": "bfd_down", "policy": "voice", "from_path": "br1.lte~hq.isp1",
                        "to_path": "br1.isp1~hq.isp1"}],
            "flows": [{"ts": 1.7, "policy": "voice", "site": "hq", "flows": 2, "packets": 10, "bytes": 1200}]})
        assert r.status_code == 200, r.text
        assert r.json() == {"stored": 4}
        assert ctl.rows(count)[0][0] == before + 4
        refused = [
            (c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", "metrics": [m] * 3000}), 413, "metrics"),
            (c.post(f"{PREFIX}/agent/telemetry", content=b'{"site": "br1", "x": "' + b"a" * 300_000 + b'"}',
                    headers={"content-type": "application/json"}), 413, "body"),
            (c.post(f"{PREFIX}/agent/telemetry", content=b"{not json"), 422, "body"),
            (c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", "metrics": [m, {**m, "loss_pct": 200}]}),
             422, "metrics[1].loss_pct"),
            (c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", "metrics": [{**m, "rtt_ms": "NaN"}]}),
             422, "metrics[0].rtt_ms"),
            (c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", "bfd": [{"ts": 1, "path": m["path"],
                                                                               "state": "sideways"}]}),
             422, "bfd[0].state"),
            (c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", "metrics": [m, {**m, "path": "br2.isp1~hq.isp1"}]}),
             422, "metrics[1].path"),
            (c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", "colour": "red"}), 422, "colour"),
            (c.post(f"{PREFIX}/agent/telemetry", json=[m]), 422, ""),
        ]
        for r, status, field in refused:
            p = problem(r, status)
            assert p.get("field", "") == field or field == "", (field, p)
        assert ctl.rows(count)[0][0] == before + 4   # nothing from a refused batch


# -- agent status ------------------------------------------------------------------------------------


def test_agent_status_goes_degraded_then_inactive(ctl: AgentController) -> None:
    r = enrol(ctl, make_token(ctl, "br2")["token"], interval_s=0.1)
    cid, cred = r.json()["id"], r.json()["credential"]

    def status() -> str:
        with ctl.admin() as a:
            items = a.get(f"{PREFIX}/agents").raise_for_status().json()["items"]
        return next(x["status"] for x in items if x["id"] == cid)

    def wait_for(want: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while (got := status()) != want:
            assert time.monotonic() < end, f"status {got}, waited for {want}"
            time.sleep(0.05)

    with ctl.client(cred) as c:
        c.get(f"{PREFIX}/agent/state").raise_for_status()
    assert status() in ("Active", "Degraded")    # Active unless this machine stalled 0.3 s
    wait_for("Degraded")
    wait_for("Inactive")
    with ctl.client(cred) as c:
        c.get(f"{PREFIX}/agent/state").raise_for_status()
    # a contact makes it Active again (unless 0.3 s pass before the read)
    assert status() in ("Active", "Degraded")
    with ctl.client(ctl.login("admin", ctl.admin_password)["access_token"]) as a:
        assert a.get(f"{PREFIX}/agents").json()["connected"] == 0


# -- the agent side: ControllerSource -------------------------------------------------------------------


def test_controller_source_enrols_caches_and_survives_the_controller(tmp_path: Path) -> None:
    c = AgentController(tmp_path / "ctl").start()
    try:
        with c.admin() as a:
            for s in ("hq", "br1"):
                a.post(f"{PREFIX}/sites", json=site_body(s)).raise_for_status()
        token = make_token(c, "br1")["token"]
        cache = tmp_path / "agent.db.br1.controller.json"

        bad = ControllerSource(c.url, cache, token=token[:-64] + "f" * 64)
        with pytest.raises(CertificatePinError, match="pins"):
            bad.load()
        assert not cache.exists()

        with pytest.raises(Exception, match="differs from the site"):
            ControllerSource(c.url, cache, token=token, site="hq")
        src = ControllerSource(c.url, cache, token=token, site="br1", interval_s=1.0)
        d1 = src.load()
        assert [s.name for s in d1.mesh.sites] == ["hq", "br1"] and not src.offline
        assert [p.id for p in d1.mesh.paths("br1")] == [p.id for p in d1.mesh.paths("br1")]
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
        assert "pna_" in cache.read_text()
        # the token is used up: a second source runs on the stored credential alone
        src2 = ControllerSource(c.url, cache)
        assert src2.load().version == d1.version and src2.site == "br1"

        with c.admin() as a:
            a.post(f"{PREFIX}/policies", json={"name": "voice", "match": {"proto": "udp"}, "priority": 7,
                                               "prefer": ["lte"]}).raise_for_status()
        d2 = src2.load()   # by a delta
        assert int(d2.version) == int(d1.version) + 1 and [p.name for p in d2.mesh.policies] == ["voice"]
        assert src.version() == d2.version   # src held v1: a delta too
    finally:
        c.stop()
    offline = ControllerSource(c.url, cache, timeout=2.0)
    d3 = offline.load()
    assert offline.offline and d3.version == d2.version and d3.mesh == d2.mesh
    with pytest.raises(Exception, match="unreachable"):
        ControllerSource(c.url, tmp_path / "none.json", token=token, timeout=2.0).load()


def test_agent_cli_takes_controller_flags() -> None:
    import argparse
    from unittest import mock

    from patronus import cli

    seen: dict[str, Any] = {}

    def fake_main(args: argparse.Namespace) -> int:
        seen.update(vars(args))
        return 0

    with mock.patch("patronus.agent.main", fake_main):
        assert cli.main(["agent", "--state", "s.db", "--site", "br1", "--controller", "https://127.0.0.1:8443",
                         "--token-file", "t"]) == 0
    assert seen["controller"] == "https://127.0.0.1:8443" and seen["token_file"] == "t"


# -- the wire format: digests, deltas, versions kept in parts ---------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# no booleans next to integers: diff compares with ==, and False == 0 while their JSON differs (the
# digest then disagrees and the agent asks for a full copy; states never mix them in one field)
_leaf = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3))
_value = st.recursive(_leaf, lambda v: st.one_of(st.lists(v, max_size=3),
                                                  st.dictionaries(st.text(max_size=3), v, max_size=3)), max_leaves=8)
_state = st.dictionaries(st.sampled_from(["mesh", "site", "order", "sites", "paths", "policies", "failover",
                                          "profiles", "peers", "extra"]),
                         st.one_of(_value, st.dictionaries(st.text(max_size=3), _value, max_size=4)), max_size=10)


@given(_state, _state)
@settings(max_examples=300, deadline=None)
def test_apply_of_diff_rebuilds_the_new_state_and_its_digest(old: dict[str, Any], new: dict[str, Any]) -> None:
    from patronus.agent import diff, manifest

    ops = diff(old, new)
    got = apply(old, ops)
    assert got == new and digest(got) == digest(new)
    assert json.loads(json.dumps(got)) == json.loads(json.dumps(new))
    # the controller's delta over the keys whose part digests differ is the same change
    old_parts = {k: v for k, v in old.items() if k not in new or manifest(old)[k] != manifest(new)[k]}
    assert apply(old, agents.state_delta(manifest(old), old_parts, manifest(new), new)) == new
    assert (digest(old) == digest(new)) == (json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True))


def _mesh_of(n: int, uplinks: int = 2) -> Any:
    from patronus import Mesh, Site, Uplink

    m = Mesh("m")
    for i in range(n):
        m.add_site(Site(f"s{i}", subnets=[f"10.{i}.0.0/24"],
                        uplinks=[Uplink(f"u{j}", f"192.0.{i}.{j + 1}") for j in range(1 + (i + uplinks) % uplinks)]))
    return m


def test_controller_parts_digest_like_the_agent() -> None:
    from patronus.agent import canonical, manifest

    m = _mesh_of(9, 3)
    peers = {"s1": {"wg_public_key": "a="}, "s4": {"wg_public_key": "b="}, "gone": {"wg_public_key": "c="}}
    shared = agents._Shared(m, peers)
    for s in shared.order:
        state = shared.state(s)
        assert shared.manifest(s) == manifest(state)
        assert all(shared.body(s, k) == canonical(v) for k, v in state.items())
        assert shared.paths(s) == {p.id: p.index for p in m.paths(s)}
        assert "gone" not in state["peers"] and s not in state["peers"]
    assert agents.desired_state(m, "s3", peers) == shared.state("s3")


def test_versions_and_deltas_survive_a_restart(tmp_path: Path) -> None:
    from patronus.controller.db import ControllerDB
    from patronus.controller.service import Service

    def store() -> tuple[Any, Any]:
        db = ControllerDB(tmp_path / "c.db")
        svc = Service(tmp_path / "s.db", db)
        return db, agents.AgentStore(svc, None, pin=None)

    db, st1 = store()
    for i in range(3):
        st1.service.create_site({"name": f"s{i}", "subnets": [f"10.{i}.0.0/24"],
                                 "uplinks": [{"name": "isp", "address": f"192.0.2.{i + 1}"}]}, actor="t")
    first = st1.payload("s1", None)
    assert first["version"] == 1 and digest(first["full"]) == first["digest"]
    st1.service.create_policy({"name": "voice", "match": {"proto": "udp"}, "priority": 5}, actor="t")
    d = st1.payload("s1", 1)
    assert d["version"] == 2 and [op["item"] for op in d["delta"]] == ["voice"]
    s2 = apply(first["full"], d["delta"])
    assert digest(s2) == d["digest"]
    # one part per distinct value: the policies part once for all sites, the paths part per site
    n_parts = len(st1._known)
    assert st1.payload("s0", None)["version"] == 1 and len(st1._known) == n_parts + 2
    db.close()

    db, st2 = store()   # a restart: versions, manifests and parts come from the database
    assert st2.payload("s1", 2) == {"version": 2, "digest": d["digest"], "unchanged": True}
    st2.service.create_site({"name": "s3", "subnets": ["10.3.0.0/24"],
                             "uplinks": [{"name": "isp", "address": "192.0.2.4"}]}, actor="t")
    d3 = st2.payload("s1", 2)
    assert d3["version"] == 3 and {op["key"] for op in d3["delta"]} == {"order", "sites", "paths"}
    s3 = apply(s2, d3["delta"])
    assert digest(s3) == d3["digest"] and s3 == st2.payload("s1", None)["full"]
    # the parts of states nobody holds any more are gone; a state whose parts are gone gets a full copy
    rows = {r["digest"] for r in db.query("SELECT digest FROM agent_parts")}
    assert rows == st2._known
    db.execute("DELETE FROM agent_parts")
    db.close()
    db, st3 = store()
    st3.service.delete_policy("voice", actor="t")
    assert "full" in st3.payload("s1", 3)
    db.close()


def test_full_states_of_the_older_table_are_imported(tmp_path: Path) -> None:
    from patronus.agent import canonical
    from patronus.controller.db import ControllerDB
    from patronus.controller.service import Service

    db = ControllerDB(tmp_path / "c.db")
    svc = Service(tmp_path / "s.db", db)
    svc.create_site({"name": "hq", "subnets": ["10.0.0.0/24"], "uplinks": [{"name": "isp", "address": "192.0.2.1"}]},
                    actor="t")
    state = agents.desired_state(svc.mesh(), "hq")
    with db.transaction() as c:
        c.execute("CREATE TABLE agent_state (site TEXT PRIMARY KEY, version INTEGER NOT NULL, digest TEXT NOT NULL, "
                  "state TEXT NOT NULL, prev TEXT, updated REAL NOT NULL)")
        c.execute("INSERT INTO agent_state VALUES ('hq', 7, 'x', ?, NULL, 1.0)", (canonical(state).decode(),))
    store = agents.AgentStore(svc, None, pin=None)
    assert store.payload("hq", 7) == {"version": 7, "digest": digest(state), "unchanged": True}
    assert not db.query("SELECT 1 FROM sqlite_master WHERE name = 'agent_state'")
    db.close()


def test_retention_deletes_what_is_old_and_keeps_the_rest(tmp_path: Path) -> None:
    """One housekeeping round (the controller runs one a minute): telemetry
    received over a day ago, state metrics and flow records over a week old
    go; recent rows of every kind stay."""
    from types import SimpleNamespace

    from patronus.controller.app import housekeeping
    from patronus.controller.auth import Auth, load_signing_key
    from patronus.controller.db import ControllerDB
    from patronus.controller.server import files, init
    from patronus.controller.service import Service
    from patronus.store import Store

    init(tmp_path / "c")
    f = files(tmp_path / "c")
    db = ControllerDB(f["db"], create=False)
    svc = Service(f["state"], db)
    store = agents.AgentStore(svc, None, pin=None)
    app = SimpleNamespace(state=SimpleNamespace(service=svc, auth=Auth(db, load_signing_key(f["signing_key"])),
                                                agents=SimpleNamespace(agent_store=store)))
    now = time.time()
    with db.transaction() as c:
        c.executemany("INSERT INTO agent_telemetry (site, received, kind, ts, path, data) VALUES (?,?,?,?,?,?)",
                      [("s0", now - 2 * 86400, "metric", now - 2 * 86400, None, "{}"),
                       ("s0", now - 60, "metric", now - 60, None, "{}")])
    rec = {"src": "10.0.0.1", "dst": "10.1.0.1", "sport": 1, "dport": 2, "proto": 17, "packets": 1, "bytes": 100,
           "first_ns": 0, "last_ns": 0, "policy": None, "path": None, "tcp_flags": 0}
    with Store(f["state"]) as st:
        st.add_flow_records(now - 8 * 86400, "s0", [rec])
        st.add_flow_records(now - 3600, "s0", [{**rec, "sport": 9}])
        st.add_path_metrics(now - 8 * 86400, [("a.u~b.u", 1.0, 0.0, 0.0, 4.4, None, None)])
        st.add_path_metrics(now - 3600, [("a.u~b.u", 2.0, 0.0, 0.0, 4.4, None, None)])
    done = housekeeping(app)
    assert done["agent_telemetry"] == 1 and done["state.flow_snapshots"] == 1 and done["state.path_metrics"] == 1, done
    assert [r["received"] for r in db.query("SELECT received FROM agent_telemetry")] == [now - 60]
    with Store(f["state"]) as st:
        assert [r["sport"] for r in st.flow_snapshots()] == [9]
        assert [r["rtt_ms"] for r in st.path_metrics("a.u~b.u")] == [2.0]
    assert housekeeping(app)["agent_telemetry"] == 0   # nothing left to delete
    db.close()


def test_bgp_state_is_validated_stored_and_read_by_site(ctl: AgentController) -> None:
    """An agent with --bgp reports its edge (sessions, routes received,
    accepted, refused, advertised); GET /agents/{site}/bgp returns the last
    report to users who may read sites; a malformed report is refused whole."""
    cred = credential(ctl, "br1")
    bgp = {"sessions": {"10.2.0.2": "up"}, "received": 4, "accepted": ["10.2.100.0/24"],
           "refused": {"default_route": 1, "other_site": 1}, "refused_now": {"0.0.0.0/0": "default_route"},
           "advertised": ["10.1.0.0/24", "10.1.100.0/24"], "looped": 2,
           "speaker": {"alive": True, "exits": 0, "restarts": 0}}
    with ctl.client(cred) as c:
        r = c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", "bgp": bgp})
        assert r.status_code == 200, r.text
        for bad, field in (({**bgp, "accepted": ["10.2.100.1/24"]}, "bgp.accepted"),
                           ({**bgp, "sessions": {"router": "up"}}, "bgp.sessions"),
                           ({**bgp, "refused": {"because": 1}}, "bgp.refused.because.[key]"),
                           ({**bgp, "advertised": ["10.0.0.0/8"] * 1_001}, "bgp.advertised")):
            p = problem(c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", "bgp": bad}), 422)
            assert p.get("field", "").startswith(field.split(".[")[0]), (field, p)
    with ctl.admin() as a:
        got = a.get(f"{PREFIX}/agents/br1/bgp").raise_for_status().json()
        assert {k: got[k] for k in bgp} == bgp and got["site"] == "br1"
        assert a.get(f"{PREFIX}/agents/hq/bgp").status_code == 404
        assert a.get(f"{PREFIX}/agents/br1%2F..%2Fx/bgp").status_code in (404, 422)
    with ctl.client() as anon:
        assert anon.get(f"{PREFIX}/agents/br1/bgp").status_code == 401
    with ctl.client(cred) as agent:   # an agent credential reads no site's state
        assert agent.get(f"{PREFIX}/agents/br1/bgp").status_code in (401, 403)
