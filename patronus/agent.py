"""`patronus agent`: one site's whole job.

From the SQLite state (the mesh, the discovery registry) it brings up one
WireGuard tunnel per path to every announced site (adopting tunnels a
previous run left, so a restart after kill -9 reconciles instead of
duplicating), attaches the data plane to the LAN interface with steering,
runs BFD and probes on every path, runs the failover engine, and writes
path metrics (UDP probes against the other sites' responders, every 100 ms),
failover events and flow snapshots into the state. SIGTERM
(or ``stop()``) detaches everything it attached.

Conventions it shares with the lab: tunnel packets carry the mark
``0x5000 + local uplink index`` (policy routing sends them out of that
uplink), steered packets ``PATH_MARK + path index`` with one routing table
per path (``patronus.dataplane.PATH_*``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .dataplane import PATH_MARK
from .errors import ConfigError, PatronusError, StateError
from .failover.engine import DEFAULT_CLASS
from .lab.net import path_table
from .store import Store
from .wireguard.config import InterfaceConfig, PeerConfig
from .wireguard.discovery import Announcement, SigningKey, SqliteRegistry
from .wireguard.keys import PrivateKey, PublicKey, read_secret_file, write_secret_file
from .wireguard.plan import Tunnel, tunnels
from .wireguard.uapi import Uapi, UapiError, WireguardGo

__all__ = ["SiteAgent"]

log = logging.getLogger("patronus.agent")

UPLINK_MARK = 0x5000
PRUNE_EVERY_S = 60.0  # how often the agent applies the state's retention policy
PROBE_PORT = 7362


def _ip(*args: str, check: bool = True) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise PatronusError(f"ip {' '.join(args)}: {p.stderr.strip()}")


def _secret_file(path: Path, make: Any) -> bytes:
    """Read a 0600 secret file (32 bytes, base64), creating it with ``make()``
    when missing. Reading refuses symlinks, files of other owners or readable
    by others, and content that is not a key (ConfigError); creating writes a
    temporary file (O_EXCL|O_NOFOLLOW, 0600, fsync) and hard-links it into
    place, so a crash never leaves half a key and a concurrent creator wins."""
    if not os.path.lexists(path):
        write_secret_file(path, (base64.b64encode(make()).decode() + "\n").encode(), replace=False)
    text = read_secret_file(path)
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise ConfigError("key file", str(path), "does not hold a key (base64 of 32 bytes)")
    return raw


class SiteAgent:
    """Run with ``await agent.run()`` (until ``stop()``), in the site's namespace."""

    def __init__(self, state: str | os.PathLike[str], site: str, *, lan_if: str | None = None,
                 token: str | None = None, prefix: str | None = None, backend: str = "auto",
                 interval_s: float = 1.0, bfd_ms: int = 50) -> None:
        self.state = Path(state)
        self.site = site
        self.lan_if, self.token, self.backend = lan_if, token, backend
        self.prefix = prefix or f"{site[:6]}w"
        self.interval_s, self.bfd_ms = interval_s, bfd_ms
        self._stop = asyncio.Event()
        self.tunnels: dict[int, Tunnel] = {}
        self.wg: dict[str, WireguardGo | None] = {}   # None: adopted from an earlier run
        self.adopted: list[str] = []
        self.sessions: dict[str, Any] = {}
        self.dp: Any = None
        self.engine: Any = None
        self.bfd_changes = 0  # BFD sessions that came Up or went Down, all paths
        self._applied: dict[str, InterfaceConfig] = {}  # ifname -> config its wireguard-go holds
        # telemetry (flow table scans, SQLite writes, the status file) runs on
        # this thread, with its own store connection, off the event loop
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-io")
        self._io_store: Store | None = None
        self._next_prune = 0.0

    # -- keys and discovery -------------------------------------------------------

    def _key_base(self) -> Path:
        return self.state.with_name(f"{self.state.name}.{self.site}")

    def _check_enrolment(self, mesh: Any, registry: SqliteRegistry) -> bool:
        """Refuse (named error, with the fix) a site the mesh does not have,
        or one that is not enrolled yet and has no usable token, before any
        file is written. True when the site must enroll (a valid token given)."""
        names = [x.name for x in mesh.sites]
        if self.site not in names:
            raise ConfigError("agent --site", self.site, f"is not a site of the mesh in {str(self.state)!r} "
                                                         f"(its sites: {', '.join(names) or 'none'})")
        sign_path = Path(f"{self._key_base()}.sign.key")
        if os.path.lexists(sign_path):
            raw = _secret_file(sign_path, lambda: os.urandom(32))  # reads only: it exists
            public = SigningKey(Ed25519PrivateKey.from_private_bytes(raw)).public_bytes
            if registry._db.execute("SELECT 1 FROM site_keys WHERE public_key = ? AND site = ?",
                                    (public, self.site)).fetchone():
                return False
        if not self.token:
            raise PatronusError(
                f"site {self.site!r} is not enrolled yet: give its enrolment token with --token-file PATH or "
                f"the PATRONUS_TOKEN environment variable (make one with `patronus token create --state "
                f"{self.state} --site {self.site}`)")
        registry.check_token(self.token, self.site)
        return True

    def preflight(self) -> None:
        """Every check ``run`` would fail on at start, without creating or
        writing anything: the state file exists and holds a mesh, the site is
        one of it, and it is enrolled or has a valid token."""
        if not self.state.exists():
            raise StateError(f"no state file at {str(self.state)!r}: save the mesh there first "
                             f"(Mesh.save({str(self.state)!r}), or `patronus lab up --agents`), "
                             f"or point --state at the mesh's state file")
        with Store(self.state, create=False) as store:
            try:
                mesh = store.load_mesh()
            except StateError as e:
                raise StateError(f"{e}: save the mesh into it first (Mesh.save({str(self.state)!r}))") from None
        registry = SqliteRegistry(self.state, create=False)
        try:
            self._check_enrolment(mesh, registry)
        finally:
            registry.close()

    def _keys(self) -> None:
        enroll = self._check_enrolment(self.mesh, self.registry)  # refuses before writing key files
        base = self._key_base()
        self.key = PrivateKey(_secret_file(Path(f"{base}.wg.key"), lambda: PrivateKey.generate()._raw))
        raw = _secret_file(Path(f"{base}.sign.key"), lambda: os.urandom(32))
        self.signer = SigningKey(Ed25519PrivateKey.from_private_bytes(raw))
        if enroll:
            assert self.token is not None
            self.registry.enroll(self.token, self.site, self.signer.public_bytes)

    def announce(self) -> None:
        site = self.mesh.site(self.site)
        ann = Announcement.make(self.site, wg_public_key=self.key.public_key().base64, subnets=list(site.subnets),
                                uplinks=[{"name": u.name, "address": u.address, "port": u.port} for u in site.uplinks])
        self.registry.publish(self.signer.sign(ann))

    # -- tunnels ------------------------------------------------------------------

    def _sync_tunnels(self) -> None:
        peers = {st.site: PublicKey.from_text(st.announcement.wg_public_key) for st in self.registry.sites()
                 if st.site != self.site}
        local = self.mesh.site(self.site)
        for t in tunnels(self.mesh, self.site, prefix=self.prefix):
            if t.path.remote_site not in peers:
                continue
            remote = self.mesh.site(t.path.remote_site)
            k = [u.name for u in local.uplinks].index(t.path.local_uplink)
            cfg = InterfaceConfig(self.key, listen_port=t.listen_port, fwmark=UPLINK_MARK + k, peers=(
                PeerConfig(peers[t.path.remote_site], endpoint=t.remote_endpoint, persistent_keepalive=t.keepalive,
                           allowed_ips=(f"{t.remote_v4}/32", f"{t.remote_v6}/128", *remote.subnets)),))
            if t.ifname not in self.wg:
                uapi = Uapi(t.ifname)
                try:
                    uapi.get()  # a tunnel an earlier run left: adopt and reconcile it
                    self.wg[t.ifname] = None
                    self.adopted.append(t.ifname)
                except UapiError:
                    self.wg[t.ifname] = WireguardGo(t.ifname).start()
                uapi.apply(cfg)
                _ip("addr", "replace", t.local_v4, "dev", t.ifname)
                _ip("link", "set", t.ifname, "mtu", str(t.mtu), "up")
                path_table(t, remote.subnets, _ip)
                log.info("tunnel %s up%s: path %s (#%d) to %s at %s", t.ifname,
                         " (adopted)" if self.wg[t.ifname] is None else "", t.path.id, t.path.index,
                         t.path.remote_site, t.remote_endpoint)
            elif self._applied.get(t.ifname) != cfg:  # a peer's key or endpoint changed
                Uapi(t.ifname).apply(cfg)
            self._applied[t.ifname] = cfg
            self.tunnels[t.path.index] = t

    # -- run ------------------------------------------------------------------------

    async def run(self) -> None:
        from . import dataplane
        from .failover import BfdSession, Engine

        self.store = Store(self.state)
        self.mesh = self.store.load_mesh()
        self.registry = SqliteRegistry(self.state)
        try:
            self._keys()
            self.announce()
            self._sync_tunnels()
            table = self.mesh.policy_table()
            self.dp = dataplane.open(table, backend=self.backend, flow_capacity=1 << 18)
            if self.lan_if and type(self.dp).__name__ == "Xdp":
                self.dp.attach(self.lan_if, mode="native")
                self.dp.enable_steering(self.lan_if, mark_base=PATH_MARK)
            elif self.lan_if:  # no XDP here: the same decisions as nftables marks
                from .dataplane.nft import NftSteering

                self.dp = _NftPlane(self.dp, NftSteering(table, self.lan_if, mark_base=PATH_MARK))
            self.engine = Engine(self.mesh, self.dp, local_site=self.site, store=self.store, tick_s=0.02)
            self.engine.on_event(self._log_event)
            log.info("site %s started: backend %s, LAN interface %s, %d tunnels, %d policies", self.site,
                     self.backend_name(), self.lan_if or "(none)", len(self.tunnels), len(self.mesh.policies))
            from .paths import Monitor, Responder

            self.responder = await Responder(("0.0.0.0", PROBE_PORT)).start()
            self.monitor = await Monitor(interval_ms=100, window=50).start()
            self.engine.watch_monitor(self.monitor)
            await self._watch_new_tunnels(BfdSession)
            engine_task = asyncio.create_task(self.engine.run())
            engine_task.add_done_callback(self._engine_done)
            self._engine_task = engine_task
            names = [p.name for p in self.mesh.policies]
            next_announce, last_snap = 0.0, 0.0
            loop = asyncio.get_running_loop()
            while not self._stop.is_set():
                now = time.time()
                if now >= next_announce:
                    self.announce()
                    next_announce = now + 5
                self._sync_tunnels()  # sites that joined since: new tunnels, BFD on them
                await self._watch_new_tunnels(BfdSession)
                # flows, metrics and status off the event loop: a scan of the
                # flow table and SQLite writes must not hold up BFD (at 50 ms
                # x 3, a 150 ms stall is a false Down at every peer)
                ms = self.monitor.all_metrics()
                await loop.run_in_executor(self._io, self._telemetry, now, last_snap, names, ms, self.status())
                last_snap = now
                try:
                    await asyncio.wait_for(self._stop.wait(), self.interval_s)
                except asyncio.TimeoutError:
                    pass
            self.engine.stop()
            await engine_task
        finally:
            await self._teardown()

    def _telemetry(self, now: float, last_snap: float, names: list[str], ms: dict[str, Any],
                   status: dict[str, Any]) -> None:
        """Flow snapshot, path metrics and the status file; runs on the agent's
        I/O thread with a store connection of its own."""
        if self._io_store is None:
            self._io_store = Store(self.state)
        flows = self.dp.flows()
        # only flows that saw packets since the last snapshot (10 ms of slack
        # for the kernel's coarse clock): the state grows with traffic, not time
        active = flows[flows["last_ns"] >= np.uint64(max(0, int(last_snap * 1e9) - 10_000_000))]
        self._io_store.add_flow_snapshot(now, self.site, active, names)
        self._io_store.add_path_metrics(now, [(pid, m.rtt_ms, m.jitter_ms, m.loss_pct, m.mos, m.mtu, m.bandwidth_mbps)
                                              for pid, m in ms.items() if m.samples])
        if now >= self._next_prune:  # the state's retention policy (Store.prune's defaults)
            self._io_store.prune(now=now)
            self._next_prune = now + PRUNE_EVERY_S
        self.write_status(status=status)

    async def _watch_new_tunnels(self, session_cls: Any) -> None:
        for t in self.tunnels.values():
            if t.path.id not in self.sessions:
                s = session_cls(t.local_v4.split("/")[0], t.remote_v4, self.bfd_ms, self.bfd_ms, 3)
                s.on_change(lambda tr, pid=t.path.id: self._log_bfd(pid, tr))
                await s.start()
                self.sessions[t.path.id] = s
                self.engine.watch(t.path.id, s)
                self.monitor.add(t.path.id, remote=(t.remote_v4, PROBE_PORT), local=(t.local_v4.split("/")[0], 0))

    def _io_close(self) -> None:
        if self._io_store is not None:
            self._io_store.close()
            self._io_store = None

    async def _teardown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._io, self._io_close)
        self._io.shutdown(wait=True)
        for s in self.sessions.values():
            await s.stop()
        if getattr(self, "monitor", None) is not None:
            await self.monitor.stop()
        if getattr(self, "responder", None) is not None:
            self.responder.close()
        if self.dp is not None:
            try:
                self.store.add_flow_snapshot(time.time(), self.site, self.dp.flows(),
                                             [p.name for p in self.mesh.policies])
            except Exception:
                pass
            self.dp.close()
        for name, proc in self.wg.items():
            if proc is not None:
                proc.stop()
            else:  # adopted: deleting the interface ends its wireguard-go
                _ip("link", "del", name, check=False)
        self.registry.close()
        self.store.close()
        try:
            self.write_status(stopped=True)
        except Exception as e:  # the last status must not hide why the agent stops
            log.warning("status file %s: %s", self.status_path, e)
        log.info("site %s stopped", self.site)

    def stop(self) -> None:
        self._stop.set()

    # -- status and log ---------------------------------------------------------------

    def backend_name(self) -> str | None:
        """The data plane actually in use ("Xdp", "Userspace", a wrapper with
        what it wraps), or None before it is open."""
        if self.dp is None:
            return None
        name = type(self.dp).__name__
        inner = getattr(self.dp, "dp", None)
        return f"{name.lstrip('_')}({type(inner).__name__})" if inner is not None else name

    @property
    def status_path(self) -> Path:
        return self.state.with_name(f"{self.state.name}.{self.site}.status.json")

    def routes(self) -> list[dict[str, Any]]:
        """Which path each (traffic class, remote site) uses, from the engine:
        ``[{"class": policy or "(default)", "site": remote site, "path": path id or None}]``."""
        if self.engine is None:
            return []
        out = [{"class": cls, "site": site, "path": pid} for (cls, site), pid in self.engine.where().items()]
        return sorted(out, key=lambda r: (r["class"] != DEFAULT_CLASS, r["class"], r["site"]))

    def status(self, stopped: bool = False) -> dict[str, Any]:
        """What ``write_status`` writes: paths with BFD state and probe
        metrics, routes, and whether the site is ready (tunnels up, BFD
        running on every one)."""
        def num(x: Any) -> float | None:
            return None if x is None or not np.isfinite(x) else round(float(x), 3)

        monitor = getattr(self, "monitor", None)
        metrics = monitor.all_metrics() if monitor is not None else {}
        paths: dict[str, Any] = {}
        for t in sorted(self.tunnels.values(), key=lambda t: t.path.index):
            s, m = self.sessions.get(t.path.id), metrics.get(t.path.id)
            sampled = m is not None and m.samples
            paths[t.path.id] = {"bfd": s.state.name.lower() if s is not None else None, "ifname": t.ifname,
                                "remote_site": t.path.remote_site, "local_uplink": t.path.local_uplink,
                                "rtt_ms": num(m.rtt_ms) if sampled else None,
                                "loss_pct": num(m.loss_pct) if sampled else None}
        task = getattr(self, "_engine_task", None)
        failed = task.exception() if task is not None and task.done() and not task.cancelled() else None
        ready = (not stopped and failed is None and self.engine is not None and bool(self.tunnels)
                 and all(t.path.id in self.sessions for t in self.tunnels.values()))
        return {"site": self.site, "pid": os.getpid(), "ts": time.time(), "backend": self.backend_name(),
                "lan_if": self.lan_if, "ready": ready, "stopped": stopped,
                "engine_error": None if failed is None else f"{type(failed).__name__}: {failed}",
                "moves": self.engine.set_path_calls if self.engine is not None else 0,
                "bfd_changes": self.bfd_changes,
                "paths": paths, "routes": self.routes()}

    def write_status(self, stopped: bool = False, status: dict[str, Any] | None = None) -> None:
        """Write ``{state}.{site}.status.json`` atomically (a reader never
        sees half a file), mode 0644: ``status``, or ``self.status(stopped)``."""
        path = self.status_path
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump(status if status is not None else self.status(stopped), f, indent=1)
        os.replace(tmp, path)

    def _engine_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # said now, not only when the agent stops
            log.error("failover engine failed: %s", task.exception(), exc_info=task.exception())

    def _log_bfd(self, path_id: str, tr: Any) -> None:
        from .failover.bfd import Diag, State

        if tr.new == State.UP or tr.old == State.UP:
            self.bfd_changes += 1
            log.info("bfd %s %s (%s -> %s%s)", path_id, "up" if tr.new == State.UP else "down", tr.old.name.lower(),
                     tr.new.name.lower(), "" if tr.diag == Diag.NONE else f", {tr.diag.name.lower()}")

    def _log_event(self, ev: Any) -> None:
        site = getattr(ev, "site", None)
        detail = f" ({ev.detail})" if ev.detail else ""
        if ev.policy is None and site is None:   # about a path, not a move
            if ev.reason != "bfd_up":            # (the bfd line said that)
                log.info("path %s: %s%s", ev.to_path or ev.from_path, ev.reason, detail)
            return
        log.info("move %s%s: %s -> %s, %s%s", ev.policy or "(default)", f" to {site}" if site else "",
                 ev.from_path or "(none)", ev.to_path or "(none)", ev.reason, detail)


class _NftPlane:
    """The userspace data plane plus nftables steering: one set_path moves both."""

    def __init__(self, dp: Any, nft: Any) -> None:
        self.dp, self.nft = dp, nft

    def set_path(self, policy: str | int | None, path_id: int | None, site: str | int | None = None) -> None:
        self.dp.set_path(policy, path_id, site)
        self.nft.set_path(policy, path_id, site)

    def flows(self) -> Any:
        return self.dp.flows()

    def close(self) -> None:
        self.nft.close()
        self.dp.close()


def _token(args: Any) -> str | None:
    """The enrolment token: ``--token`` (visible to every local user in
    /proc/PID/cmdline), ``--token-file PATH``, or ``$PATRONUS_TOKEN``, in that order."""
    token = getattr(args, "token", None)
    path = getattr(args, "token_file", None)
    if token:
        return str(token)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(4096).strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("--token-file", str(path), f"cannot be read: {e}") from None
        if not text:
            raise ConfigError("--token-file", str(path), "is empty (the token file holds the enrolment token)")
        return text
    return os.environ.get("PATRONUS_TOKEN", "").strip() or None


def main(args: Any) -> int:
    if not logging.getLogger().handlers:  # an embedding program's logging stays as it is
        logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                            format="%(asctime)s.%(msecs)03d %(levelname).1s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    try:
        token = _token(args)
        agent = SiteAgent(args.state, args.site, lan_if=args.lan_if, token=token, backend=args.backend,
                          prefix=args.prefix)
        agent.preflight()  # refuse a bad start before anything is created
    except PatronusError as e:
        print(f"patronus agent: {e}", flush=True)
        return 2

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    try:
        asyncio.run(go())
    except PatronusError as e:
        print(f"patronus agent: {e}", flush=True)
        return 2
    return 0
