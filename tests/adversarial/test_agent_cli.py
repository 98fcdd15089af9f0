"""`patronus agent` refuses bad starts before touching anything and takes its
token from a file or the environment; `patronus token` creates, lists and
revokes enrolment tokens."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from patronus import Mesh, Site, Uplink, agent as agent_mod, save_mesh
from patronus.cli import main
from patronus.wireguard.discovery import SigningKey, SqliteRegistry


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "state.db"
    mesh = Mesh("m")
    mesh.add_site(Site("s0", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp", "172.16.0.2")]))
    mesh.add_site(Site("s1", subnets=["10.2.0.0/24"], uplinks=[Uplink("isp", "172.16.1.2")]))
    save_mesh(mesh, path)
    return path


def files(d):
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def no_run(monkeypatch):
    """SiteAgent.run replaced: records the token it was given (no network here)."""
    seen = {}

    async def run(self):
        seen["token"] = self.token

    monkeypatch.setattr(agent_mod.SiteAgent, "run", run)
    monkeypatch.delenv("PATRONUS_TOKEN", raising=False)
    return seen


# -- defect 7: refuse before touching anything ----------------------------------------------------

def test_agent_missing_state_creates_nothing(tmp_path, capsys, no_run):
    missing = tmp_path / "nope.db"
    assert main(["agent", "--state", str(missing), "--site", "s0"]) == 2
    out = capsys.readouterr()
    msg = out.out + out.err
    assert "no state file" in msg and "save_mesh" in msg
    assert files(tmp_path) == [] and "token" not in no_run


def test_agent_unknown_site_writes_no_key_files(state, capsys, no_run):
    before = files(state.parent)
    assert main(["agent", "--state", str(state), "--site", "s9", "--token", "pnt_x"]) == 2
    msg = "".join(capsys.readouterr())
    assert "s9" in msg and "s0" in msg  # names the sites it could be
    assert files(state.parent) == before


def test_agent_without_token_says_how_to_get_one(state, capsys, no_run):
    before = files(state.parent)
    assert main(["agent", "--state", str(state), "--site", "s1"]) == 2
    msg = "".join(capsys.readouterr())
    assert "None" not in msg and "not enrolled" in msg
    assert "--token-file" in msg and "PATRONUS_TOKEN" in msg and "patronus token create" in msg
    assert files(state.parent) == before


def test_agent_with_a_wrong_token_writes_no_key_files(state, capsys, no_run):
    before = files(state.parent)
    assert main(["agent", "--state", str(state), "--site", "s1", "--token", "pnt_wrong"]) == 2
    assert "not a token" in "".join(capsys.readouterr())
    assert files(state.parent) == before


def test_agent_state_without_a_mesh(tmp_path, capsys, no_run):
    SqliteRegistry(tmp_path / "empty.db").close()
    assert main(["agent", "--state", str(tmp_path / "empty.db"), "--site", "s0"]) == 2
    assert "save_mesh" in "".join(capsys.readouterr())


# -- defect 6: token from a file or the environment ------------------------------------------------

def test_token_file_and_environment(state, tmp_path, monkeypatch, no_run):
    reg = SqliteRegistry(state)
    t0, t1 = reg.create_token("s0"), reg.create_token("s1")
    reg.close()
    tf = tmp_path / "tok"
    tf.write_text(t0 + "\n")
    assert main(["agent", "--state", str(state), "--site", "s0", "--token-file", str(tf)]) == 0
    assert no_run["token"] == t0
    monkeypatch.setenv("PATRONUS_TOKEN", t1)
    assert main(["agent", "--state", str(state), "--site", "s1"]) == 0
    assert no_run["token"] == t1


def test_token_and_token_file_are_exclusive(state, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["agent", "--state", str(state), "--site", "s0", "--token", "a", "--token-file", str(tmp_path / "x")])


def test_missing_or_empty_token_file_is_named(state, tmp_path, capsys, no_run):
    assert main(["agent", "--state", str(state), "--site", "s0", "--token-file", str(tmp_path / "none")]) == 2
    (tmp_path / "empty").write_text("\n")
    assert main(["agent", "--state", str(state), "--site", "s0", "--token-file", str(tmp_path / "empty")]) == 2
    assert "token file" in "".join(capsys.readouterr())


def test_help_warns_that_token_is_visible(capsys):
    with pytest.raises(SystemExit):
        main(["agent", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--token-file" in out and "PATRONUS_TOKEN" in out and "visible" in out


def test_agent_enrolls_with_token_from_environment(state, monkeypatch):
    """The real _keys path: a token from PATRONUS_TOKEN enrolls the site."""
    reg = SqliteRegistry(state)
    tok = reg.create_token("s0")
    reg.close()
    a = agent_mod.SiteAgent(state, "s0", token=tok)
    a.preflight()
    a.store = __import__("patronus.store", fromlist=["Store"]).Store(state)
    a.mesh = a.store.load_mesh()
    a.registry = SqliteRegistry(state)
    try:
        a._keys()
        assert a.registry._db.execute("SELECT site FROM site_keys").fetchall() == [("s0",)]
    finally:
        a.registry.close()
        a.store.close()
        a._io.shutdown()


# -- defect 8: patronus token create | list | revoke --------------------------------------------------

def test_token_create_list_revoke(state, capsys):
    assert main(["token", "create", "--state", str(state), "--site", "s0", "--ttl-s", "600"]) == 0
    tok = capsys.readouterr().out.strip()
    assert tok.startswith("pnt_") and len(tok.splitlines()) == 1
    assert main(["token", "create", "--state", str(state), "--site", "s1"]) == 0
    tok1 = capsys.readouterr().out.strip()
    reg = SqliteRegistry(state)
    reg.enroll(tok, "s0", SigningKey.generate().public_bytes)
    reg.close()
    assert main(["token", "list", "--state", str(state)]) == 0
    listing = capsys.readouterr().out
    assert tok not in listing and tok1 not in listing and tok[4:12] not in listing
    assert "s0" in listing and "s1" in listing and "used" in listing
    assert main(["token", "revoke", "--state", str(state), "--site", "s1"]) == 0
    assert "1" in capsys.readouterr().out
    reg = SqliteRegistry(state)
    assert [r["site"] for r in reg.tokens()] == ["s0"]
    reg.close()


@pytest.mark.parametrize("extra", [["--site", "s9"], ["--site", "s0", "--ttl-s", "nan"],
                                   ["--site", "s0", "--ttl-s", "inf"], ["--site", ""]])
def test_token_create_refuses_by_name(state, capsys, extra):
    assert main(["token", "create", "--state", str(state), *extra]) == 2
    assert "patronus token" in capsys.readouterr().err


def test_token_commands_never_create_a_state(tmp_path, capsys):
    for argv in (["create", "--site", "s0"], ["list"], ["revoke", "--site", "s0"]):
        assert main(["token", argv[0], "--state", str(tmp_path / "x.db"), *argv[1:]]) == 2
    assert files(tmp_path) == []
    assert "no state file" in capsys.readouterr().err


def test_token_create_in_a_subprocess(state):
    p = subprocess.run([sys.executable, "-m", "patronus.cli", "token", "create", "--state", str(state),
                        "--site", "s1"], capture_output=True, text=True, cwd=os.getcwd())
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("pnt_")
