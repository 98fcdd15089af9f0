"""WireGuard keys, the per-path plan, config rendering and parsing (hypothesis
round trips), and the UAPI reconcile diff."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from patronus import ConfigError, Mesh, Site, Uplink
from patronus.wireguard import InterfaceConfig, PeerConfig, PresharedKey, PrivateKey, parse, render, render_quick
from patronus.wireguard.plan import overhead, tunnel, tunnels
from patronus.wireguard.uapi import DeviceState, PeerState, _parse_get, diff


@pytest.mark.skipif(not shutil.which("wg"), reason="wireguard-tools not installed")
def test_public_keys_match_wg_pubkey():
    for _ in range(5):
        k = PrivateKey.generate()
        out = subprocess.run(["wg", "pubkey"], input=k.base64, capture_output=True, text=True, check=True).stdout
        assert out.strip() == k.public_key().base64
    gen = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    assert PrivateKey.from_text(gen).base64 == gen


def test_private_keys_stay_private(tmp_path):
    k, psk = PrivateKey.generate(), PresharedKey.generate()
    assert k.base64 not in repr(k) and k.base64 not in str(k) and psk.base64 not in repr(psk)
    f = tmp_path / "key"
    k.save(f)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert PrivateKey.load(f) == k
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        PrivateKey.load(f)
    with pytest.raises(ConfigError) as e:
        PrivateKey.from_text("not a key")
    assert "not a key" not in str(e.value)  # a typo'd secret is not echoed either


def _mesh(sites=3, uplinks=2, **kw):
    m = Mesh("t")
    for s in range(sites):
        m.add_site(Site(f"s{s}", subnets=[f"10.{s + 1}.0.0/24"],
                        uplinks=[Uplink(f"u{k}", f"172.{16 + k}.{s}.2", **kw) for k in range(uplinks)]))
    return m


def test_plan_is_the_same_from_both_ends_and_unique():
    m = _mesh()
    seen_v4, seen_port = set(), {}
    for p in m.paths():
        a, b = tunnel(m, p), tunnel(m, p.reverse())
        assert (a.local_v4.split("/")[0], a.remote_v4) == (b.remote_v4, b.local_v4.split("/")[0])
        assert (a.local_v6.split("/")[0], a.remote_v6) == (b.remote_v6, b.local_v6.split("/")[0])
        assert ipaddress.ip_interface(a.local_v4).network == ipaddress.ip_interface(b.local_v4).network
        assert a.listen_port == b.remote_port and a.mtu == b.mtu == 1500 - 60
        assert a.local_v4 not in seen_v4
        seen_v4.add(a.local_v4)
    for s in range(3):
        ports = [t.listen_port for t in tunnels(m, f"s{s}")]
        assert len(ports) == len(set(ports))  # one port per tunnel interface of a site


def test_mtu_keepalive_and_v6_outer():
    m = Mesh("t")
    m.add_site(Site("a", subnets=["10.1.0.0/24"], uplinks=[Uplink("x", "2001:db8::1", mtu=1500)]))
    m.add_site(Site("b", subnets=["10.2.0.0/24"], uplinks=[Uplink("y", "2001:db8::2", mtu=1400, nat=True)]))
    (p,) = m.paths("a", "b")
    t = tunnel(m, p)
    assert t.mtu == 1400 - overhead(True) == 1400 - 80 and t.keepalive == 25
    assert t.remote_endpoint.startswith("[2001:db8::2]:")
    with pytest.raises(ConfigError):
        tunnel(m, p, prefix="much-too-long-prefix")


keys = st.builds(lambda: PrivateKey.generate())
nets = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: str(ipaddress.ip_network((t[0], t[1]), strict=False)))
endpoints = st.one_of(st.none(), st.tuples(st.ip_addresses(), st.integers(1, 65535)).map(
    lambda t: f"[{t[0]}]:{t[1]}" if t[0].version == 6 else f"{t[0]}:{t[1]}"))


@st.composite
def configs(draw):
    n = draw(st.integers(0, 4))
    all_nets = draw(st.lists(nets, unique=True, max_size=3 * n))
    peers = []
    for i in range(n):
        peers.append(PeerConfig(PrivateKey.generate().public_key(), draw(endpoints), tuple(all_nets[i::n]) if n else (),
                                draw(st.integers(0, 65535)),
                                PresharedKey.generate() if draw(st.booleans()) else None))
    return InterfaceConfig(PrivateKey.generate(), draw(st.one_of(st.none(), st.integers(0, 65535))),
                           draw(st.integers(0, 2**32 - 1)), tuple(peers),
                           tuple(draw(st.lists(st.sampled_from(["10.0.0.1/31", "fd00::1/127"]), unique=True))),
                           draw(st.one_of(st.none(), st.integers(576, 9000))))


@given(configs())
def test_render_parse_round_trips(cfg):
    assert parse(render_quick(cfg)) == cfg
    assert parse(render(cfg)) == cfg.without_quick()


@given(st.text(max_size=200))
def test_junk_is_rejected_by_name(text):
    try:
        parse(text)
    except ConfigError:
        pass


def test_bad_configs_name_the_problem():
    k = PrivateKey.generate().base64
    with pytest.raises(ConfigError, match="no PrivateKey"):
        parse("[Interface]\nListenPort = 1\n")
    with pytest.raises(ConfigError, match="not a key of"):
        parse(f"[Interface]\nPrivateKey = {k}\nColour = blue\n")
    p = PrivateKey.generate().public_key()
    with pytest.raises(ConfigError, match="two peers"):
        InterfaceConfig(PrivateKey.generate(), peers=(PeerConfig(p, allowed_ips=("10.0.0.0/8",)),
                                                      PeerConfig(PrivateKey.generate().public_key(),
                                                                 allowed_ips=("10.0.0.0/8",))))


def test_uapi_diff_changes_only_the_difference():
    k, p1, p2 = PrivateKey.generate(), PrivateKey.generate().public_key(), PrivateKey.generate().public_key()
    want = InterfaceConfig(k, 51820, 0, (PeerConfig(p1, "192.0.2.1:51820", ("10.1.0.0/24",), 25),))
    have = DeviceState(k.hex, 51820, 0, {p1: PeerState(p1, "192.0.2.1:51820", ("10.1.0.0/24",), 25),
                                         p2: PeerState(p2, None, ("10.9.0.0/24",))})
    assert diff(have, want) == [f"public_key={p2.hex}", "remove=true"]
    del have.peers[p2]
    assert diff(have, want) == []  # nothing differs: nothing is sent, the tunnel is not touched
    have.peers[p1].endpoint = "192.0.2.9:51820"
    assert diff(have, want) == [f"public_key={p1.hex}", "update_only=true", "endpoint=192.0.2.1:51820"]
    text = f"private_key={k.hex}\nlisten_port=51820\npublic_key={p1.hex}\npreshared_key={'0' * 64}\n" \
           "endpoint=192.0.2.1:51820\nallowed_ip=10.1.0.0/24\npersistent_keepalive_interval=25\n" \
           "last_handshake_time_sec=2\nlast_handshake_time_nsec=5\nrx_bytes=7\ntx_bytes=9\nerrno=0\n\n"
    st_ = _parse_get(text)
    assert diff(st_, want) == [] and st_.peers[p1].last_handshake_ns == 2_000_000_005


def test_topologies_choose_site_pairs_and_keep_path_indexes():
    from patronus.wireguard import Topology

    m = _mesh(sites=4, uplinks=1)
    full = {t.path.index for s in range(4) for t in tunnels(m, f"s{s}")}
    hub = Topology.hub_and_spoke(["s0"])
    star = {(t.path.local_site, t.path.remote_site): t.path.index for s in range(4) for t in tunnels(m, f"s{s}", hub)}
    assert {frozenset(k) for k in star} == {frozenset(("s0", f"s{i}")) for i in (1, 2, 3)}
    assert set(star.values()) < full  # same indexes (ports, addresses) as in the full mesh
    pairs = Topology.explicit([("s1", "s2")])
    assert [t.path.remote_site for t in tunnels(m, "s1", pairs)] == ["s2"] and tunnels(m, "s3", pairs) == []
    with pytest.raises(ConfigError):
        Topology.hub_and_spoke([])


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"), reason="needs root and wireguard-go")
def test_hub_and_spoke_lab_routes_spokes_through_the_hub(tmp_path):
    from patronus.lab.net import Lab, _run
    from patronus.wireguard import Topology

    from .netns import unique
    from .test_lab import ping

    lab = Lab(unique("H")[:6], sites=3, uplinks=1, state_dir=tmp_path, topology=Topology.hub_and_spoke(["s0"]))
    try:
        lab.up()
        assert len(lab.wg) == 4  # s0-s1 and s0-s2, both ends
        for s in (1, 2):
            lab.force_path(lab.mesh.paths("s0", f"s{s}")[0].id)
        # spokes reach each other through the hub: routes via the hub's tunnels
        t1 = lab.tunnels[("s1", lab.mesh.paths("s0", "s1")[0].index)]
        t2 = lab.tunnels[("s2", lab.mesh.paths("s0", "s2")[0].index)]
        _run("ip", "route", "replace", "10.3.0.0/24", "dev", t1.ifname, ns=lab.site_ns(1))
        _run("ip", "route", "replace", "10.2.0.0/24", "dev", t2.ifname, ns=lab.site_ns(2))
        assert ping(lab.lan_ns(0), lab.lan_addr(1)) is not None and ping(lab.lan_ns(0), lab.lan_addr(2)) is not None
        assert ping(lab.lan_ns(1), lab.lan_addr(2)) is not None  # spoke to spoke, through the hub
        (hub_peer,) = lab.wg[lab.tunnels[("s0", t1.path.index)].ifname].uapi.get().peers.values()
        assert hub_peer.rx_bytes > 0 and hub_peer.tx_bytes > 0
    finally:
        lab.down()


def test_kernel_backend_translation_and_missing_module():
    from patronus.wireguard.kernel import Backend, Kernel, to_netlink
    from patronus.wireguard.uapi import UapiError

    k, p1, p2 = PrivateKey.generate(), PrivateKey.generate().public_key(), PrivateKey.generate().public_key()
    want = InterfaceConfig(k, 51820, 7, (PeerConfig(p1, "[2001:db8::1]:51821", ("10.1.0.0/24", "fd00::/64"), 25),))
    have = DeviceState(None, 0, 0, {p2: PeerState(p2)})
    dev, peers = to_netlink(diff(have, want))
    assert dev == {"private_key": k.base64, "listen_port": 51820, "fwmark": 7}
    assert peers[0] == {"public_key": p2.base64, "remove": True}
    assert peers[1]["public_key"] == p1.base64 and peers[1]["endpoint_addr"] == "2001:db8::1"
    assert peers[1]["endpoint_port"] == 51821 and peers[1]["allowed_ips"] == ["10.1.0.0/24", "fd00::/64"]
    assert peers[1]["persistent_keepalive"] == 25 and peers[1]["replace_allowed_ips"] is True
    if os.path.exists("/sys/module/wireguard"):
        pytest.skip("this kernel has the wireguard module")
    with pytest.raises(UapiError, match="modprobe wireguard"):
        Kernel("pnnosuchwg0").get()
    with pytest.raises(UapiError, match="modprobe wireguard"):  # no wireguard-go socket: the kernel is asked
        Backend.for_interface("pnnosuchwg0")
