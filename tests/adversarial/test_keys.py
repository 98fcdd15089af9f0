"""Key files: a planted temp file or symlink can neither widen the key's mode
nor redirect the private key into another file; the agent's secret files
refuse symlinks and files of other owners, and are never left half written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from patronus.agent import _secret_file
from patronus.errors import ConfigError
from patronus.wireguard.keys import PresharedKey, PrivateKey


def _planted_names(path: Path):
    return [path.with_name(f".{path.name}.{pid}.tmp") for pid in (os.getpid(),)]


def test_a_planted_temp_file_does_not_keep_its_mode(tmp_path):
    key_path = tmp_path / "wg.key"
    for tmp in _planted_names(key_path):
        tmp.write_text("planted")
        os.chmod(tmp, 0o666)
    PrivateKey.generate().save(key_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert PrivateKey.load(key_path)


def test_a_planted_symlink_does_not_receive_the_key(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("innocent\n")
    key_path = tmp_path / "wg.key"
    for tmp in _planted_names(key_path):
        tmp.symlink_to(victim)
    k = PrivateKey.generate()
    k.save(key_path)
    assert victim.read_text() == "innocent\n"
    assert not key_path.is_symlink() and PrivateKey.load(key_path) == k


def test_save_over_a_symlink_replaces_the_link_not_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("innocent\n")
    key_path = tmp_path / "wg.key"
    key_path.symlink_to(victim)
    PresharedKey.generate().save(key_path)
    assert victim.read_text() == "innocent\n" and not key_path.is_symlink()


def test_save_leaves_no_temp_files(tmp_path):
    PrivateKey.generate().save(tmp_path / "k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_agent_secret_file_refuses_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n")
    os.close(fd)
    link = tmp_path / "s.sign.key"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symlink|regular"):
        _secret_file(link, lambda: os.urandom(32))


def test_agent_secret_file_refuses_a_dangling_symlink_without_writing_through_it(tmp_path):
    target = tmp_path / "created-by-attacker-choice"
    link = tmp_path / "s.wg.key"
    link.symlink_to(target)
    with pytest.raises(ConfigError):
        _secret_file(link, lambda: os.urandom(32))
    assert not target.exists()


def test_agent_secret_file_refuses_a_file_of_another_owner(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    p = tmp_path / "s.wg.key"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n")
    os.close(fd)
    os.chown(p, 65534, 65534)
    with pytest.raises(ConfigError, match="owned"):
        _secret_file(p, lambda: os.urandom(32))


@pytest.mark.parametrize("content", [b"", b"not base64!\n", b"QUFB\n"])
def test_agent_secret_file_with_bad_content_is_a_config_error(tmp_path, content):
    p = tmp_path / "s.wg.key"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(ConfigError):
        _secret_file(p, lambda: os.urandom(32))


def test_agent_secret_file_created_0600_and_read_back(tmp_path):
    p = tmp_path / "s.wg.key"
    raw = _secret_file(p, lambda: b"\x01" * 32)
    assert raw == b"\x01" * 32 and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert _secret_file(p, lambda: b"\x02" * 32) == raw
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.wg.key"]
