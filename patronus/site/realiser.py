"""One site's network, realised: a WireGuard tunnel per path, the uplink
mark on its packets, a routing table per steered path, and the site's
signed announcement.

Conventions (the production agent and the lab share them):

* Tunnel packets carry the mark ``UPLINK_MARK + k`` for local uplink ``k``
  (its index in ``Site.uplinks``); ``uplink_route`` makes policy routing
  send them out of that uplink.
* A packet steered to path ``i`` carries ``PATH_MARK + i``; ``path_table``
  routes it through the path's tunnel (``patronus.dataplane.PATH_*``).
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

from ..dataplane import PATH_MARK, PATH_RULE_PRIORITY, PATH_TABLE
from ..errors import ConfigError, PatronusError
from ..model import Site
from ..wireguard.config import InterfaceConfig, PeerConfig
from ..wireguard.discovery import Announcement, SignedAnnouncement, SigningKey
from ..wireguard.kernel import Backend, Kernel
from ..wireguard.keys import PrivateKey, PublicKey
from ..wireguard.plan import Topology, Tunnel, tunnels
from ..wireguard.uapi import Uapi, UapiError, WireguardGo

__all__ = ["SiteRealiser", "IpRunner", "UPLINK_MARK", "UPLINK_TABLE", "UPLINK_RULE_PRIORITY", "WIREGUARD_MODES",
           "announcement", "ip_runner", "path_table", "uplink_index", "uplink_route"]

log = logging.getLogger("patronus.site")

UPLINK_MARK = 0x5000          # + local uplink index: the mark of a tunnel's own (encrypted) packets
UPLINK_TABLE = 100            # + local uplink index: the routing table that leaves by that uplink
UPLINK_RULE_PRIORITY = 1000   # + local uplink index: the rule choosing that table by mark
WIREGUARD_MODES = ("auto", "kernel", "userspace")


class IpRunner(Protocol):
    """Runs ``ip ARGS...`` where the site's interfaces are; raises
    PatronusError when ``check`` and the command fails."""

    def __call__(self, *args: str, check: bool = True) -> Any: ...


def ip_runner(netns: str | None = None, error: type[PatronusError] = PatronusError) -> IpRunner:
    """An ``IpRunner`` for the current namespace or the named one; a failing
    command raises ``error`` with the command and its output."""
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = (["ip", "netns", "exec", netns] if netns else []) + ["ip", *args]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if check and p.returncode != 0:
            raise error(f"{' '.join(cmd)}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    return run


def uplink_index(site: Site, uplink: str) -> int:
    """The index of ``uplink`` in ``site.uplinks``: what its marks, table and rule add."""
    for k, u in enumerate(site.uplinks):
        if u.name == uplink:
            return k
    raise ConfigError("uplink", uplink, f"is not an uplink of site {site.name!r}")


def uplink_route(k: int, gateway: str, dev: str, ip: IpRunner) -> None:
    """Policy routing of local uplink ``k``: packets marked ``UPLINK_MARK + k``
    (the tunnels of that uplink) look up table ``UPLINK_TABLE + k``, whose
    default route leaves by ``dev`` through ``gateway``."""
    table = str(UPLINK_TABLE + k)
    ip("route", "add", "default", "via", gateway, "dev", dev, "table", table)
    ip("rule", "add", "fwmark", hex(UPLINK_MARK + k), "lookup", table, "priority", str(UPLINK_RULE_PRIORITY + k))


def path_table(t: Tunnel, subnets: Iterable[str], ip: IpRunner) -> None:
    """The routing of one steered path: table ``PATH_TABLE + i`` sends
    ``subnets`` into the path's tunnel and a rule picks it for packets
    marked ``PATH_MARK + i``."""
    i = t.path.index
    for sub in subnets:
        ip("route", "replace", sub, "dev", t.ifname, "table", str(PATH_TABLE + i))
    ip("rule", "del", "fwmark", hex(PATH_MARK + i), check=False)
    ip("rule", "add", "fwmark", hex(PATH_MARK + i), "lookup", str(PATH_TABLE + i), "priority",
       str(PATH_RULE_PRIORITY + i))


def announcement(site: Site, wg_public_key: PublicKey, learned: bool = False) -> Announcement:
    """What ``site`` announces of itself: its WireGuard key, subnets and
    uplinks (``learned``: the subnets are its routers', BGP)."""
    return Announcement.make(site.name, wg_public_key=wg_public_key.base64, subnets=list(site.subnets),
                             uplinks=[{"name": u.name, "address": u.address, "port": u.port, "nat": u.nat,
                                       "mtu": u.mtu} for u in site.uplinks], learned=learned)


def _answering(proc: WireguardGo, timeout: float = 2.0) -> None:
    """Wait until a new wireguard-go answers on its socket: the socket file
    appears when it is bound, a moment before it accepts."""
    end = time.monotonic() + timeout
    while True:
        try:
            proc.uapi.get()
            return
        except UapiError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


class SiteRealiser:
    """The tunnels of one site, kept in line with the mesh: ``sync`` creates
    the missing ones (or adopts a working interface an earlier run left, so
    a restart reconciles instead of duplicating) and reconfigures the others
    when their configuration changed; ``announce`` publishes the site's
    signed announcement; ``close`` removes what it brought up.

    ``wireguard``: "userspace" runs a wireguard-go per tunnel, "kernel"
    creates kernel WireGuard interfaces, "auto" the kernel's when it has
    WireGuard, else wireguard-go. Configuration goes through
    ``wireguard.kernel.Backend`` either way. ``netns`` runs everything in a
    named namespace (userspace only); ``route_paths`` adds each new tunnel's
    ``path_table``; ``on_process(proc, started)`` is told of every
    wireguard-go before it starts and after (a caller recording what to
    clean up after a crash)."""

    def __init__(self, site: str, key: PrivateKey, *, prefix: str, netns: str | None = None,
                 topology: Topology | None = None, wireguard: str = "userspace", route_paths: bool = False,
                 ip: IpRunner | None = None,
                 on_process: Callable[[WireguardGo, bool], None] | None = None) -> None:
        if wireguard not in WIREGUARD_MODES:
            raise ConfigError("wireguard", wireguard, f"is not one of {', '.join(WIREGUARD_MODES)}")
        if netns is not None and wireguard != "userspace":
            raise ConfigError("wireguard", wireguard, "in a named namespace only wireguard-go (userspace) is run")
        self.site, self.key, self.prefix, self.netns = site, key, prefix, netns
        self.topology = topology or Topology.full()
        self.route_paths = route_paths
        self.ip = ip or ip_runner(netns)
        self._on_process = on_process
        self._kernel = wireguard == "kernel" or (wireguard == "auto" and Kernel.available())
        self.tunnels: dict[int, Tunnel] = {}               # path index -> tunnel
        self.wg: dict[str, WireguardGo | None] = {}         # ifname -> its wireguard-go; None: not ours to stop
        self.adopted: list[str] = []                        # interfaces an earlier run left, taken over
        self._applied: dict[str, InterfaceConfig] = {}      # ifname -> the configuration it holds
        self._backends: dict[str, Uapi | Kernel] = {}       # ifname -> how it is configured (no wireguard-go of ours)
        self._routed: dict[str, set[str]] = {}              # ifname -> subnets its path table routes

    # -- configuration -------------------------------------------------------------

    def config(self, mesh: Any, t: Tunnel, peer: PublicKey, *, lans: Iterable[str] | None = None,
               staged: Iterable[PublicKey] = ()) -> InterfaceConfig:
        """The interface configuration of tunnel ``t``: this site's key, the
        path's listen port, the local uplink's mark, the peer ``peer`` with
        the remote inner addresses and ``lans`` (default: the remote site's
        subnets) as AllowedIPs. Each ``staged`` key is a further peer with no
        AllowedIPs (routes nothing): a key rotation's overlap window."""
        remote = t.path.remote_site
        lans = list(mesh.site(remote).subnets) if lans is None else list(lans)
        k = uplink_index(mesh.site(self.site), t.path.local_uplink)
        peers = [PeerConfig(peer, endpoint=t.remote_endpoint, persistent_keepalive=t.keepalive,
                            allowed_ips=(f"{t.remote_v4}/32", f"{t.remote_v6}/128", *lans))]
        peers += [PeerConfig(p, endpoint=t.remote_endpoint, persistent_keepalive=t.keepalive) for p in staged]
        return InterfaceConfig(self.key, listen_port=t.listen_port, fwmark=UPLINK_MARK + k, peers=tuple(peers))

    def route_subnets(self, mesh: Any) -> None:
        """Every tunnel's path table routes exactly its remote site's
        subnets in ``mesh`` (with ``route_paths``): what a site's
        announcement added is routed, what it dropped is removed."""
        if not self.route_paths:
            return
        names = {x.name for x in mesh.sites}
        cmds = []
        for t in self.tunnels.values():
            want = set(mesh.site(t.path.remote_site).subnets) if t.path.remote_site in names else set()
            have = self._routed.get(t.ifname, set())
            table = str(PATH_TABLE + t.path.index)
            cmds += [f"route replace {sub} dev {t.ifname} table {table}" for sub in sorted(want - have)]
            cmds += [f"route del {sub} dev {t.ifname} table {table}" for sub in sorted(have - want)]
            self._routed[t.ifname] = want
        self.ip_batch_routes([tuple(c.split()[1:]) for c in cmds])

    def ip_batch_routes(self, cmds: Iterable[tuple[str, ...]]) -> None:
        """``ip route`` commands (the arguments after ``route``) in one ``ip
        -force -batch`` process: each ``ip`` is a process started from the
        agent's event loop. A command that fails (a route already gone) does
        not stop the others."""
        lines = [" ".join(("route", *c)) for c in cmds]
        if not lines:
            return
        with tempfile.NamedTemporaryFile("w", prefix="pn-routes-", suffix=".batch") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            self.ip("-force", "-batch", f.name, check=False)

    def plan(self, mesh: Any) -> list[Tunnel]:
        """Every tunnel of the site the topology allows (nothing is touched)."""
        return tunnels(mesh, self.site, self.topology, prefix=self.prefix)

    # -- tunnels ----------------------------------------------------------------------

    def sync(self, mesh: Any, config: Callable[[Tunnel], InterfaceConfig | None], *,
             force: bool = False) -> list[Tunnel]:
        """Bring the site's tunnels in line with ``mesh``: ``config(t)`` gives
        each tunnel's configuration, or None to leave it out for now (a peer
        not announced yet). New tunnels are created (or adopted) and
        configured; the others are reconfigured when their configuration
        changed (``force``: reconciled every time). Returns the new ones."""
        new = []
        remote_subnets: dict[str, list[str]] = {}
        for t in self.plan(mesh):
            cfg = config(t)
            if cfg is None:
                continue
            if t.ifname not in self.wg:
                adopted = self._create(t.ifname)
                self.backend(t.ifname).apply(cfg)
                self.ip("addr", "replace", t.local_v4, "dev", t.ifname)
                self.ip("addr", "replace", t.local_v6, "dev", t.ifname, check=False)  # no IPv6 below 1280
                self.ip("link", "set", t.ifname, "mtu", str(t.mtu), "up")
                if self.route_paths:
                    subnets = remote_subnets.setdefault(t.path.remote_site, list(mesh.site(t.path.remote_site).subnets))
                    path_table(t, subnets, self.ip)
                    self._routed[t.ifname] = set(subnets)
                log.info("tunnel %s up%s: path %s (#%d) to %s at %s", t.ifname, " (adopted)" if adopted else "",
                         t.path.id, t.path.index, t.path.remote_site, t.remote_endpoint)
                new.append(t)
            elif force or self._applied.get(t.ifname) != cfg:  # a peer's key or endpoint changed
                self.backend(t.ifname).apply(cfg)
            self._applied[t.ifname] = cfg
            self.tunnels[t.path.index] = t
        return new

    def backend(self, ifname: str) -> Uapi | Kernel:
        """How ``ifname`` is configured: its wireguard-go's UAPI socket, else the kernel."""
        proc = self.wg.get(ifname)
        if proc is not None:
            return proc.uapi
        if ifname not in self._backends:
            self._backends[ifname] = Backend.for_interface(ifname)
        return self._backends[ifname]

    def _create(self, ifname: str) -> bool:
        """Bring up the interface ``ifname``; True when a working one was
        there already (an earlier run's) and is adopted."""
        if Backend.exists(ifname, kernel=self._kernel):
            self.wg[ifname] = None
            self.adopted.append(ifname)
            return True
        if self._kernel:
            self.ip("link", "add", ifname, "type", "wireguard")
            self.wg[ifname] = None
            return False
        proc = WireguardGo(ifname, self.netns)
        if self._on_process is not None:
            self._on_process(proc, False)
        proc.start()
        self.wg[ifname] = proc
        _answering(proc)
        if self._on_process is not None:
            self._on_process(proc, True)
        return False

    def remove(self, indexes: Iterable[int]) -> None:
        """Remove the tunnels of these path indexes (a site left the mesh)."""
        for i in set(indexes):
            t = self.tunnels.pop(i, None)
            if t is not None:
                self._remove(t.ifname)

    def _remove(self, ifname: str) -> None:
        self._routed.pop(ifname, None)
        proc = self.wg.pop(ifname, None)
        self._applied.pop(ifname, None)
        backend = self._backends.pop(ifname, None)
        if isinstance(backend, Kernel):
            backend.close()
        if proc is not None:
            proc.stop()
        else:  # adopted or kernel: deleting the interface ends it (and its wireguard-go)
            self.ip("link", "del", ifname, check=False)

    def close(self) -> None:
        """Remove every tunnel this realiser brought up or adopted."""
        for ifname in list(self.wg):
            self._remove(ifname)
        self.tunnels.clear()

    # -- discovery ----------------------------------------------------------------------

    def announce(self, mesh: Any, registry: Any, signer: SigningKey,
                 subnets: Iterable[str] | None = None) -> Announcement:
        """Publish the site's announcement (``announcement``), signed by
        ``signer``; ``subnets``: announce these instead of the mesh's (a BGP
        site's learned prefixes)."""
        site = mesh.site(self.site)
        if subnets is not None:
            site = attrs.evolve(site, subnets=tuple(subnets))
        signed: SignedAnnouncement = signer.sign(announcement(site, self.key.public_key(), learned=subnets is not None))
        result: Announcement = registry.publish(signed)
        return result

    @staticmethod
    def peers(registry: Any, exclude: str, now: float | None = None) -> dict[str, PublicKey]:
        """The WireGuard key of every site the registry knows (but ``exclude``)."""
        return {st.site: PublicKey.from_text(st.announcement.wg_public_key) for st in registry.sites(now)
                if st.site != exclude}
