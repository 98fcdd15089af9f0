"""kill -9 during writes leaves a consistent store.

The real controller (``patronus controller run`` in a subprocess) takes
mutations from several writer threads (sites and policies created, replaced
with ``If-Match``, deleted) and is killed with SIGKILL once the round has
had a given number of acknowledged writes. After each kill:

- ``PRAGMA integrity_check`` (and ``foreign_key_check``) of the controller
  database and of the state file is ok, and the mesh loads and validates;
- restarted on the same state, every acknowledged write is there with the
  ETag it was acknowledged with (or what a later write of the same writer to
  the same object made of it, acknowledged or in flight at the kill), and
  nothing exists that was never sent;
- the audit log has exactly one ok row for every acknowledged mutation and
  for every in-flight one that took effect, none for one that did not, and
  replaying its before/after from an empty mesh gives the final state; it
  is append-only (the rows before a kill are an unchanged prefix of the rows
  after it, ids have no gaps, UPDATE and DELETE are refused).

Two deterministic cases pin the window between the two files' commits: a
process that dies right after the state file committed a change, and one
that dies right before (``os._exit`` in a child process).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from patronus.controller import server  # noqa: E402
from patronus.controller.app import PREFIX  # noqa: E402
from patronus.controller.db import ControllerDB  # noqa: E402
from patronus.controller.service import Service, etag_of  # noqa: E402
from patronus.model import Policy, Site  # noqa: E402
from patronus.store import Store  # noqa: E402

from .controller_server import Controller  # noqa: E402

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"
WRITERS = 4
ROUNDS = 3
MESH_ACTIONS = ("site.create", "site.replace", "site.delete", "policy.create", "policy.replace", "policy.delete")


# -- what the writers send ------------------------------------------------------------------


def site_body(name: str, n: int, subnets: int = 1) -> dict[str, Any]:
    return {"name": name, "subnets": [f"10.{n // 256}.{n % 256}.0/24", *(
                f"172.{16 + (n // 256) % 16}.{n % 256}.{16 * k}/28" for k in range(1, subnets))],
            "uplinks": [{"name": "isp1", "address": f"198.18.{n // 250}.{n % 250 + 1}"}]}


def policy_body(name: str, priority: int, port: int) -> dict[str, Any]:
    return {"name": name, "match": {"proto": "udp", "dst_ports": f"{port}-{port + 1}"}, "priority": priority}


def canonical(kind: str, body: dict[str, Any]) -> str:
    """The ETag the server gives ``body`` (its canonical form's)."""
    obj = Site.from_dict(body) if kind == "site" else Policy.from_dict(body)
    return etag_of(obj.to_dict())


@dataclass
class Op:
    """One mutation a writer sent: ``acked`` once the server answered 2xx."""

    writer: int
    action: str                 # site.create, policy.replace, ...
    target: str                 # site/NAME, policy/NAME
    before: str | None          # the ETag it replaces (None: a create)
    after: str | None           # the ETag it makes (None: a delete)
    acked: bool = False
    etag: str | None = None     # the ETag header of the answer


@dataclass
class Writer:
    """A thread of mutations on objects of its own (so its view of them is exact)."""

    idx: int
    url: str
    cert: str
    token: str
    numbers: Any
    seed: int
    live: dict[str, str] = field(default_factory=dict)     # target -> ETag, as acknowledged
    ops: list[Op] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event, acked: Any) -> None:
        rng = random.Random(self.seed)
        ctx = ssl.create_default_context(cafile=self.cert)
        with httpx.Client(base_url=self.url, verify=ctx, timeout=10.0,
                          headers={"Authorization": f"Bearer {self.token}"}) as c:
            while not stop.is_set():
                op, method, url, body, headers = self.next_op(rng)
                self.ops.append(op)
                while True:
                    try:
                        r = c.request(method, url, json=body, headers=headers)
                    except httpx.HTTPError:
                        return        # the server is gone: op stays unacknowledged (in flight)
                    if r.status_code == 429:
                        time.sleep(float(r.headers.get("retry-after", "0.1")) / 10)
                        if stop.is_set():
                            return
                        continue
                    break
                if r.status_code >= 300:
                    if not stop.is_set():
                        self.errors.append(f"{method} {url}: {r.status_code} {r.text[:300]}")
                        stop.set()
                    return
                op.acked = True
                op.etag = r.headers.get("etag")
                if op.after is None:
                    self.live.pop(op.target, None)
                else:
                    self.live[op.target] = op.etag or ""
                acked()

    def next_op(self, rng: random.Random) -> tuple[Op, str, str, Any, dict[str, str]]:
        sites = sorted(t for t in self.live if t.startswith("site/"))
        policies = sorted(t for t in self.live if t.startswith("policy/"))
        choices = []
        if len(sites) < 4:
            choices += ["site.create"] * 3
        if len(policies) < 6:
            choices += ["policy.create"] * 3
        if sites:
            choices += ["site.replace", "site.delete"]
        if policies:
            choices += ["policy.replace"] * 3 + ["policy.delete"]
        action = rng.choice(choices)
        kind, verb = action.split(".")
        n = next(self.numbers)
        if verb == "create":
            name = f"w{self.idx}{kind[0]}{n}"
            target = f"{kind}/{name}"
        else:
            target = rng.choice(sites if kind == "site" else policies)
            name = target.split("/", 1)[1]
        body = None
        if verb != "delete":
            body = (site_body(name, n, subnets=1 + n % 3) if kind == "site"
                    else policy_body(name, 100_000 * (self.idx + 1) + n, 2000 + n))
        op = Op(self.idx, action, target, self.live.get(target), None if body is None else canonical(kind, body))
        collection = f"{PREFIX}/{'policies' if kind == 'policy' else 'sites'}"
        if verb == "create":
            return op, "POST", collection, body, {}
        headers = {"If-Match": self.live[target]}
        return op, "PUT" if verb == "replace" else "DELETE", f"{collection}/{name}", body, headers


# -- checks -------------------------------------------------------------------------------------


def integrity(path: Path) -> None:
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
        assert con.execute("PRAGMA foreign_key_check").fetchall() == [], path
    finally:
        con.close()


def audit_rows(db: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, ts, actor, action, target, before, after, remote, ok FROM audit "
                           "ORDER BY id").fetchall()
    finally:
        con.close()


def final_state(c: httpx.Client) -> dict[str, str]:
    out = {}
    for kind in ("site", "policy"):
        r = c.get(f"{PREFIX}/{'policies' if kind == 'policy' else 'sites'}")
        r.raise_for_status()
        for item in r.json()["items"]:
            out[f"{kind}/{item['name']}"] = etag_of(item)
    return out


def tag(text: str | None) -> str | None:
    return None if text is None else etag_of(json.loads(text))


def check_round(ctl: Controller, writers: list[Writer], truth: dict[str, str], seen_audit: list[Any],
                admin_token: str) -> tuple[dict[str, str], list[Any]]:
    """Everything the module docstring promises after a kill; the verified state and audit rows."""
    f = server.files(ctl.state_dir)
    integrity(f["db"])
    integrity(f["state"])
    with Store(f["state"], create=False) as st:
        mesh = st.load_mesh()      # validates (Mesh.from_dict)
        list(mesh.paths())

    ctl.start()
    with ctl.client(admin_token) as c:
        assert c.get("/readyz").status_code == 200
        c.get(f"{PREFIX}/topology").raise_for_status()
        state = final_state(c)
        # the ETag header of one object is the one the list implies
        for target, etag in list(state.items())[:3]:
            kind, name = target.split("/", 1)
            r = c.get(f"{PREFIX}/{'policies' if kind == 'policy' else 'sites'}/{name}")
            assert r.headers["etag"] == etag

    # every object: what was there, changed by each writer's acknowledged ops, or by its one op in flight
    expected = dict(truth)
    in_flight: dict[str, Op] = {}
    for w in writers:
        for op in w.ops:
            if op.acked:
                assert op.etag == op.after, (op, "the acknowledged ETag is the canonical body's")
                assert expected.get(op.target) == op.before, op
                if op.after is None:
                    expected.pop(op.target)
                else:
                    expected[op.target] = op.after
            else:
                assert op is w.ops[-1], "only a writer's last op can be unacknowledged"
                in_flight[op.target] = op
    applied: list[Op] = []
    for target in set(expected) | set(state) | set(in_flight):
        got = state.get(target)
        op = in_flight.get(target)
        if got == expected.get(target):
            continue
        assert op is not None and got == op.after and expected.get(target) == op.before, \
            f"{target}: {got} is neither the acknowledged {expected.get(target)} nor what was in flight ({op})"
        applied.append(op)
    sent = {t for w in writers for t in (o.target for o in w.ops)} | set(truth)
    assert set(state) <= sent, f"objects never sent: {set(state) - sent}"

    # the audit log: append-only across the kill, no gaps, one ok row per mutation that took effect
    rows = audit_rows(f["db"])
    assert rows[:len(seen_audit)] == seen_audit, "rows written before the kill changed"
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "audit ids have gaps"
    new_rows = rows[len(seen_audit):]
    ok = [r for r in new_rows if r[3] in MESH_ACTIONS and r[8] == 1]
    keys = [(r[2], r[3], r[4], tag(r[5]), tag(r[6])) for r in ok]
    want = [(f"writer{o.writer}", o.action, o.target, o.before, o.after)
            for w in writers for o in w.ops if o.acked] + \
           [(f"writer{o.writer}", o.action, o.target, o.before, o.after) for o in applied]
    for k in want:
        assert keys.count(k) == 1, f"{k}: {keys.count(k)} ok audit rows, want exactly one"
    assert sorted(keys, key=repr) == sorted(want, key=repr), "ok audit rows for mutations that did not take effect"
    for o in in_flight.values():
        if o not in applied:
            k = (f"writer{o.writer}", o.action, o.target, o.before, o.after)
            assert k not in keys, f"an ok audit row for {o}, which did not take effect"

    # replaying before/after of every ok row since init gives the final state
    replay: dict[str, str] = {}
    for r in rows:
        if r[3] in MESH_ACTIONS and r[8] == 1:
            assert replay.get(r[4]) == tag(r[5]), f"audit {r[0]}: before does not match the replayed state"
            if r[6] is None:
                replay.pop(r[4])
            else:
                replay[r[4]] = tag(r[6])
    assert replay == state
    con = sqlite3.connect(f"file:{f['db']}?mode=ro", uri=True)
    try:
        pending = con.execute("SELECT count(*) FROM pending_change").fetchone()[0]
    finally:
        con.close()
    assert pending == 0, "a change is still pending after the restart"
    settled = sum(1 for r in new_rows if r[3] in MESH_ACTIONS and r[8] == 0 and "not applied" in (r[6] or ""))
    print(f"kill: {sum(o.acked for w in writers for o in w.ops)} acknowledged, {len(in_flight)} in flight, "
          f"{len(applied)} of them applied, {settled} settled as not applied; {len(state)} objects")
    return state, rows


def test_kill_9_during_writes_leaves_a_consistent_store(tmp_path: Path) -> None:
    ctl = Controller(tmp_path / "ctl")
    ctl.start()
    try:
        admin_token = ctl.login("admin", ctl.admin_password)["access_token"]
        with ctl.client(admin_token) as a:
            for i in range(WRITERS):
                a.post(f"{PREFIX}/users", json={"name": f"writer{i}", "password": PASSWORD,
                                                "role": "operator"}).raise_for_status()
        # tokens outlive a restart (the signing key and the database do)
        tokens = [ctl.login(f"writer{i}", PASSWORD)["access_token"] for i in range(WRITERS)]
        numbers = itertools.count(1)
        truth: dict[str, str] = {}
        seen_audit: list[Any] = audit_rows(server.files(ctl.state_dir)["db"])
        rng = random.Random(20240501)
        live: dict[int, dict[str, str]] = {i: {} for i in range(WRITERS)}
        total_acked = 0
        started = time.monotonic()
        for rnd in range(ROUNDS):
            goal = rng.randint(30, 70)
            count = itertools.count(1)
            enough = threading.Event()
            stop = threading.Event()

            def acked(count: Any = count, goal: int = goal, enough: threading.Event = enough) -> None:
                if next(count) >= goal:
                    enough.set()

            writers = [Writer(i, ctl.url, ctl.cert, tokens[i], numbers, seed=rnd * 100 + i, live=dict(live[i]))
                       for i in range(WRITERS)]
            threads = [threading.Thread(target=w.run, args=(stop, acked), daemon=True) for w in writers]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while not enough.wait(0.05) and not stop.is_set():   # stop: a writer met an error
                assert time.monotonic() < deadline, f"round {rnd}: fewer than {goal} writes acknowledged in 60 s"
            assert not stop.is_set(), [e for w in writers for e in w.errors]
            assert ctl.proc is not None
            # the event says enough is acknowledged; a jitter of up to about one write's time
            # moves the kill around inside the next change (else it lands right after an answer)
            time.sleep(rng.uniform(0, 0.02))
            os.kill(ctl.proc.pid, signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join(20)
                assert not t.is_alive()
            assert ctl.stop() == -signal.SIGKILL
            errors = [e for w in writers for e in w.errors]
            assert not errors, errors
            total_acked += sum(o.acked for w in writers for o in w.ops)

            truth, seen_audit = check_round(ctl, writers, truth, seen_audit, admin_token)
            # the next round starts from what is verified to be there
            for i in range(WRITERS):
                live[i] = {t: e for t, e in truth.items() if t.split("/", 1)[1].startswith(f"w{i}")}
        assert total_acked >= ROUNDS * 30
        assert time.monotonic() - started < 120
    finally:
        ctl.stop()

    # append-only: the database itself refuses to rewrite or drop history
    con = sqlite3.connect(server.files(ctl.state_dir)["db"])
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("UPDATE audit SET ok = 0 WHERE id = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("DELETE FROM audit WHERE id = (SELECT max(id) FROM audit)")
    finally:
        con.close()


# -- the window between the two files' commits, pinned -------------------------------------------

_CHILD = r"""
import os, sys
from patronus.controller.db import ControllerDB
from patronus.controller.service import Service
from patronus.store import Store

state, db, when = sys.argv[1:4]
svc = Service(state, ControllerDB(db))
save = Store.save_mesh

def dying_save(self, mesh):
    if when == "before":
        os._exit(9)
    save(self, mesh)
    if when == "after":
        os._exit(9)

Store.save_mesh = dying_save
svc.create_site({"name": "hq", "subnets": ["10.1.0.0/24"],
                 "uplinks": [{"name": "isp1", "address": "192.0.2.1"}]}, actor="crash")
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_death_around_the_state_commit_is_settled_on_restart(tmp_path: Path, when: str) -> None:
    state, db = tmp_path / "state.db", tmp_path / "ctl.db"
    with ControllerDB(db) as d:
        Service(state, d)
    p = subprocess.run([sys.executable, "-c", _CHILD, str(state), str(db), when], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 9, p.stderr
    with ControllerDB(db) as d:
        svc = Service(state, d)           # settles what the dead process left
        sites = [s.data["name"] for s in svc.list_sites()]
        rows = [r for r in d.audit_log(limit=1000) if r["action"] == "site.create"]
        assert d.query("SELECT count(*) AS n FROM pending_change")[0]["n"] == 0
    if when == "after":
        # the state file has the site: so does the audit log, exactly once
        assert sites == ["hq"]
        assert [(r["actor"], r["ok"], r["after"]["name"]) for r in rows] == [("crash", True, "hq")]
    else:
        # nothing was saved: no ok row, and the attempt is on record as not applied
        assert sites == []
        assert [(r["actor"], r["ok"]) for r in rows] == [("crash", False)]
        assert "not applied" in rows[0]["after"]["error"]
