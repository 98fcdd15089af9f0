"""The controller store's conformance suite: one test body, both engines
(SQLite, and a real 3-member etcd cluster of Debian's etcd-server on
loopback). What the service layer relies on: rows with defaults, all or
nothing, no lost update under concurrent read-modify-write, the audit log
(joined to the transaction, newest first, paged without gaps), schema
versions refused when newer, and the service's mesh changes (If-Match,
conflicts, audit, events) the same on both."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus.controller.db import ControllerDB
from patronus.controller.problems import Conflict, NotFound, PreconditionFailed
from patronus.controller.tables import Exists, StoreConflict
from patronus.errors import SchemaVersionError

from .etcd_cluster import EtcdCluster, missing

ENGINES = ["sqlite", "etcd"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: Any) -> Iterator[EtcdCluster | None]:
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        yield None
        return
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), 3) as c:
        yield c


def open_db(engine: str, cluster: EtcdCluster | None, base: Path, prefix: str | None = None) -> Any:
    if engine == "sqlite":
        return ControllerDB(base / f"c-{uuid.uuid4().hex[:6]}.db")
    if cluster is None:
        pytest.skip("etcd is not installed")
    from patronus.controller.etcd import EtcdDB

    prefix = prefix or f"/t{uuid.uuid4().hex[:8]}"
    return EtcdDB(cluster.url + prefix, local=base / f"l-{uuid.uuid4().hex[:6]}.db")


@pytest.fixture(params=ENGINES)
def db(request: Any, cluster: EtcdCluster | None, tmp_path: Path) -> Iterator[Any]:
    d = open_db(request.param, cluster, tmp_path)
    try:
        yield d
    finally:
        d.close()


def test_rows_have_their_defaults_and_keys(db: Any) -> None:
    with db.transaction() as t:
        t.insert("users", {"name": "alice", "role": "admin", "pw_hash": "h", "created": 1.0})
        t.insert("users", {"name": "bob/1", "role": "viewer", "pw_hash": "h", "created": 2.0})
        with pytest.raises(Exists):
            t.insert("users", {"name": "alice", "role": "viewer", "pw_hash": "x", "created": 3.0})
        with pytest.raises(KeyError):
            t.insert("users", {"name": "carol", "nope": 1})
    with db.reading() as t:
        a = t.get("users", "alice")
        assert a == {"name": "alice", "role": "admin", "pw_hash": "h", "totp_secret": None, "totp_enabled": 0,
                     "totp_last_step": None, "recovery": "[]", "token_gen": 0, "created": 1.0, "disabled": 0}
        assert t.get("users", "bob/1")["role"] == "viewer"
        assert t.get("users", "nobody") is None
        assert [r["name"] for r in t.rows("users")] == ["alice", "bob/1"]
        assert [r["name"] for r in t.rows("users", role="viewer")] == ["bob/1"]
        assert t.rows("users", role="operator") == []
    with db.transaction() as t:
        assert t.update("users", "alice", token_gen=3, disabled=1)
        assert not t.update("users", "nobody", disabled=1)
        assert t.delete("users", "bob/1")
        assert not t.delete("users", "bob/1")
    with db.reading() as t:
        assert [(r["name"], r["token_gen"], r["disabled"]) for r in t.rows("users")] == [("alice", 3, 1)]
    with db.transaction() as t:   # an indexed column changed: found by its new value only
        assert t.update("users", "alice", role="viewer")
        assert t.rows("users", role="admin") == [] and [r["name"] for r in t.rows("users", role="viewer")] == ["alice"]
    with db.reading() as t:
        assert t.rows("users", role="admin") == [] and [r["name"] for r in t.rows("users", role="viewer")] == ["alice"]
        assert t.rows("users", role="viewer", disabled=0) == []


def test_transactions_on_rows_found_by_an_index_do_not_conflict(db: Any) -> None:
    """Two refresh-token rotations of different tokens at once: both commit (a lookup by an indexed
    column depends on the matching rows, not the table)."""
    with db.transaction() as t:
        t.insert("users", {"name": "u", "role": "viewer", "pw_hash": "h", "created": 0.0})
        for i in range(2):
            t.insert("refresh_tokens", {"id": f"r{i}", "family": f"f{i}", "user": "u", "token_hash": f"h{i}",
                                        "issued": 0.0, "expires": 9e9})
    read = threading.Semaphore(0)
    out: list[str] = []

    def rotate(i: int) -> None:
        try:
            with db.transaction() as t:
                (row,) = t.rows("refresh_tokens", token_hash=f"h{i}")
                read.release()
                read.acquire(timeout=3)   # both have read before either writes (SQLite: serialised instead)
                read.release()
                t.update("refresh_tokens", row["id"], used_at=1.0)
                t.insert("refresh_tokens", {"id": f"n{i}", "family": row["family"], "user": "u",
                                            "token_hash": f"n{i}", "issued": 1.0, "expires": 9e9})
            out.append("ok")
        except StoreConflict:
            out.append("conflict")

    ths = [threading.Thread(target=rotate, args=(i,)) for i in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    assert out == ["ok", "ok"]
    with db.reading() as t:
        assert sorted(r["id"] for r in t.rows("refresh_tokens", family="f0")) == ["n0", "r0"]
        assert [r["id"] for r in t.rows("refresh_tokens", used_at=1.0)] == ["r0", "r1"]


def test_a_failed_transaction_writes_nothing(db: Any) -> None:
    with pytest.raises(RuntimeError):
        with db.transaction() as t:
            t.insert("revoked_jti", {"jti": "j1", "expires": 1.0})
            db.audit("me", "x.do", "j1")
            assert t.get("revoked_jti", "j1") is not None   # a transaction reads its own writes
            raise RuntimeError("boom")
    with db.reading() as t:
        assert t.get("revoked_jti", "j1") is None
    assert db.audit_log() == []


def test_nested_transactions_join_the_outer_one(db: Any) -> None:
    with db.transaction() as t:
        t.insert("revoked_jti", {"jti": "a", "expires": 1.0})
        with db.transaction() as inner:
            inner.insert("revoked_jti", {"jti": "b", "expires": 2.0})
            db.audit("me", "both", "ab")
    with db.reading() as t:
        assert [r["jti"] for r in t.rows("revoked_jti")] == ["a", "b"]
    assert [r["action"] for r in db.audit_log()] == ["both"]


def test_audit_is_newest_first_paged_without_gaps_and_redacted(db: Any) -> None:
    for i in range(25):
        db.audit("alice", "site.create", f"s{i}", after={"i": i, "password": "hunter2hunter2"}, remote="10.0.0.1")
    rows = db.audit_log(limit=1000)
    assert [r["target"] for r in rows] == [f"s{i}" for i in reversed(range(25))]
    assert all(r["after"]["password"] == "<redacted>" and r["ok"] is True for r in rows)
    seen, before = [], None
    while True:
        page = db.audit_log(limit=7, before_id=before)
        if not page:
            break
        seen += [r["target"] for r in page]
        before = page[-1]["id"]
    assert seen == [r["target"] for r in rows]
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)


def _increment(db: Any, n: int, errors: list[BaseException]) -> None:
    try:
        for _ in range(n):
            while True:
                try:
                    with db.transaction() as t:
                        r = t.get("users", "counter")
                        t.update("users", "counter", token_gen=r["token_gen"] + 1)
                    break
                except StoreConflict:
                    continue
    except BaseException as e:  # noqa: BLE001 - handed to the test
        errors.append(e)


def test_concurrent_read_modify_write_loses_no_update(db: Any) -> None:
    with db.transaction() as t:
        t.insert("users", {"name": "counter", "role": "viewer", "pw_hash": "h", "created": 0.0})
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_increment, args=(db, 15, errors)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    with db.reading() as t:
        assert t.get("users", "counter")["token_gen"] == 60


def test_a_decision_on_a_listed_table_is_not_undone_by_a_concurrent_insert(db: Any) -> None:
    """Write skew: 'at most one admin' decided by listing the table holds under concurrency."""
    results: list[str] = []
    read = threading.Semaphore(0)

    def add(name: str) -> None:
        try:
            with db.transaction() as t:
                admins = t.rows("users", role="admin")
                read.release()
                # etcd: both have read before either writes (the race this is about); SQLite: the
                # other waits for the write lock, so this one goes on when the wait runs out
                read.acquire(timeout=3)
                read.release()
                if admins:
                    results.append("refused")
                    return
                t.insert("users", {"name": name, "role": "admin", "pw_hash": "h", "created": 0.0})
            results.append("added")
        except StoreConflict:
            results.append("conflict")

    ths = [threading.Thread(target=add, args=(n,)) for n in ("a1", "a2")]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    with db.reading() as t:
        assert len(t.rows("users", role="admin")) == 1, results
    assert results.count("added") == 1, results


def test_a_newer_schema_is_refused(db: Any, cluster: EtcdCluster | None, tmp_path: Path) -> None:
    if db.kind == "sqlite":
        with db.transaction() as t:
            t.execute("UPDATE schema_version SET version = version + 1")
        with pytest.raises(SchemaVersionError):
            ControllerDB(db.path)
        return
    from patronus.controller.etcd import EtcdDB

    with db.transaction() as t:
        t.raw_put(f"{db.prefix}/schema", json.dumps({"version": db.version + 1}).encode())
    with pytest.raises(SchemaVersionError):
        EtcdDB(db.url, local=tmp_path / "again.db")


# -- a model of the tables, against random operations --------------------------------------

_names = st.sampled_from(["a", "b", "c/d", "é", "x y"])
_ops = st.lists(st.one_of(
    st.tuples(st.just("insert"), _names, st.integers(0, 9)),
    st.tuples(st.just("put"), _names, st.integers(0, 9)),
    st.tuples(st.just("update"), _names, st.integers(0, 9)),
    st.tuples(st.just("delete"), _names, st.just(0)),
), min_size=1, max_size=12)


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.tuples(_ops, st.booleans()), min_size=1, max_size=4))
def test_the_store_behaves_as_a_dict_of_rows(engine: str, cluster: EtcdCluster | None, tmp_path: Path,
                                             batches: list[tuple[list[tuple[str, str, int]], bool]]) -> None:
    db = open_db(engine, cluster, tmp_path)
    model: dict[str, int] = {}
    try:
        for ops, fail in batches:
            trial = dict(model)
            try:
                with db.transaction() as t:
                    for op, name, v in ops:
                        row = {"jti": name, "expires": float(v)}
                        if op == "insert":
                            if name in trial:
                                with pytest.raises(Exists):
                                    t.insert("revoked_jti", row)
                            else:
                                t.insert("revoked_jti", row)
                                trial[name] = v
                        elif op == "put":
                            t.put("revoked_jti", row)
                            trial[name] = v
                        elif op == "update":
                            assert t.update("revoked_jti", name, expires=float(v)) == (name in trial)
                            if name in trial:
                                trial[name] = v
                        else:
                            assert t.delete("revoked_jti", name) == (name in trial)
                            trial.pop(name, None)
                        assert {r["jti"]: int(r["expires"]) for r in t.rows("revoked_jti")} == trial
                    if fail:
                        raise RuntimeError("roll back")
                model = trial
            except RuntimeError:
                pass
            with db.reading() as t:
                assert {r["jti"]: int(r["expires"]) for r in t.rows("revoked_jti")} == model
    finally:
        db.close()


# -- the service on both engines -----------------------------------------------------------

SITE = {"name": "hq", "subnets": ["10.1.0.0/24"], "uplinks": [{"name": "isp1", "address": "192.0.2.1"}]}
SITE2 = {"name": "br", "subnets": ["10.2.0.0/24"], "uplinks": [{"name": "isp1", "address": "192.0.2.2"}]}


def test_the_service_changes_the_mesh_the_same_way(db: Any, tmp_path: Path) -> None:
    from patronus.controller.service import Service

    svc = Service(tmp_path / f"state-{uuid.uuid4().hex[:6]}.db", db)
    seen: list[dict[str, Any]] = []
    got = threading.Event()

    def listen(e: dict[str, Any]) -> None:
        seen.append(e)
        if e["type"] == "policy.delete":
            got.set()

    svc.changes.subscribe(listen)   # no loop bound: published in the thread that has the change
    try:
        hq = svc.create_site(SITE, actor="t")
        svc.create_site(SITE2, actor="t")
        with pytest.raises(Conflict):
            svc.create_site(SITE, actor="t")
        pol = svc.create_policy({"name": "voip", "priority": 10, "app": "voip", "match": {"proto": "udp"}}, actor="t")
        with pytest.raises(Conflict):
            svc.create_policy({"name": "other", "priority": 10, "match": {"proto": "tcp"}}, actor="t")
        changed = svc.replace_site("hq", {**SITE, "subnets": ["10.9.0.0/24"]}, if_match=hq.etag, actor="t")
        with pytest.raises(PreconditionFailed):
            svc.replace_site("hq", SITE, if_match=hq.etag, actor="t")
        assert svc.get_site("hq").etag == changed.etag
        assert svc.get_site("hq").data["subnets"] == ["10.9.0.0/24"]
        svc.delete_policy("voip", if_match=pol.etag, actor="t")
        with pytest.raises(NotFound):
            svc.get_policy("voip")
        assert [s.data["name"] for s in svc.list_sites()] == ["hq", "br"]
        log = db.audit_log()
        assert [(r["action"], r["ok"]) for r in log][:3] == [("policy.delete", True), ("site.replace", False),
                                                             ("site.replace", True)]
        assert sum(1 for r in log if r["ok"]) == 5   # two sites, a policy, a replace, a delete
        assert got.wait(30), seen   # etcd: from the watch, as every replica sees it
        assert [e["type"] for e in seen] == ["site.create", "site.create", "policy.create", "site.replace",
                                             "policy.delete"]
        seqs = [e["seq"] for e in seen]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finally:
        svc.close()


def test_every_site_of_a_large_mesh_gets_its_desired_state_versioned(db: Any, tmp_path: Path) -> None:
    """120 sites at once (a policy change pushes to all of them): within etcd's 128 operations a transaction,
    each site's version bumped exactly once per change, parts stored once and collected when unused."""
    from patronus.controller.agents import AgentStore
    from patronus.controller.service import Service

    svc = Service(tmp_path / f"state-{uuid.uuid4().hex[:6]}.db", db)
    try:
        names = [f"s{i}" for i in range(120)]
        for i, n in enumerate(names):
            svc.create_site({"name": n, "subnets": [f"10.{i}.0.0/24"],
                             "uplinks": [{"name": "isp", "address": f"192.0.{i // 250}.{i % 250 + 1}"}]}, actor="t")
        store = AgentStore(svc, None, pin=None)
        first = store.refresh(store.snapshot(), names)
        assert {v[0] for v in first.values()} == {1}
        assert store.refresh(store.snapshot(), names) == first   # nothing changed: nothing written
        svc.create_policy({"name": "voip", "priority": 10, "match": {"proto": "udp"}}, actor="t")
        second = store.refresh(store.snapshot(), names)
        assert {v[0] for v in second.values()} == {2}
        with db.reading() as t:
            stored = {r["digest"] for r in t.rows("agent_parts")}
        used = {d for v in second.values() for m in (v[2], v[3]) for d in m.values()}
        assert stored == used
    finally:
        svc.close()
