"""SQLite state: round trips, schema versions, corrupt files, atomic saves under kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings

from patronus import Mesh, SchemaVersionError, StateError
from patronus.store import SCHEMA_VERSION, Store

from .test_mesh import acme, meshes


def test_save_load_and_wal(tmp_path):
    f = tmp_path / "state.db"
    mesh = acme()
    mesh.save(f)
    assert Mesh.load(f) == mesh
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
    mesh.save(f)
    with Store(f) as st:
        st.add_event("bfd_down", policy="voip", from_path="a", to_path="b", detail="test")
    mesh.remove_site("br1")
    mesh.save(f)
    assert Mesh.load(f) == mesh
    with Store(f) as st:
        assert [e["reason"] for e in st.events()] == ["bfd_down"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mesh=meshes())
def test_every_valid_mesh_survives_save_load(tmp_path, mesh):
    f = tmp_path / "prop.db"
    mesh.save(f)
    assert Mesh.load(f) == mesh


def test_missing_and_empty_and_corrupt(tmp_path):
    with pytest.raises(StateError, match="no state file"):
        Mesh.load(tmp_path / "nope.db")
    Store(tmp_path / "empty.db").close()
    with pytest.raises(StateError, match="holds no saved mesh"):
        Mesh.load(tmp_path / "empty.db")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable patronus state file"):
        Mesh.load(bad)


def test_newer_schema_is_refused(tmp_path):
    f = tmp_path / "new.db"
    acme().save(f)
    db = sqlite3.connect(f)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(SchemaVersionError, match="upgrade patronus"):
        Mesh.load(f)


def test_invalid_rows_are_a_state_error(tmp_path):
    f = tmp_path / "s.db"
    acme().save(f)
    db = sqlite3.connect(f)
    db.execute("UPDATE site_subnets SET cidr = '10.1.0.1/24'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="host bits set"):
        Mesh.load(f)


SAVER = r"""
import sys
from patronus import Mesh, Site, Uplink, Policy, Match
def big(tag):
    m = Mesh("m" + tag)
    for i in range(150):
        m.add_site(Site(f"s{i}", subnets=[f"10.{i}.0.0/16"], uplinks=[Uplink("a", "192.0.2.1"), Uplink("b", "192.0.2.2")]))
    for i in range(300):
        m.add_policy(Policy(f"p{tag}{i}", Match(proto="udp", dst_ports=i), priority=i))
    return m
a, b = big("a"), big("b")
a.save(sys.argv[1])
print("ready", flush=True)
while True:
    b.save(sys.argv[1])
    a.save(sys.argv[1])
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
        m = Mesh.load(f)
        assert m.name in ("ma", "mb")
        assert len(m.sites) == 150 and len(m.policies) == 300
        assert all(p.name.startswith("p" + m.name[1]) for p in m.policies)
        names.add(m.name)
    assert names  # at least one state loaded; usually both appear
