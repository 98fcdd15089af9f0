"""SQLite state: round trips, schema versions, corrupt files, atomic saves under kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings

from patronus import Failover, Match, Mesh, Policy, QoS, SchemaVersionError, Site, StateError, Uplink
from patronus.store import MIGRATIONS, SCHEMA_VERSION, Store, load_mesh, save_mesh

from .test_match_multi import multi_policy_lists
from .test_mesh import acme, meshes


def test_save_load_and_wal(tmp_path):
    f = tmp_path / "state.db"
    mesh = acme()
    save_mesh(mesh, f)
    assert load_mesh(f) == mesh
    db = sqlite3.connect(f)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    # the paths table holds the enumeration, for SQL users
    rows = db.execute("SELECT id, idx FROM paths ORDER BY idx").fetchall()
    assert rows == [(p.id, p.index) for p in mesh.paths()]
    db.close()


def test_resave_replaces_and_keeps_records(tmp_path):
    f = tmp_path / "state.db"
    mesh = acme()
    save_mesh(mesh, f)
    with Store(f) as st:
        st.add_event("bfd_down", policy="voip", from_path="a", to_path="b", detail="test")
    mesh.remove_site("br1")
    save_mesh(mesh, f)
    assert load_mesh(f) == mesh
    with Store(f) as st:
        assert [e["reason"] for e in st.events()] == ["bfd_down"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mesh=meshes())
def test_every_valid_mesh_survives_save_load(tmp_path, mesh):
    f = tmp_path / "prop.db"
    save_mesh(mesh, f)
    assert load_mesh(f) == mesh


def test_missing_and_empty_and_corrupt(tmp_path):
    with pytest.raises(StateError, match="no state file"):
        load_mesh(tmp_path / "nope.db")
    Store(tmp_path / "empty.db").close()
    with pytest.raises(StateError, match="holds no saved mesh"):
        load_mesh(tmp_path / "empty.db")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable patronus state file"):
        load_mesh(bad)


def test_newer_schema_is_refused(tmp_path):
    f = tmp_path / "new.db"
    save_mesh(acme(), f)
    db = sqlite3.connect(f)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(SchemaVersionError, match="upgrade patronus"):
        load_mesh(f)


def test_invalid_rows_are_a_state_error(tmp_path):
    f = tmp_path / "s.db"
    save_mesh(acme(), f)
    db = sqlite3.connect(f)
    db.execute("UPDATE site_subnets SET cidr = '10.1.0.1/24'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="host bits set"):
        load_mesh(f)


SAVER = r"""
import sys
from patronus import Mesh, Site, Uplink, Policy, Match, save_mesh
def big(tag):
    m = Mesh("m" + tag)
    for i in range(150):
        m.add_site(Site(f"s{i}", subnets=[f"10.{i}.0.0/16"], uplinks=[Uplink("a", f"198.18.{i}.1"), Uplink("b", f"198.18.{i}.2")]))
    for i in range(300):
        m.add_policy(Policy(f"p{tag}{i}", Match(proto="udp", dst_ports=i), priority=i))
    return m
a, b = big("a"), big("b")
save_mesh(a, sys.argv[1])
print("ready", flush=True)
while True:
    save_mesh(b, sys.argv[1])
    save_mesh(a, sys.argv[1])
"""


def test_kill_mid_save_leaves_previous_state(tmp_path):
    """kill -9 a process that saves in a loop: every time, the file loads as one of the two meshes."""
    f = tmp_path / "crash.db"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    names = set()
    for attempt in range(6):
        p = subprocess.Popen([sys.executable, str(script), str(f)], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(0.05 + 0.037 * attempt)  # land at different points of a save
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.kill()
            p.wait()
        m = load_mesh(f)
        assert m.name in ("ma", "mb")
        assert len(m.sites) == 150 and len(m.policies) == 300
        assert all(p.name.startswith("p" + m.name[1]) for p in m.policies)
        names.add(m.name)
    assert names  # at least one state loaded; usually both appear


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policies=multi_policy_lists())
def test_several_ranges_and_protocols_survive_save_load(tmp_path, policies):
    f = tmp_path / "multi.db"
    mesh = acme()
    for p in policies:
        mesh.add_policy(p)
    save_mesh(mesh, f)
    assert load_mesh(f) == mesh


def test_policy_columns_for_sql_users(tmp_path):
    f = tmp_path / "cols.db"
    mesh = acme()
    mesh.add_policy(Policy("sip", Match(proto="tcp/udp", dst_ports="5060-5061,10000-20000"), priority=1))
    mesh.add_policy(Policy("dns", Match(proto="udp", src_ports=(1024, 65535), dst_ports=53), priority=2))
    mesh.add_policy(Policy("any", Match(), priority=3))
    save_mesh(mesh, f)
    db = sqlite3.connect(f)
    rows = db.execute("SELECT name, sport_lo, sport_hi, dport_lo, dport_hi, proto, sports, dports, protos "
                      "FROM policies ORDER BY position").fetchall()
    db.close()
    assert rows == [
        # several ranges or protocols: only the text columns; one: the simple columns too
        ("sip", None, None, None, None, None, None, "5060-5061,10000-20000", "6,17"),
        ("dns", 1024, 65535, 53, 53, 17, "1024-65535", "53", "17"),
        ("any", None, None, None, None, None, None, None, None),
    ]
    assert load_mesh(f) == mesh


def test_a_file_of_the_previous_schema_loads(tmp_path):
    """A state file written before the port-list columns (schema 2): its
    policies come from the lo/hi and proto columns, and it is migrated."""
    f = tmp_path / "v2.db"
    db = sqlite3.connect(f, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for migration in MIGRATIONS[:2]:
        for stmt in migration.split(";"):
            if stmt.strip():
                db.execute(stmt)
    db.execute("INSERT INTO schema_version VALUES (2)")
    db.execute("INSERT INTO mesh VALUES (1, 'old', ?, 0)", (json.dumps(Failover().to_dict()),))
    db.execute("INSERT INTO sites VALUES ('hq', 0)")
    db.execute("INSERT INTO site_subnets VALUES ('hq', 0, '10.1.0.0/24')")
    db.execute("INSERT INTO uplinks VALUES ('hq', 'isp1', 0, '192.0.2.1', 1500, NULL, 0, NULL, 0)")
    # the INSERT of the previous save_mesh: 16 columns
    insert = "INSERT INTO policies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    db.execute(insert, ("voip", 0, 10, "voip", None, "10.2.0.0/24", None, None, 5060, 5061, 17, None, 46, None,
                        '["isp1"]', "forward"))
    db.execute(insert, ("web", 1, 20, "default", "fd00::/64", None, 1024, 65535, 443, 443, 6, 10, None, 800, "[]",
                        "forward"))
    db.execute(insert, ("ping", 2, 30, "default", None, None, None, None, None, None, 1, None, None, None, "[]",
                        "drop"))
    db.execute(insert, ("rest", 3, 40, "default", None, None, None, None, None, None, None, None, None, None, "[]",
                        "forward"))
    db.close()
    want = Mesh("old")
    want.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp1", "192.0.2.1")]))
    want.add_policy(Policy("voip", Match(dst="10.2.0.0/24", proto="udp", dst_ports=(5060, 5061)), priority=10,
                           app="voip", qos=QoS(dscp=46), prefer=["isp1"]))
    want.add_policy(Policy("web", Match(src="fd00::/64", src_ports=(1024, 65535), dst_ports=443, proto="tcp",
                                        dscp=10), priority=20, qos=QoS(rate_kbps=800)))
    want.add_policy(Policy("ping", Match(proto="icmp"), priority=30, action="drop"))
    want.add_policy(Policy("rest", Match(), priority=40))
    assert load_mesh(f) == want
    with Store(f) as st:
        assert st.version == SCHEMA_VERSION
    want.add_policy(Policy("sip", Match(proto="tcp/udp", dst_ports=[5060, (10000, 20000)]), priority=50))
    save_mesh(want, f)  # the migrated file takes the new columns
    assert load_mesh(f) == want


def test_path_rows_follow_the_topology_and_only_it(tmp_path):
    """save_mesh keeps the path rows when only policies or failover changed,
    and rewrites them when sites or uplinks did (order included)."""
    from patronus import Failover, Match, Mesh, Policy, Site, Uplink
    from patronus.store import Store

    def rows(st):
        return sorted(st._db.execute("SELECT id, idx, local_site, local_uplink, remote_site, remote_uplink "
                                     "FROM paths").fetchall())

    def want(m):
        return sorted((p.id, p.index, p.local_site, p.local_uplink, p.remote_site, p.remote_uplink)
                      for p in m.paths())

    m = Mesh("t")
    for i in range(3):
        m.add_site(Site(f"s{i}", subnets=[f"10.{i}.0.0/24"], uplinks=[Uplink("a", f"192.0.2.{i + 1}")]))
    with Store(tmp_path / "s.db") as st:
        st.save_mesh(m)
        assert rows(st) == want(m)
        m.add_policy(Policy("v", Match(proto="udp"), priority=1))
        m.failover = Failover(failback_hold_s=3)
        st.save_mesh(m)
        assert rows(st) == want(m) and st.load_mesh() == m
        d = m.to_dict()
        d["sites"][0]["uplinks"][0]["mtu"] = 1380                     # an uplink's value, same topology
        d["sites"][0]["subnets"] = ["10.0.0.0/25"]
        st.save_mesh(Mesh.from_dict(d))
        assert rows(st) == want(m) and st.load_mesh() == Mesh.from_dict(d)
        d["sites"][1]["uplinks"].append({"name": "b", "address": "198.51.100.1"})
        m2 = Mesh.from_dict(d)
        st.save_mesh(m2)
        assert rows(st) == want(m2) != want(m)
        for i in (3, 4):                                              # sites appended: paths appended
            d["sites"].append({"name": f"s{i}", "subnets": [f"10.{i}.0.0/24"],
                               "uplinks": [{"name": "a", "address": f"192.0.2.{i + 1}"},
                                           {"name": "c", "address": f"198.51.100.{i + 1}"}]})
            grown = Mesh.from_dict(d)
            st.save_mesh(grown)
            assert rows(st) == want(grown) and st.load_mesh() == grown
        d["sites"] = d["sites"][:3]
        st.save_mesh(Mesh.from_dict(d))                              # and removed again
        assert rows(st) == want(Mesh.from_dict(d)) == want(m2)
        d["sites"] = [d["sites"][2], d["sites"][0], d["sites"][1]]   # the same sites, another order
        m3 = Mesh.from_dict(d)
        st.save_mesh(m3)
        assert rows(st) == want(m3) != want(m2)
        assert st.load_mesh() == m3
