"""Adversarial state files: truncated, random, hostile rows. Every read path
of the store gives StateError naming the file; retention (Store.prune)."""

from __future__ import annotations

import os
import random
import sqlite3
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus import ConfigError, Match, Mesh, Policy, Site, StateError, Uplink
from patronus.abi import FLOW_DTYPE
from patronus.store import MAX_ROWS, RETENTION_S, Store, load_mesh, save_mesh


def big_mesh() -> Mesh:
    m = Mesh("acme")
    for i in range(40):
        m.add_site(Site(f"s{i}", subnets=[f"10.{i}.0.0/16"],
                        uplinks=[Uplink("a", f"192.0.{i}.1"), Uplink("b", f"198.51.{i}.1")]))
    for i in range(60):
        m.add_policy(Policy(f"p{i}", Match(proto="udp", dst_ports=i), priority=i, prefer=["b"]))
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    f = tmp_path_factory.mktemp("st") / "state.db"
    save_mesh(big_mesh(), f)
    with Store(f) as st_:
        st_.add_event("initial", policy="p1", to_path="s0.a~s1.a", ts=1.0)
        st_.add_path_metrics(1.0, [("s0.a~s1.a", 1.0, 2.0, 0.0, 4.4, 1420, 100.0)])
        st_.add_flow_snapshot(1.0, "s0", _flows(3), ["p0"])
    assert not os.path.exists(f"{f}-wal") or os.path.getsize(f"{f}-wal") == 0
    return f.read_bytes()


def _flows(n):
    a = np.zeros(n, FLOW_DTYPE)
    a["family"] = 4
    a["path"] = 0xFFFFFFFF
    return a


def read_everything(f):
    """Every read path; returns normally or raises StateError, nothing else."""
    with Store(f, create=False) as s:
        s.version
        s.events()
        s.path_metrics()
        s.path_metrics("s0.a~s1.a")
        s.flow_snapshots()
        s.load_mesh()


def only_state_error(f):
    try:
        load_mesh(f)
    except StateError as e:
        assert str(f) in str(e)
    try:
        read_everything(f)
    except StateError as e:
        assert str(f) in str(e)


# -- damaged files -----------------------------------------------------------

def test_truncated_files_give_state_error(tmp_path, saved):
    assert len(saved) > 8 * 4096
    cuts = sorted({0, 1, 50, 99, 100, 101, 512, 4095, 4096, 4097, 8192, 12000, len(saved) // 2, len(saved) - 4096,
                   len(saved) - 1} | {random.Random(i).randrange(len(saved)) for i in range(20)})
    for n in cuts:
        f = tmp_path / f"cut{n}.db"
        f.write_bytes(saved[:n])
        only_state_error(f)


def test_random_bytes_give_state_error(tmp_path, saved):
    rnd = random.Random(7)
    for i in range(20):
        f = tmp_path / f"r{i}.db"
        body = bytes(rnd.randrange(256) for _ in range(rnd.choice([10, 100, 4096, 20000])))
        f.write_bytes(body if i % 2 else saved[:100] + body)  # half of them with a valid SQLite header
        only_state_error(f)


def test_flipped_bytes_give_state_error(tmp_path, saved):
    rnd = random.Random(11)
    for i in range(30):
        b = bytearray(saved)
        for _ in range(rnd.choice([1, 10, 200])):
            b[rnd.randrange(100, len(b))] = rnd.randrange(256)
        f = tmp_path / f"flip{i}.db"
        f.write_bytes(bytes(b))
        only_state_error(f)


# -- hostile rows in a valid database ---------------------------------------

HOSTILE = {
    "failover not json": "UPDATE mesh SET failover = '{not json'",
    "failover an integer": "UPDATE mesh SET failover = 5",
    "failover a blob": "UPDATE mesh SET failover = X'FFFE00'",
    "failover nested deep": "UPDATE mesh SET failover = '" + "[" * 100_000 + "'",
    "failover a list": "UPDATE mesh SET failover = '[1, 2]'",
    "failover infinite": "UPDATE mesh SET failover = '{\"detect_ms\": 1e999}'",
    "name invalid utf-8": "UPDATE mesh SET name = CAST(X'FF61' AS TEXT)",
    "name a blob": "UPDATE mesh SET name = X'6869'",
    "profile body not json": "INSERT INTO profiles VALUES ('x', 99, 'nope')",
    "profile body null": "INSERT INTO profiles VALUES ('x', 99, 'null')",
    "subnet invalid utf-8": "UPDATE site_subnets SET cidr = CAST(X'C328' AS TEXT) WHERE position = 0",
    "subnet an integer": "UPDATE site_subnets SET cidr = 167772160",
    "mtu text": "UPDATE uplinks SET mtu = 'big'",
    "mtu real": "UPDATE uplinks SET mtu = 1500.5",
    "bandwidth infinite": "UPDATE uplinks SET bandwidth_mbps = 1e999",
    "port huge": "UPDATE uplinks SET port = 9223372036854775807",
    "uplink name with a dot": "UPDATE uplinks SET name = 'a.b' WHERE name = 'a'",
    "prefer not json": "UPDATE policies SET prefer = '[\"b\"'",
    "prefer a mapping": "UPDATE policies SET prefer = '{\"a\": 1}'",
    "prefer deep": "UPDATE policies SET prefer = '" + "[" * 50_000 + "]" * 50_000 + "'",
    "prefer invalid utf-8": "UPDATE policies SET prefer = CAST(X'5B22FF225D' AS TEXT)",
    "dports garbage": "UPDATE policies SET dports = 'x-y'",
    "sport pair half": "UPDATE policies SET sport_lo = 5, sport_hi = NULL, sports = NULL",
    "action unknown": "UPDATE policies SET action = 'explode'",
    "protos blob": "UPDATE policies SET protos = X'00'",
    "sites table gone": "DROP TABLE site_subnets",
    "mesh table gone": "DROP TABLE mesh",
    "schema version text": "UPDATE schema_version SET version = 'abc'",
    "schema version blob": "UPDATE schema_version SET version = X'00'",
    "schema version negative": "UPDATE schema_version SET version = -5",
    "schema_version empty twice": "INSERT INTO schema_version VALUES (1)",
}


@pytest.mark.parametrize("sql", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_mesh_rows_give_state_error(tmp_path, saved, sql):
    f = tmp_path / "h.db"
    f.write_bytes(saved)
    db = sqlite3.connect(f)
    db.executescript(sql)
    db.close()
    only_state_error(f)


RECORDS = {
    "event reason invalid utf-8": "UPDATE failover_events SET reason = CAST(X'FF' AS TEXT)",
    "event ts text": "UPDATE failover_events SET ts = 'yesterday'",
    "event detail blob": "UPDATE failover_events SET detail = X'00FF'",
    "metric path invalid utf-8": "UPDATE path_metrics SET path = CAST(X'C0' AS TEXT)",
    "metric rtt text": "UPDATE path_metrics SET rtt_ms = 'fast'",
    "snapshot src invalid utf-8": "UPDATE flow_snapshots SET src = CAST(X'FE' AS TEXT)",
    "snapshot packets text": "UPDATE flow_snapshots SET packets = 'many'",
    "events table gone": "DROP TABLE failover_events",
    "metrics table gone": "DROP TABLE path_metrics",
    "snapshots table gone": "DROP TABLE flow_snapshots",
}


@pytest.mark.parametrize("sql", RECORDS.values(), ids=RECORDS.keys())
def test_hostile_record_rows_give_state_error(tmp_path, saved, sql):
    f = tmp_path / "h.db"
    f.write_bytes(saved)
    db = sqlite3.connect(f)
    db.executescript(sql)
    db.close()
    with Store(f, create=False) as s, pytest.raises(StateError) as ei:
        s.events(), s.path_metrics(), s.flow_snapshots()
    assert str(f) in str(ei.value)


TABLES = {
    "mesh": ["name", "failover", "saved_at"], "profiles": ["name", "position", "body"],
    "sites": ["name", "position"], "site_subnets": ["site", "position", "cidr"],
    "uplinks": ["name", "position", "address", "mtu", "port", "nat", "bandwidth_mbps", "cost"],
    "policies": ["name", "position", "priority", "app", "src", "dst", "sport_lo", "sport_hi", "dport_lo", "dport_hi",
                 "proto", "dscp", "qos_dscp", "qos_rate_kbps", "prefer", "action", "sports", "dports", "protos"],
    "failover_events": ["ts", "policy", "from_path", "to_path", "reason", "detail", "site"],
    "path_metrics": ["ts", "path", "rtt_ms", "mtu"],
    "flow_snapshots": ["ts", "src", "sport", "packets", "policy"],
}
VALUES = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),   # no lone surrogates: sqlite3 cannot bind them
    st.binary(max_size=20), st.sampled_from(["[]", "{}", "null", "1e999", "[\"a\"]", "{\"detect_ms\": 3}", "10.0.0.0/8",
                                             "tcp", "a.b", "-1", "1e400"]),
    st.binary(min_size=1, max_size=8).map(lambda b: ("raw", b)),   # bytes stored as TEXT: maybe invalid UTF-8
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_cell_of_any_table_gives_a_mesh_or_state_error(tmp_path, saved, data):
    f = tmp_path / "any.db"
    for extra in ("-wal", "-shm"):   # left by the previous example
        if os.path.exists(f"{f}{extra}"):
            os.remove(f"{f}{extra}")
    f.write_bytes(saved)
    db = sqlite3.connect(f)
    try:
        for _ in range(data.draw(st.integers(1, 3))):
            table = data.draw(st.sampled_from(sorted(TABLES)))
            col = data.draw(st.sampled_from(TABLES[table]))
            val = data.draw(VALUES)
            try:
                if isinstance(val, tuple):
                    db.execute(f"UPDATE {table} SET {col} = CAST(? AS TEXT)", (val[1],))
                else:
                    db.execute(f"UPDATE {table} SET {col} = ?", (val,))
            except sqlite3.IntegrityError:
                pass
        db.commit()
    finally:
        db.close()
    only_state_error(f)


def test_open_failure_closes_the_connection(tmp_path):
    f = tmp_path / "bad.db"
    f.write_bytes(b"junk" * 1000)
    with pytest.raises(StateError, match="bad.db"):
        Store(f)


# -- 8: retention ------------------------------------------------------------

DAY = 86400.0


def filled(tmp_path, now):
    s = Store(tmp_path / "r.db")
    big = Mesh("m")
    big.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("a", "192.0.2.1")]))
    save_mesh(big, tmp_path / "r.db")
    for age in (40, 20, 8, 6, 1, 0):
        ts = now - age * DAY
        s.add_event("bfd_down", ts=ts, detail=f"{age}")
        s.add_path_metrics(ts, [("p", 1.0, 1.0, 0.0, 4.4, 1420, None)])
        s.add_flow_snapshot(ts, "hq", _flows(1), [])
    return s


def test_prune_defaults(tmp_path):
    now = time.time()
    s = filled(tmp_path, now)
    assert RETENTION_S == {"path_metrics": 7 * DAY, "flow_snapshots": 7 * DAY, "failover_events": 30 * DAY}
    assert s.prune(now=now) == {"path_metrics": 3, "flow_snapshots": 3, "failover_events": 1}
    assert [e["detail"] for e in s.events()] == ["20", "8", "6", "1", "0"]
    assert [round((now - r["ts"]) / DAY) for r in s.path_metrics()] == [6, 1, 0]
    assert [round((now - r["ts"]) / DAY) for r in s.flow_snapshots()] == [6, 1, 0]
    assert s.prune(now=now) == {"path_metrics": 0, "flow_snapshots": 0, "failover_events": 0}
    assert s.load_mesh().name == "m"   # the mesh is never pruned
    s.close()


def test_prune_older_than_applies_to_every_table(tmp_path):
    now = time.time()
    s = filled(tmp_path, now)
    assert s.prune(2 * DAY, now=now) == {"path_metrics": 4, "flow_snapshots": 4, "failover_events": 4}
    assert [e["detail"] for e in s.events()] == ["1", "0"]
    s.close()


def test_prune_row_cap_keeps_the_newest(tmp_path):
    now = time.time()
    s = filled(tmp_path, now)
    assert all(n >= 10_000 for n in MAX_ROWS.values())
    assert s.prune(now=now, max_rows=2) == {"path_metrics": 4, "flow_snapshots": 4, "failover_events": 4}
    assert [e["detail"] for e in s.events()] == ["1", "0"]
    assert len(s.path_metrics()) == len(s.flow_snapshots()) == 2
    s.close()


@pytest.mark.parametrize("kw", [{"older_than_s": -1}, {"older_than_s": float("nan")}, {"older_than_s": "1d"},
                                {"max_rows": -1}, {"max_rows": 1.5}, {"older_than_s": 10**400}])
def test_prune_refuses_bad_arguments(tmp_path, kw):
    with Store(tmp_path / "x.db") as s, pytest.raises(ConfigError):
        s.prune(**kw)
