"""The network-namespace lab: N sites with K WAN uplinks each, a WAN core,
a LAN host behind every site, and a real WireGuard tunnel (wireguard-go)
for every path of the mesh.

Layout (``tag`` makes every name unique, so labs and tests can run side by
side; interface names stay within 15 characters)::

    {tag}-lan{s}  --veth--  {tag}-s{s}  ==uplink k veth==  {tag}-wan
    10.{s+1}.0.2/24          10.{s+1}.0.1                    172.{16+k}.{s}.1/24 ... (forwarding)

Site ``s`` uplink ``k`` has address 172.{16+k}.{s}.2 behind the core's
172.{16+k}.{s}.1; each tunnel marks its packets (wireguard-go's fwmark) so
a policy rule sends them out of its own local uplink. Everything the lab
creates is recorded in a state file first, so ``down()`` (or ``patronus lab
down``) removes it after a crash too.

>>> Lab.plan_mesh(sites=2, uplinks=1).paths("s0", "s1")[0].id
's0.u0~s1.u0'
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PatronusError
from ..mesh import Mesh
from ..model import Site, Uplink
from ..wireguard.config import InterfaceConfig, PeerConfig
from ..wireguard.keys import PrivateKey, PublicKey
from ..wireguard.plan import Topology, Tunnel, tunnels
from ..wireguard.uapi import Uapi, WireguardGo

__all__ = ["Lab", "LabError"]

STATE_DIR = Path(os.environ.get("PATRONUS_LAB_DIR", "/run/patronus-lab"))
MARK_BASE = 0x5000


def path_table(t: Tunnel, subnets: list[str], ip: Any) -> None:
    """The routing of one steered path (``patronus.dataplane.PATH_*``): table
    PATH_TABLE + i sends ``subnets`` into the path's tunnel and a rule picks
    it for packets marked PATH_MARK + i. ``ip(*args, check=...)`` runs `ip`
    where the tunnel is."""
    from ..dataplane import PATH_MARK, PATH_RULE_PRIORITY, PATH_TABLE

    i = t.path.index
    for sub in subnets:
        ip("route", "replace", sub, "dev", t.ifname, "table", str(PATH_TABLE + i))
    ip("rule", "del", "fwmark", hex(PATH_MARK + i), check=False)
    ip("rule", "add", "fwmark", hex(PATH_MARK + i), "lookup", str(PATH_TABLE + i), "priority",
       str(PATH_RULE_PRIORITY + i))


class LabError(PatronusError):
    """A lab command failed; the message has the command and its output."""


def _run(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


@dataclass
class _State:
    tag: str
    sites: int = 0
    uplinks: int = 0
    namespaces: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        os.replace(tmp, path)


class Lab:
    """Build with ``Lab(tag, sites=3, uplinks=2).up()``; ``down()`` removes
    everything. ``site_ns(s)``, ``lan_ns(s)``, ``lan_addr(s)`` name things;
    ``force_path(path)`` routes the two sites' LANs through one path."""

    def __init__(self, tag: str, sites: int = 3, uplinks: int = 2, state_dir: Path | None = None,
                 topology: Topology | None = None) -> None:
        if not tag.isalnum() or len(tag) > 6:
            raise ConfigError("Lab.tag", tag, "must be 1-6 letters or digits (names stay within 15 characters)")
        if not 2 <= sites <= 50 or not 1 <= uplinks <= 4:
            raise ConfigError("Lab", (sites, uplinks), "sites 2..50, uplinks 1..4")
        self.tag, self.nsites, self.nuplinks = tag, sites, uplinks
        self.state_path = Path(state_dir or STATE_DIR) / f"{tag}.json"
        self.mesh = self.plan_mesh(sites, uplinks)
        self.topology = topology or Topology.full()
        self.keys: dict[str, PrivateKey] = {}
        self.pubkeys: dict[str, PublicKey] = {}   # what each site knows of the others (from discovery)
        self.signers: dict[str, Any] = {}         # each site's announcement key
        self.next_keys: dict[str, PrivateKey] = {}  # keys being rotated in (overlap window)
        self.wg: dict[str, WireguardGo] = {}      # ifname -> process
        self.tunnels: dict[tuple[str, int], Tunnel] = {}  # (site, path index) -> tunnel seen from site
        self._state = _State(tag, sites, uplinks)

    # -- names ------------------------------------------------------------------

    @staticmethod
    def plan_mesh(sites: int, uplinks: int) -> Mesh:
        m = Mesh("lab")
        for s in range(sites):
            m.add_site(Lab._site(s, uplinks))
        return m

    @staticmethod
    def _site(s: int, uplinks: int) -> Site:
        return Site(f"s{s}", subnets=[f"10.{s + 1}.0.0/24"],
                    uplinks=[Uplink(f"u{k}", f"172.{16 + k}.{s}.2") for k in range(uplinks)])

    def site_ns(self, s: int) -> str:
        return f"{self.tag}-s{s}"

    def lan_ns(self, s: int) -> str:
        return f"{self.tag}-lan{s}"

    @property
    def wan_ns(self) -> str:
        return f"{self.tag}-wan"

    @staticmethod
    def lan_addr(s: int) -> str:
        return f"10.{s + 1}.0.2"

    def _prefix(self, s: int) -> str:
        return f"{self.tag}{s}w"  # + path index: unique across namespaces

    # -- lifecycle ----------------------------------------------------------------

    def _netns(self, name: str) -> None:
        self._state.namespaces.append(name)
        self._state.save(self.state_path)
        _run("ip", "netns", "add", name)
        _run("ip", "link", "set", "lo", "up", ns=name)
        _run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0", ns=name, check=False)

    def up(self, registry: Any = None, *, tunnels: bool = True) -> Lab:
        """Create namespaces, links, addresses, routes and every tunnel. With
        a discovery ``registry`` every site enrolls and announces itself first,
        and tunnels come from what the registry says."""
        if self.state_path.exists():
            raise ConfigError("Lab", self.tag, f"exists already ({self.state_path}); run down() first")
        try:
            self._netns(self.wan_ns)
            _run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.wan_ns)
            for s in range(self.nsites):
                self._add_site_net(s)
            if not tunnels:  # the network only: site agents bring their own tunnels
                return self
            if registry is not None:
                from ..wireguard.discovery import SigningKey

                for s in range(self.nsites):
                    signer = self.signers[f"s{s}"] = SigningKey.generate()
                    registry.enroll(registry.create_token(f"s{s}"), f"s{s}", signer.public_bytes)
                    self.announce(registry, s, signer)
                self.sync(registry)
            else:
                for s in range(self.nsites):
                    self._sync_tunnels(s)
        except BaseException:
            self.down()
            raise
        return self

    def _add_site_net(self, s: int) -> None:
        sn, ln, t = self.site_ns(s), self.lan_ns(s), self.tag
        self._netns(sn)
        self._netns(ln)
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=sn)
        _run("ip", "link", "add", f"{t}l{s}", "netns", sn, "type", "veth", "peer", "name", "eth0", "netns", ln)
        _run("ip", "addr", "add", f"10.{s + 1}.0.1/24", "dev", f"{t}l{s}", ns=sn)
        _run("ip", "link", "set", f"{t}l{s}", "up", ns=sn)
        _run("ip", "addr", "add", f"{self.lan_addr(s)}/24", "dev", "eth0", ns=ln)
        _run("ip", "link", "set", "eth0", "up", ns=ln)
        _run("ip", "route", "add", "default", "via", f"10.{s + 1}.0.1", ns=ln)
        for k in range(self.nuplinks):
            up, core = f"{t}u{s}x{k}", f"{t}c{s}x{k}"
            _run("ip", "link", "add", up, "netns", sn, "type", "veth", "peer", "name", core, "netns", self.wan_ns)
            _run("ip", "addr", "add", f"172.{16 + k}.{s}.2/24", "dev", up, ns=sn)
            _run("ip", "addr", "add", f"172.{16 + k}.{s}.1/24", "dev", core, ns=self.wan_ns)
            _run("ip", "link", "set", up, "up", ns=sn)
            _run("ip", "link", "set", core, "up", ns=self.wan_ns)
            # tunnels of uplink k carry mark MARK_BASE + k: table 100 + k leaves through it
            table = str(100 + k)
            _run("ip", "route", "add", "default", "via", f"172.{16 + k}.{s}.1", "dev", up, "table", table, ns=sn)
            _run("ip", "rule", "add", "fwmark", hex(MARK_BASE + k), "lookup", table, "priority", str(1000 + k),
                 ns=sn)
        self.keys[f"s{s}"] = PrivateKey.generate()
        self.pubkeys[f"s{s}"] = self.keys[f"s{s}"].public_key()

    def add_site(self) -> int:
        """Add a site to the running lab: only the new tunnels are created and
        existing ones are reconciled (a peer added, nothing restarted)."""
        s = self.nsites
        self.mesh.add_site(self._site(s, self.nuplinks))
        self.nsites += 1
        self._state.sites = self.nsites
        self._add_site_net(s)
        for x in range(self.nsites):
            self._sync_tunnels(x)
        return s

    # -- discovery --------------------------------------------------------------

    def announce(self, registry: Any, s: int, signer: Any) -> Any:
        """Site s announces itself (uplinks, WireGuard key, subnets), signed."""
        from ..wireguard.discovery import Announcement

        site = self.mesh.site(f"s{s}")
        ann = Announcement.make(site.name, wg_public_key=self.keys[site.name].public_key().base64,
                                subnets=list(site.subnets),
                                uplinks=[{"name": u.name, "address": u.address, "port": u.port, "nat": u.nat,
                                          "mtu": u.mtu} for u in site.uplinks])
        return registry.publish(signer.sign(ann))

    def announce_all(self, registry: Any) -> None:
        """Every site re-announces itself (a site that stops is marked Inactive)."""
        for site in self.mesh.sites:
            if site.name in self.signers:
                self.announce(registry, int(site.name[1:]), self.signers[site.name])

    def join(self, registry: Any) -> int:
        """A new site joins through discovery: it gets a one-time token,
        enrolls its signing key and announces itself; every other site then
        learns of it from the registry only (``sync``)."""
        from ..wireguard.discovery import SigningKey

        s = self.nsites
        name = f"s{s}"
        signer = self.signers[name] = SigningKey.generate()
        registry.enroll(registry.create_token(name), name, signer.public_bytes)
        self.nsites += 1
        self._state.sites = self.nsites
        self.mesh.add_site(self._site(s, self.nuplinks))   # the new site's own view of itself
        self._add_site_net(s)
        self.announce(registry, s, signer)
        self.sync(registry)
        return s

    def sync(self, registry: Any, now: float | None = None) -> None:
        """Every site reconciles its tunnels with the registry: announced sites
        get tunnels (keys and endpoints from their signed announcements),
        sites gone from it (silent beyond the grace period) lose theirs."""
        announced = {st.site: st.announcement for st in registry.sites(now)}
        for name, ann in announced.items():
            self.pubkeys[name] = PublicKey.from_text(ann.wg_public_key)
            if name not in [x.name for x in self.mesh.sites]:
                self.mesh.add_site(Site(name, subnets=list(ann.subnets),
                                        uplinks=[Uplink(**{k: v for k, v in u.items() if v is not None})
                                                 for u in ann.uplinks]))
        for site in [x.name for x in self.mesh.sites]:
            if site not in announced:  # left, or silent beyond the grace period
                self.remove_site(int(site[1:]))
        for x in sorted(int(site.name[1:]) for site in self.mesh.sites):
            self._sync_tunnels(x)

    def remove_site(self, s: int) -> None:
        """Remove a site: its tunnels at every other site, then its namespaces."""
        name = f"s{s}"
        gone = [p.index for p in self.mesh.paths(name)]
        for (site, idx), tun in list(self.tunnels.items()):
            if idx in gone:
                proc = self.wg.pop(tun.ifname, None)
                if proc is not None:
                    proc.stop()
                self.tunnels.pop((site, idx))
        self.mesh.remove_site(name)
        for ns in (self.site_ns(s), self.lan_ns(s)):
            _run("ip", "netns", "del", ns, check=False)
            if ns in self._state.namespaces:
                self._state.namespaces.remove(ns)
        self._state.save(self.state_path)

    def _config(self, s: int, t: Tunnel) -> InterfaceConfig:
        remote = t.path.remote_site
        lans = list(self.mesh.site(remote).subnets)
        if self.topology.kind == "hub" and remote in self.topology.hubs and f"s{s}" not in self.topology.hubs:
            # a spoke reaches every other site through its hub
            lans += [n for x in self.mesh.sites if x.name not in (remote, f"s{s}") for n in x.subnets]
        peer = PeerConfig(self.pubkeys[remote], endpoint=t.remote_endpoint,
                          allowed_ips=(f"{t.remote_v4}/32", f"{t.remote_v6}/128", *lans),
                          persistent_keepalive=t.keepalive)
        peers = [peer]
        if remote in self.next_keys:
            # the remote's next key, staged with no AllowedIPs (it routes
            # nothing) so the switch is only a move of AllowedIPs
            peers.append(PeerConfig(self.next_keys[remote].public_key(), endpoint=t.remote_endpoint,
                                    persistent_keepalive=t.keepalive))
        k = int(t.path.local_uplink[1:])
        return InterfaceConfig(self.keys[f"s{s}"], listen_port=t.listen_port, fwmark=MARK_BASE + k,
                               peers=tuple(peers))

    def _sync_tunnels(self, s: int) -> None:
        """Create missing tunnels of site s and reconcile the others."""
        ns = self.site_ns(s)
        for t in tunnels(self.mesh, f"s{s}", self.topology, prefix=self._prefix(s)):
            cfg = self._config(s, t)
            if t.ifname not in self.wg:
                proc = WireguardGo(t.ifname, ns)
                self._state.sockets.append(proc.uapi.path)
                self._state.save(self.state_path)
                proc.start()
                self.wg[t.ifname] = proc
                assert proc.proc is not None
                self._state.pids.append(proc.proc.pid)
                self._state.save(self.state_path)
                proc.uapi.apply(cfg)
                _run("ip", "addr", "add", t.local_v4, "dev", t.ifname, ns=ns)
                _run("ip", "addr", "add", t.local_v6, "dev", t.ifname, ns=ns, check=False)
                _run("ip", "link", "set", t.ifname, "mtu", str(t.mtu), "up", ns=ns)
            else:
                proc = self.wg[t.ifname]
                proc.uapi.apply(cfg)
            self.tunnels[(f"s{s}", t.path.index)] = t

    def steer_tables(self, s: int, other: int) -> None:
        """At site s, one routing table per path to site ``other``, chosen by
        the path's steering mark (for the data plane's steering to use)."""
        for (site, _), t in self.tunnels.items():
            if site == f"s{s}" and t.path.remote_site == f"s{other}":
                path_table(t, list(self.mesh.site(f"s{other}").subnets),
                           lambda *a, check=True: _run("ip", *a, ns=self.site_ns(s), check=check))

    def force_path(self, path_id: str) -> None:
        """Route the LANs of the path's two sites through that path only."""
        p = self.mesh.path(path_id)
        for site, other in ((p.local_site, p.remote_site), (p.remote_site, p.local_site)):
            t = self.tunnels[(site, p.index)]
            _run("ip", "route", "replace", f"10.{int(other[1:]) + 1}.0.0/24", "dev", t.ifname,
                 ns=self.site_ns(int(site[1:])))

    def rotate_key(self, s: int) -> PublicKey:
        """Start rotating site s's key: every peer stages the next public key
        next to the current one (the overlap window). ``finish_rotation``
        switches; until then nothing changes for traffic."""
        nxt = self.next_keys[f"s{s}"] = PrivateKey.generate()
        for x in sorted(int(site.name[1:]) for site in self.mesh.sites):
            if x != s:
                self._sync_tunnels(x)
        return nxt.public_key()

    def finish_rotation(self, s: int) -> None:
        """Site s takes its next key; every peer moves AllowedIPs to it and
        drops the old one. Only the tunnels of site s re-handshake."""
        name = f"s{s}"
        self.keys[name] = self.next_keys.pop(name)
        self.pubkeys[name] = self.keys[name].public_key()
        self._sync_tunnels(s)
        for x in sorted(int(site.name[1:]) for site in self.mesh.sites):
            if x != s:
                self._sync_tunnels(x)

    def impair(self, path_id: str, **config: Any) -> Any:
        """Put an impairment relay (``patronus.lab.Impairment``: delay, jitter,
        loss, duplication, reordering, rate) under one path's tunnel, both
        ways: the relay listens in the WAN core on an address of the local
        site's uplink subnet, the local tunnel's peer endpoint points at it,
        and the far end follows (WireGuard roams to the relay's source).
        Returns the running relay; ``relay.set(...)`` changes it live."""
        import asyncio
        import threading

        from .impairment import Impairment

        if not hasattr(self, "_relays"):
            self._relays: dict[str, Any] = {}
            self._relay_loop = asyncio.new_event_loop()
            threading.Thread(target=self._relay_loop.run_forever, daemon=True, name="lab-relays").start()
        if path_id in self._relays:
            self._relays[path_id].set(**config)
            return self._relays[path_id]
        p = self.mesh.path(path_id)
        s, k = int(p.local_site[1:]), int(p.local_uplink[1:])
        t = self.tunnels[(p.local_site, p.index)]
        host = 100 + len(self._relays)
        addr = f"172.{16 + k}.{s}.{host}"
        _run("ip", "addr", "add", f"{addr}/24", "dev", f"{self.tag}c{s}x{k}", ns=self.wan_ns)
        rhost, rport = t.remote_endpoint.rsplit(":", 1)
        relay = Impairment((addr, t.listen_port), (rhost, int(rport)), netns=self.wan_ns, **config)
        asyncio.run_coroutine_threadsafe(relay.start(), self._relay_loop).result(10)
        self._relays[path_id] = relay
        uapi = self.wg[t.ifname].uapi
        (peer,) = [pk for pk in uapi.get().peers]
        uapi.set([f"public_key={peer.hex}", "update_only=true", f"endpoint={addr}:{t.listen_port}"])
        return relay

    def set_loss(self, s: int, uplink: int, loss_pct: float) -> None:
        """Drop ``loss_pct`` % of the packets leaving and entering site s on an
        uplink (nftables ``numgen random``: this kernel has no netem); 0 removes it."""
        if not 0 <= loss_pct <= 100:
            raise ConfigError("loss_pct", loss_pct, "is not in 0..100")
        ns, dev, table = self.site_ns(s), f"{self.tag}u{s}x{uplink}", f"pnloss{uplink}"
        _run("nft", f"delete table inet {table}", ns=ns, check=False)
        if loss_pct:
            n = int(round(loss_pct * 100))
            cond = "" if n >= 10000 else f"numgen random mod 10000 < {n} "
            _run("nft", f"add table inet {table}; "
                 f"add chain inet {table} in {{ type filter hook input priority -300; }}; "
                 f"add chain inet {table} out {{ type filter hook output priority -300; }}; "
                 f'add rule inet {table} in iifname "{dev}" {cond}drop; '
                 f'add rule inet {table} out oifname "{dev}" {cond}drop', ns=ns)

    def site_status(self, s: int) -> dict[str, str]:
        """How site s sees every other site (handshake ages of its tunnels)."""
        from ..wireguard.status import site_status

        devices: dict[str, dict[str, Any]] = {}
        for (site, _), t in self.tunnels.items():
            if site == f"s{s}":
                devices.setdefault(t.path.remote_site, {})[t.path.id] = self.wg[t.ifname].uapi.get()
        return site_status(devices, time.time())

    def down(self) -> None:
        """Remove everything this lab made (processes, sockets, namespaces)."""
        for relay in getattr(self, "_relays", {}).values():
            self._relay_loop.call_soon_threadsafe(relay.close)
        if hasattr(self, "_relay_loop"):
            self._relay_loop.call_soon_threadsafe(self._relay_loop.stop)
        for proc in self.wg.values():
            proc.stop()
        self.wg.clear()
        cleanup(self.state_path)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def cleanup(state_path: Path) -> bool:
    """Remove what a lab's state file lists, also after the lab's process
    died. Returns whether there was anything to remove."""
    if not state_path.exists():
        return False
    st = json.loads(state_path.read_text())
    for pid in st.get("pids", []):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(0.05)
    for ns in st.get("namespaces", []):
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for sock in st.get("sockets", []):
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
    state_path.unlink(missing_ok=True)
    return True


def status(state_path: Path) -> dict[str, Any]:
    """What a lab's state file lists and whether it is still there: namespaces,
    wireguard-go processes, and each tunnel's peer handshake age."""
    if not state_path.exists():
        return {"exists": False}
    st = json.loads(state_path.read_text())
    have = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    out: dict[str, Any] = {"exists": True, "tag": st["tag"], "sites": st.get("sites"), "uplinks": st.get("uplinks"),
                           "namespaces": {ns: ns in have for ns in st.get("namespaces", [])},
                           "processes_alive": sum(os.path.exists(f"/proc/{p}") for p in st.get("pids", [])),
                           "tunnels": {}}
    now = time.time()
    for sock in st.get("sockets", []):
        name = Path(sock).stem
        if not os.path.exists(sock):
            out["tunnels"][name] = None
            continue
        try:
            dev = Uapi(name, str(Path(sock).parent)).get()
        except PatronusError as e:
            out["tunnels"][name] = str(e)
            continue
        hs = [p.last_handshake_ns for p in dev.peers.values()]
        out["tunnels"][name] = {"listen_port": dev.listen_port,
                                "handshake_age_s": round(now - max(hs) / 1e9, 1) if hs and max(hs) else None}
    return out

