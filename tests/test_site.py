"""The site realiser (patronus.site): tunnel configurations, marks and
routing tables as `ip` commands, announcements; with root and
wireguard-go, a tunnel brought up, adopted by a second realiser (a restart)
and removed. And the agent's desired-state source."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from patronus import Mesh, Site, Uplink
from patronus.agent import DesiredState, LocalStateFile, StateSource
from patronus.dataplane import PATH_MARK, PATH_RULE_PRIORITY, PATH_TABLE
from patronus.errors import ConfigError, StateError
from patronus.site import (UPLINK_MARK, UPLINK_RULE_PRIORITY, UPLINK_TABLE, SiteRealiser, announcement, path_table,
                           uplink_index, uplink_route)
from patronus.store import save_mesh
from patronus.wireguard.discovery import SigningKey, SqliteRegistry
from patronus.wireguard.keys import PrivateKey

from .netns import unique


def mesh() -> Mesh:
    m = Mesh("m")
    m.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("mpls", "192.0.2.1"),
                                                           Uplink("inet", "198.51.100.1", nat=True, mtu=1400)]))
    m.add_site(Site("br", subnets=["10.2.0.0/24"], uplinks=[Uplink("lte", "203.0.113.1")]))
    return m


class Ip:
    """Records the `ip` commands a realiser would run."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str, check: bool = True) -> None:
        self.calls.append(args)


def test_config_marks_the_local_uplink_and_allows_the_remote_lans():
    m, key, peer = mesh(), PrivateKey.generate(), PrivateKey.generate().public_key()
    net = SiteRealiser("hq", key, prefix="t")
    by_uplink = {t.path.local_uplink: t for t in net.plan(m)}
    assert set(by_uplink) == {"mpls", "inet"}
    for k, name in enumerate(["mpls", "inet"]):
        t = by_uplink[name]
        cfg = net.config(m, t, peer)
        assert cfg.fwmark == UPLINK_MARK + k == UPLINK_MARK + uplink_index(m.site("hq"), name)
        assert cfg.listen_port == t.listen_port and cfg.private_key == key
        (p,) = cfg.peers
        assert p.public_key == peer and p.endpoint == t.remote_endpoint
        assert p.allowed_ips == (f"{t.remote_v4}/32", f"{t.remote_v6}/128", "10.2.0.0/24")
    staged = PrivateKey.generate().public_key()
    cfg = net.config(m, by_uplink["inet"], peer, lans=["10.9.0.0/24"], staged=[staged])
    assert cfg.peers[0].allowed_ips[-1] == "10.9.0.0/24" and cfg.peers[0].persistent_keepalive == 25
    assert cfg.peers[1].public_key == staged and not cfg.peers[1].allowed_ips


def test_uplink_index_names_a_missing_uplink():
    with pytest.raises(ConfigError, match="nope"):
        uplink_index(mesh().site("hq"), "nope")


def test_routing_commands():
    m = mesh()
    ip = Ip()
    uplink_route(1, "172.17.0.1", "eth1", ip)
    assert ip.calls == [("route", "add", "default", "via", "172.17.0.1", "dev", "eth1", "table", str(UPLINK_TABLE + 1)),
                        ("rule", "add", "fwmark", hex(UPLINK_MARK + 1), "lookup", str(UPLINK_TABLE + 1),
                         "priority", str(UPLINK_RULE_PRIORITY + 1))]
    t = SiteRealiser("hq", PrivateKey.generate(), prefix="t").plan(m)[1]
    ip = Ip()
    path_table(t, ["10.2.0.0/24"], ip)
    i = t.path.index
    assert ip.calls == [("route", "replace", "10.2.0.0/24", "dev", t.ifname, "table", str(PATH_TABLE + i)),
                        ("rule", "del", "fwmark", hex(PATH_MARK + i)),
                        ("rule", "add", "fwmark", hex(PATH_MARK + i), "lookup", str(PATH_TABLE + i), "priority",
                         str(PATH_RULE_PRIORITY + i))]


def test_announcement_is_the_site_as_the_registry_takes_it(tmp_path):
    m, key = mesh(), PrivateKey.generate()
    ann = announcement(m.site("hq"), key.public_key())
    assert ann.site == "hq" and ann.wg_public_key == key.public_key().base64 and ann.subnets == ("10.1.0.0/24",)
    assert [u["name"] for u in ann.uplinks] == ["mpls", "inet"] and ann.uplinks[1]["nat"] and ann.uplinks[1]["mtu"] == 1400
    state = tmp_path / "s.db"
    save_mesh(m, state)
    reg = SqliteRegistry(state)
    try:
        signer = SigningKey.generate()
        assert not reg.is_enrolled("hq", signer.public_bytes)
        reg.enroll(reg.create_token("hq"), "hq", signer.public_bytes)
        assert reg.is_enrolled("hq", signer.public_bytes) and not reg.is_enrolled("br", signer.public_bytes)
        assert reg.mesh_sites() == ["hq", "br"]
        SiteRealiser("hq", key, prefix="t").announce(m, reg, signer)
        assert SiteRealiser.peers(reg, exclude="br") == {"hq": key.public_key()}
        assert SiteRealiser.peers(reg, exclude="hq") == {}
    finally:
        reg.close()
    reg = SqliteRegistry(tmp_path / "empty.db")
    try:
        assert reg.mesh_sites() is None
    finally:
        reg.close()


def test_wireguard_mode_is_checked():
    with pytest.raises(ConfigError, match="wireguard"):
        SiteRealiser("hq", PrivateKey.generate(), prefix="t", wireguard="boring")
    with pytest.raises(ConfigError, match="namespace"):
        SiteRealiser("hq", PrivateKey.generate(), prefix="t", netns="x", wireguard="kernel")


def test_local_state_file_is_a_state_source(tmp_path):
    state = tmp_path / "s.db"
    src: StateSource = LocalStateFile(state)
    with pytest.raises(StateError, match="no state file"):
        src.load()
    m = mesh()
    save_mesh(m, state)
    d = src.load()
    assert isinstance(d, DesiredState) and d.mesh == m and d.version == src.version()
    m.add_site(Site("dc", subnets=["10.3.0.0/24"], uplinks=[Uplink("fiber", "192.0.2.77")]))
    save_mesh(m, state)
    assert src.version() != d.version and src.load().mesh == m


def test_the_agent_imports_no_lab():
    code = "import sys, patronus.agent, patronus.site; sys.exit(any(m.startswith('patronus.lab') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"), reason="needs root and wireguard-go")
def test_tunnels_up_adopted_and_removed():
    """A realiser brings up the site's tunnels in a namespace; a second one
    (a restarted agent) adopts them instead of starting wireguard-go again;
    closing removes them."""
    m = mesh()
    ns, prefix = unique("st")[:10], unique("q")[:6]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    first = second = None
    try:
        key, peer = PrivateKey.generate(), PrivateKey.generate().public_key()
        first = SiteRealiser("hq", key, prefix=prefix, netns=ns, route_paths=True)
        new = first.sync(m, lambda t: first.config(m, t, peer))
        assert len(new) == 2 and sorted(first.tunnels) == sorted(t.path.index for t in new)
        assert not first.adopted and all(p is not None for p in first.wg.values())
        for t in new:
            dev = first.backend(t.ifname).get()
            assert dev.fwmark == UPLINK_MARK + uplink_index(m.site("hq"), t.path.local_uplink)
            assert dev.listen_port == t.listen_port and list(dev.peers) == [peer]
        rules = subprocess.run(["ip", "netns", "exec", ns, "ip", "rule"], capture_output=True, text=True).stdout
        assert all(f"lookup {PATH_TABLE + t.path.index}" in rules for t in new)
        assert first.sync(m, lambda t: first.config(m, t, peer)) == []  # nothing new, nothing sent
        second = SiteRealiser("hq", key, prefix=prefix, netns=ns)
        assert len(second.sync(m, lambda t: second.config(m, t, peer))) == 2
        assert sorted(second.adopted) == sorted(first.wg) and all(p is None for p in second.wg.values())
        first.wg.clear()  # the first run is gone; its wireguard-go processes are the second's now
        second.close()
        links = subprocess.run(["ip", "netns", "exec", ns, "ip", "-br", "link"], capture_output=True, text=True).stdout
        assert prefix not in links
    finally:
        for net in (first, second):
            if net is not None:
                net.close()
        subprocess.run(["ip", "netns", "del", ns])
