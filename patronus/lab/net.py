"""The network-namespace lab: N sites with K WAN uplinks each, a WAN core,
a LAN host behind every site, and a real WireGuard tunnel (wireguard-go)
for every path of the mesh.

Layout (``tag`` makes every name unique, so labs and tests can run side by
side; interface names stay within 15 characters)::

    {tag}-lan{s}  --veth--  {tag}-s{s}  ==uplink k veth==  {tag}-wan
    10.{s+1}.0.2/24          10.{s+1}.0.1                    172.{16+k}.{s}.1/24 ... (forwarding)

Site ``s`` uplink ``k`` has address 172.{16+k}.{s}.2 behind the core's
172.{16+k}.{s}.1. Each site's tunnels, marks and announcement come from the
site realiser (``patronus.site``), the same code the production agent runs;
the lab adds the namespaces, the WAN and impairment. Everything the lab
creates is recorded in a state file first, so ``down()`` (or ``patronus lab
down``) removes it after a crash too.

Site agents instead of the lab's own tunnels (``patronus lab up --agents``):
``up(tunnels=False)`` builds the network only, ``start_agents()`` runs a
``patronus agent`` per site in its namespace (tunnels ``{tag}a{s}t{index}``,
state ``{tag}.agents.db``, a log and a status file per site next to the
lab's state file), ``wait_agents()`` waits until every path's BFD is up.

>>> Lab.plan_mesh(sites=2, uplinks=1).paths("s0", "s1")[0].id
's0.u0~s1.u0'
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PatronusError
from ..mesh import Mesh
from ..store import save_mesh
from ..model import Site, Uplink
from ..site import SiteRealiser, ip_runner, path_table, uplink_route
from ..wireguard.config import InterfaceConfig
from ..wireguard.keys import PrivateKey, PublicKey, write_secret_file
from ..wireguard.plan import Topology, Tunnel, tunnels
from ..wireguard.uapi import Uapi, WireguardGo

__all__ = ["Lab", "LabError", "cleanup", "status", "status_text"]

STATE_DIR = Path(os.environ.get("PATRONUS_LAB_DIR", "/run/patronus-lab"))


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
    files: list[str] = field(default_factory=list)   # removed by cleanup (agent state, keys, logs)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> pid, start, log, status

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
        self.nets: dict[str, SiteRealiser] = {}   # site -> its tunnels
        self.agents: dict[int, subprocess.Popen[bytes]] = {}  # site index -> `patronus agent` process
        self._agent_state: Path | None = None
        self._agent_mesh: Mesh | None = None
        self._tokens: dict[tuple[str, str], str] = {}      # (state file, site) -> enrolment token
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

    @property
    def wg(self) -> dict[str, WireguardGo]:
        """Every tunnel's wireguard-go, by interface name."""
        return {name: proc for net in self.nets.values() for name, proc in net.wg.items() if proc is not None}

    @property
    def tunnels(self) -> dict[tuple[str, int], Tunnel]:
        """Every tunnel, by (the site it is seen from, path index)."""
        return {(site, i): t for site, net in self.nets.items() for i, t in net.tunnels.items()}

    def _ip(self, s: int) -> Any:
        """Runs `ip` in site s's namespace."""
        return ip_runner(self.site_ns(s), LabError)

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
            uplink_route(k, f"172.{16 + k}.{s}.1", up, self._ip(s))
        self.keys[f"s{s}"] = PrivateKey.generate()
        self.pubkeys[f"s{s}"] = self.keys[f"s{s}"].public_key()
        self.nets[f"s{s}"] = SiteRealiser(f"s{s}", self.keys[f"s{s}"], prefix=self._prefix(s), netns=sn,
                                          topology=self.topology, ip=self._ip(s), on_process=self._record)

    def _record(self, proc: WireguardGo, started: bool) -> None:
        """A tunnel's socket before its wireguard-go starts, its pid after:
        in the state file, so ``cleanup`` finds them after a crash."""
        if not started:
            self._state.sockets.append(proc.uapi.path)
        elif proc.proc is not None:
            self._state.pids.append(proc.proc.pid)
        self._state.save(self.state_path)

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
        return self.nets[f"s{s}"].announce(self.mesh, registry, signer)

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
        for net in self.nets.values():
            net.remove(gone)
        self.nets.pop(name, None)
        self.mesh.remove_site(name)
        for ns in (self.site_ns(s), self.lan_ns(s)):
            _run("ip", "netns", "del", ns, check=False)
            if ns in self._state.namespaces:
                self._state.namespaces.remove(ns)
        self._state.save(self.state_path)

    def _config(self, s: int, t: Tunnel) -> InterfaceConfig:
        """Tunnel t's configuration at site s: the remote's LANs (a spoke's
        hub carries every other site's too) and, during a rotation, the
        remote's next key staged next to the current one (no AllowedIPs, so
        the switch is only a move of AllowedIPs)."""
        remote = t.path.remote_site
        lans = list(self.mesh.site(remote).subnets)
        if self.topology.kind == "hub" and remote in self.topology.hubs and f"s{s}" not in self.topology.hubs:
            # a spoke reaches every other site through its hub
            lans += [n for x in self.mesh.sites if x.name not in (remote, f"s{s}") for n in x.subnets]
        staged = [self.next_keys[remote].public_key()] if remote in self.next_keys else []
        return self.nets[f"s{s}"].config(self.mesh, t, self.pubkeys[remote], lans=lans, staged=staged)

    def _sync_tunnels(self, s: int) -> None:
        """Create missing tunnels of site s and reconcile the others."""
        net = self.nets[f"s{s}"]
        net.key = self.keys[f"s{s}"]
        net.sync(self.mesh, lambda t: self._config(s, t), force=True)

    def steer_tables(self, s: int, other: int) -> None:
        """At site s, one routing table per path to site ``other``, chosen by
        the path's steering mark (for the data plane's steering to use)."""
        for (site, _), t in self.tunnels.items():
            if site == f"s{s}" and t.path.remote_site == f"s{other}":
                path_table(t, list(self.mesh.site(f"s{other}").subnets), self._ip(s))

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

    # -- site agents ----------------------------------------------------------------

    # -- a controller on the lab's WAN ------------------------------------------------

    CONTROLLER_WAN = "172.31.0.2"    # where the sites reach a controller (``controller_ns``)
    CONTROLLER_HOST = "172.31.1.2"   # where this process (the root namespace) reaches it

    @property
    def controller_ns(self) -> str:
        return f"{self.tag}-ctl"

    def add_controller_net(self) -> str:
        """A namespace for a controller: on the lab's WAN at ``CONTROLLER_WAN``
        (each site routes to it by its first uplink) and, for the test that
        drives it, reachable from the root namespace at ``CONTROLLER_HOST``.
        Returns its name; ``down()`` removes it with the rest."""
        ns, t = self.controller_ns, self.tag
        self._netns(ns)
        _run("ip", "link", "add", f"{t}k0", "netns", ns, "type", "veth", "peer", "name", f"{t}k1", "netns", self.wan_ns)
        _run("ip", "addr", "add", f"{self.CONTROLLER_WAN}/24", "dev", f"{t}k0", ns=ns)
        _run("ip", "addr", "add", "172.31.0.1/24", "dev", f"{t}k1", ns=self.wan_ns)
        _run("ip", "link", "set", f"{t}k0", "up", ns=ns)
        _run("ip", "link", "set", f"{t}k1", "up", ns=self.wan_ns)
        _run("ip", "route", "add", "default", "via", "172.31.0.1", ns=ns)
        # the root namespace's leg (it goes with the namespace)
        _run("ip", "link", "add", f"{t}k2", "type", "veth", "peer", "name", f"{t}k3", "netns", ns)
        _run("ip", "addr", "add", "172.31.1.1/30", "dev", f"{t}k2")
        _run("ip", "addr", "add", f"{self.CONTROLLER_HOST}/30", "dev", f"{t}k3", ns=ns)
        _run("ip", "link", "set", f"{t}k2", "up")
        _run("ip", "link", "set", f"{t}k3", "up", ns=ns)
        for s in range(self.nsites):
            _run("ip", "route", "add", "172.31.0.0/24", "via", f"172.16.{s}.1", ns=self.site_ns(s))
        return ns

    def agent_prefix(self, s: int) -> str:
        """Tunnel name prefix of site s's agent (+ path index). The lab's own
        tunnels end in ``w`` + digits, these in ``t`` + digits, so the two
        never share a name (nor their UAPI socket); the ``a`` ends the tag, so
        labs ``ab`` and ``ab1`` differ too (``aba11t`` vs ``ab1a1t``)."""
        return f"{self.tag}a{s}t"

    @property
    def agent_state_path(self) -> Path:
        """The agents' SQLite state (mesh + discovery registry), next to the lab's state file."""
        return self.state_path.with_name(f"{self.tag}.agents.db")

    def agent_state_path_of(self, s: int) -> Path:
        """Site s's own state file, when its agent runs from a controller."""
        return self.state_path.with_name(f"{self.tag}.agent.s{s}.db").resolve()

    @staticmethod
    def agent_status_path(state_path: Path, s: int) -> Path:
        return Path(f"{state_path}.s{s}.status.json")

    @staticmethod
    def agent_log_path(state_path: Path, s: int) -> Path:
        return Path(f"{state_path}.s{s}.log")

    def _own_files(self, *paths: Path) -> None:
        new = [str(p) for p in paths if str(p) not in self._state.files]
        if new:
            self._state.files += new
            self._state.save(self.state_path)

    def write_agent_state(self, mesh: Mesh | None = None, path: Path | None = None) -> Path:
        """Save ``mesh`` (default: the lab's) as the agents' desired state.
        Saving again replaces the mesh and keeps the registry (enrolled
        sites stay enrolled): agents started after it read the new mesh.
        The lab removes the file at ``down()``."""
        path = Path(path or self.agent_state_path)
        self._own_files(path, *(Path(f"{path}{x}") for x in ("-wal", "-shm", "-journal")))
        save_mesh(mesh or self.mesh, path)
        return path

    def start_agents(self, state_path: Path | None = None, backend: str = "auto", *,
                     controller: str | None = None, tokens: dict[str, str] | None = None,
                     extra: list[str] | None = None,
                     site_extra: dict[int, list[str]] | None = None) -> dict[int, subprocess.Popen[bytes]]:
        """Start one ``patronus agent`` per site inside its site namespace:
        LAN interface ``{tag}l{s}``, tunnel prefix ``agent_prefix(s)``, the
        state at ``state_path`` (written from the lab's mesh if missing) and
        an enrolment token per site. Output goes to ``agent_log_path``; each
        pid is in the lab state before the agent has done anything, so
        ``down()`` and ``patronus lab down`` stop it (SIGTERM: it detaches
        what it attached) even after this process died. Build the lab with
        ``up(tunnels=False)``: the agents bring their own tunnels, and the
        lab's would hold their listen ports. ``wait_agents()`` waits for them.

        With ``controller`` (its URL as the sites see it) and ``tokens`` (its
        enrolment token per site name), nothing is shared: each agent has a
        state file of its own (``agent_state_path_of(s)``), gets its desired
        state and its peers from the controller, and enrols with its token
        (written to a 0600 file). The lab's mesh names the sites. ``extra``:
        more arguments for every agent (``--metrics-listen 127.0.0.1:9464``:
        each site namespace has its own loopback); ``site_extra``: more
        arguments for one site's agent (``{0: ["--bgp", "s0.bgp.json"]}``)."""
        if backend not in ("auto", "xdp", "userspace"):
            raise ConfigError("backend", backend, "is not one of auto, xdp, userspace")
        if self.agents:
            raise ConfigError("Lab.start_agents", sorted(self.agents), "agents are running; stop_agents() first")
        if self.wg:
            raise ConfigError("Lab.start_agents", self.tag, "the lab has tunnels of its own: use up(tunnels=False)")
        from ..store import Store
        from ..wireguard.discovery import SqliteRegistry
        from ..wireguard.uapi import SOCKET_DIR

        path = Path(state_path or self.agent_state_path).resolve()
        if controller is not None:
            mesh = self.mesh
            if tokens is None or set(tokens) != {x.name for x in mesh.sites}:
                raise ConfigError("Lab.start_agents tokens", sorted(tokens or {}), "must hold a token per site")
        elif not path.exists():
            self.write_agent_state(path=path)
        if controller is None:
            with Store(path) as st:
                mesh = st.load_mesh()
        names = [x.name for x in mesh.sites]
        missing = [n for n in names if (str(path), n) not in self._tokens] if controller is None else []
        if missing:
            reg = SqliteRegistry(path)
            try:
                for n in missing:
                    self._tokens[(str(path), n)] = reg.create_token(n)
            finally:
                reg.close()
        self._agent_state, self._agent_mesh = path, mesh
        self._agent_paths = {int(n[1:]): (self.agent_state_path_of(int(n[1:])) if controller else path) for n in names}
        for n in names:  # what the agents will make, recorded before they make it
            s = int(n[1:])
            spath = self._agent_paths[s]
            base = f"{spath}.{n}"
            self._own_files(self.agent_log_path(spath, s), self.agent_status_path(spath, s),
                            Path(f"{base}.status.json.tmp"), Path(f"{base}.wg.key"), Path(f"{base}.sign.key"))
            if controller is not None:
                self._own_files(spath, *(Path(f"{spath}{x}") for x in ("-wal", "-shm", "-journal")),
                                Path(f"{spath}.token"), Path(f"{base}.controller.json"))
                assert tokens is not None
                write_secret_file(Path(f"{spath}.token"), tokens[n].encode(), replace=True)
            for t in tunnels(mesh, n, prefix=self.agent_prefix(s)):
                sock = os.path.join(SOCKET_DIR, f"{t.ifname}.sock")
                if sock not in self._state.sockets:
                    self._state.sockets.append(sock)
        self._state.save(self.state_path)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])])}
        try:
            for n in names:
                s = int(n[1:])
                spath = self._agent_paths[s]
                cmd = ["ip", "netns", "exec", self.site_ns(s), sys.executable, "-m", "patronus.cli", "agent",
                       "--state", str(spath), "--site", n, "--lan-if", f"{self.tag}l{s}",
                       "--prefix", self.agent_prefix(s), "--backend", backend]
                if controller is not None:
                    cmd += ["--controller", controller, "--token-file", f"{spath}.token"]
                else:
                    cmd += ["--token", self._tokens[(str(path), n)]]
                cmd += list(extra or []) + list((site_extra or {}).get(s, []))
                with open(self.agent_log_path(spath, s), "ab") as logf:
                    logf.write(f"--- {time.strftime('%H:%M:%S')} lab {self.tag}: agent {n}, backend {backend}\n"
                               .encode())
                    logf.flush()
                    # its own session: a terminal's Ctrl-C after `lab up` returned is not for it
                    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
                self.agents[s] = p
                self._state.pids.append(p.pid)   # `ip netns exec` execs: this is the agent's pid
                self._state.agents[n] = {"pid": p.pid, "start": _start_time(p.pid), "backend": backend,
                                         "state": str(spath), "log": str(self.agent_log_path(spath, s)),
                                         "status": str(self.agent_status_path(spath, s))}
                self._state.save(self.state_path)
        except BaseException:
            self.stop_agents()
            raise
        return dict(self.agents)

    def agent_status(self, s: int, state_path: Path | None = None) -> dict[str, Any] | None:
        """Site s's agent status file (``SiteAgent.write_status``), or None."""
        path = state_path or getattr(self, "_agent_paths", {}).get(s) or self._agent_state or self.agent_state_path
        return _read_json(self.agent_status_path(Path(path), s))

    def agent_logs(self, lines: int = 20) -> str:
        """The last lines of every agent's log (for error messages)."""
        out = []
        for s in sorted(self.agents):
            p = self.agents[s]
            rc = p.poll()
            out.append(f"--- agent s{s} (pid {p.pid}, {'running' if rc is None else f'exited rc={rc}'}), last lines:")
            spath = getattr(self, "_agent_paths", {}).get(s) or self._agent_state or self.agent_state_path
            out.append(_tail(self.agent_log_path(spath, s), lines))
        return "\n".join(out)

    def wait_agents(self, timeout: float = 120.0, *, bfd_up: bool = True,
                    cond: Any = None) -> dict[str, dict[str, Any]]:
        """Wait until every running agent's status file (written by this
        process, not an earlier one) says ready and, with ``bfd_up``, lists
        every path of its site with BFD up; ``cond(statuses)`` may demand
        more. Returns the statuses by site. An agent that exits, or the
        timeout, raises ``LabError`` with what is missing and each log's tail."""
        mesh = self._agent_mesh or self.mesh
        end = time.monotonic() + timeout
        while True:
            statuses: dict[str, dict[str, Any]] = {}
            missing: dict[str, str] = {}
            for s, p in sorted(self.agents.items()):
                name = f"s{s}"
                if p.poll() is not None:
                    raise LabError(f"agent {name} exited (rc={p.returncode}) before it was ready\n{self.agent_logs()}")
                st = self.agent_status(s)
                if st is None or st.get("pid") != p.pid:
                    missing[name] = "no status file yet"
                    continue
                statuses[name] = st
                if st.get("engine_error"):
                    raise LabError(f"agent {name}: its failover engine failed: {st['engine_error']}\n"
                                   f"{self.agent_logs()}")
                if not st.get("ready"):
                    missing[name] = "not ready"
                    continue
                if bfd_up:
                    want = {x.id for x in mesh.paths(name)}
                    have = st.get("paths", {})
                    down = sorted(pid for pid in want if (have.get(pid) or {}).get("bfd") != "up")
                    if down:
                        missing[name] = f"BFD not up on {len(down)}/{len(want)} paths: " + ", ".join(
                            f"{pid} ({(have.get(pid) or {}).get('bfd', 'no tunnel')})" for pid in down[:4])
            if not self.agents:
                raise LabError("no agents running: start_agents() first")
            if not missing and (cond is None or cond(statuses)):
                return statuses
            if time.monotonic() > end:
                why = "; ".join(f"{k}: {v}" for k, v in missing.items()) or "the condition did not hold"
                raise LabError(f"agents not ready after {timeout:g} s: {why}\n{self.agent_logs()}")
            time.sleep(0.2)

    def stop_agents(self, timeout: float = 20.0) -> dict[int, int]:
        """SIGTERM every agent (each detaches XDP/nftables and removes its
        tunnels), wait up to ``timeout`` s, SIGKILL what is left. Returns
        the exit codes by site."""
        for p in self.agents.values():
            if p.poll() is None:
                p.terminate()
        end = time.monotonic() + timeout
        rcs: dict[int, int] = {}
        for s, p in self.agents.items():
            try:
                rcs[s] = p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                rcs[s] = p.wait()
            if p.pid in self._state.pids:
                self._state.pids.remove(p.pid)
            self._state.agents.pop(f"s{s}", None)
        self.agents.clear()
        self._state.save(self.state_path)
        return rcs

    def down(self) -> None:
        """Remove everything this lab made (agents, processes, sockets, namespaces, files)."""
        if self.agents:
            self.stop_agents()
        for relay in getattr(self, "_relays", {}).values():
            self._relay_loop.call_soon_threadsafe(relay.close)
        if hasattr(self, "_relay_loop"):
            self._relay_loop.call_soon_threadsafe(self._relay_loop.stop)
        for net in self.nets.values():
            for proc in net.wg.values():  # the namespaces go with cleanup: no interface to delete
                if proc is not None:
                    proc.stop()
        self.nets.clear()
        cleanup(self.state_path)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot): a pid the kernel
    gave to another process since has another one."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:]).rstrip("\n")
    except OSError as e:
        return f"({path}: {e.strerror})"


def cleanup(state_path: Path, agent_timeout: float = 15.0) -> bool:
    """Remove what a lab's state file lists, also after the lab's process
    died: SIGTERM to every process first, and up to ``agent_timeout`` s for
    site agents to detach what they attached, then the namespaces (and any
    process left in them), sockets and files. Returns whether there was
    anything to remove."""
    if not state_path.exists():
        return False
    st = json.loads(state_path.read_text())
    # an agent whose pid now names another process (start time differs) is gone
    stale = {a["pid"] for a in st.get("agents", {}).values()
             if a.get("start") is not None and _start_time(a["pid"]) != a["start"]}
    pids = [pid for pid in st.get("pids", []) if pid not in stale]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + (agent_timeout if st.get("agents") else 0.05)
    while time.monotonic() < end and any(_alive(pid) for pid in pids):
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
    for f in st.get("files", []):
        Path(f).unlink(missing_ok=True)
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
    out["agents"] = {}
    for site, a in sorted(st.get("agents", {}).items(), key=lambda kv: int(kv[0][1:])):
        alive = _alive(a["pid"]) and (a.get("start") is None or _start_time(a["pid"]) == a["start"])
        sf = _read_json(Path(a["status"]))
        if not isinstance(sf, dict) or sf.get("pid") != a["pid"]:
            sf = None  # a file an earlier agent left says nothing about this one
        out["agents"][site] = {"pid": a["pid"], "alive": alive, "backend_asked": a.get("backend"),
                               "log": a.get("log"), "status_file": a["status"],
                               "status_age_s": max(0.0, round(now - sf["ts"], 1)) if sf and "ts" in sf else None,
                               "status": sf}
    return out


def _natural(name: str) -> tuple[str, int]:
    """``x10`` after ``x9``: the name without its trailing digits, then their number."""
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem):] or -1)


def _table(header: list[str], rows: list[list[Any]], indent: str = "  ") -> list[str]:
    cells = [header] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def status_text(st: dict[str, Any]) -> str:
    """``status()`` as a few readable tables (``patronus lab status``)."""
    if not st.get("exists"):
        return "no such lab"
    ns = st["namespaces"]
    lines = [f"lab {st['tag']}: {st['sites']} sites x {st['uplinks']} uplinks; namespaces {sum(ns.values())}/"
             f"{len(ns)} present; {st['processes_alive']} processes alive"]
    if st["tunnels"]:
        lines.append(f"tunnels ({len(st['tunnels'])}):")
        rows = []
        for name, t in sorted(st["tunnels"].items(), key=lambda kv: _natural(kv[0])):
            if isinstance(t, dict):
                age = t["handshake_age_s"]
                rows.append([name, t["listen_port"], "never" if age is None else f"{age:g} s ago"])
            else:
                rows.append([name, "-", "gone" if t is None else t])
        lines += _table(["tunnel", "port", "handshake"], rows)
    for site, a in st.get("agents", {}).items():
        sf = a["status"] or {}
        state = ("ready" if sf.get("ready") else "stopped" if sf.get("stopped") else
                 f"ENGINE FAILED ({sf['engine_error']})" if sf.get("engine_error") else "starting") if sf else "no status"
        age = "" if a["status_age_s"] is None else f", status {a['status_age_s']:g} s old"
        lines.append(f"agent {site}: pid {a['pid']} {'running' if a['alive'] else 'NOT RUNNING'}, backend "
                     f"{sf.get('backend') or a['backend_asked']}, {state}{age}; log {a['log']}")
        if sf.get("paths"):
            lines += _table(["path", "bfd", "tunnel", "rtt ms", "loss %"],
                            [[pid, p["bfd"], p["ifname"], p["rtt_ms"], p["loss_pct"]]
                             for pid, p in sf["paths"].items()], indent="    ")
        if sf.get("routes"):
            lines += _table(["class", "to", "path"], [[r["class"], r["site"], r["path"] or "(none)"]
                                                       for r in sf["routes"]], indent="    ")
    return "\n".join(lines)

