"""`patronus agent`: one site's whole job.

It takes the desired state (the mesh) from a ``StateSource`` (today
``LocalStateFile``, the SQLite state file) and, through the site realiser
(``patronus.site``), brings up one WireGuard tunnel per path to every site
announced in the discovery registry (adopting tunnels a previous run left,
so a restart after kill -9 reconciles instead of duplicating) with a
routing table per steered path. It attaches the data plane to the LAN
interface with steering, runs BFD and probes on every path, runs the
failover engine, and writes path metrics (UDP probes against the other
sites' responders, every 100 ms), failover events and flow snapshots into
the state. SIGTERM (or ``stop()``) detaches everything it attached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .dataplane import PATH_MARK
from .errors import ConfigError, PatronusError, StateError
from .failover.engine import DEFAULT_CLASS
from .mesh import Mesh
from .paths.monitor import DEFAULT_PORT
from .site import SiteRealiser
from .store import Store
from .wireguard.discovery import SigningKey, SqliteRegistry
from .wireguard.keys import PrivateKey, read_secret_file, write_secret_file
from .wireguard.plan import Tunnel

__all__ = ["SiteAgent", "StateSource", "DesiredState", "LocalStateFile", "ControllerSource", "CertificatePinError",
           "parse_token", "diff", "apply", "digest", "to_mesh", "TOKEN_PREFIX"]

log = logging.getLogger("patronus.agent")

PRUNE_EVERY_S = 60.0  # how often the agent applies the state's retention policy


@dataclass(frozen=True)
class DesiredState:
    """What a site should be: the mesh, and a version that changes when it does."""

    mesh: Mesh
    version: str


class StateSource(Protocol):
    """Where the agent gets its desired state from: a local state file
    (``LocalStateFile``), or a controller."""

    def load(self) -> DesiredState:
        """The desired state now; PatronusError (with the fix) when there is none."""
        ...

    def version(self) -> str:
        """The version ``load()`` would return now (to tell whether it changed)."""
        ...


class LocalStateFile:
    """The desired state from the mesh saved in a SQLite state file (``patronus.save_mesh``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> DesiredState:
        """The saved mesh; StateError naming the fix when the file or the mesh is missing."""
        if not self.path.exists():
            raise _no_state_file(self.path)
        with Store(self.path, create=False) as store:
            try:
                mesh = store.load_mesh()
            except StateError as e:
                raise StateError(f"{e}: save the mesh into it first "
                                 f"(patronus.save_mesh(mesh, {str(self.path)!r}))") from None
        return DesiredState(mesh, _mesh_version(mesh))

    def version(self) -> str:
        return self.load().version


# -- the controller's wire format (the controller computes it, the agent applies it) -----------

TOKEN_PREFIX = "pnt1"
_TOKEN_SITE_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_TOKEN_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


def canonical(data: Any) -> bytes:
    """The one JSON encoding digests and versions are computed over (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a desired state's canonical JSON."""
    return hashlib.sha256(canonical(state)).hexdigest()


def to_mesh(state: dict[str, Any]) -> Mesh:
    """The Mesh a desired state describes (the agent runs on a Mesh); its
    paths have the same ids and indexes as the controller's."""
    return Mesh.from_dict({
        "name": state["mesh"], "failover": state["failover"],
        "profiles": list(state.get("profiles", {}).values()),
        "sites": [state["sites"][n] for n in state["order"]],
        "policies": sorted(state["policies"].values(), key=lambda p: p["priority"]),
    })


_MAPS = ("sites", "paths", "policies", "profiles", "peers")


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """The changes from ``old`` to ``new``: a list of operations,
    ``{"op": "set", "key": k, "value": v}`` for a whole key, and for the
    per-item maps (sites, paths, policies, profiles)
    ``{"op": "set", "key": k, "item": name, "value": v}`` or
    ``{"op": "del", "key": k, "item": name}``. ``apply(old, diff(old, new)) == new``.

    >>> diff({"a": 1, "sites": {"x": 1, "y": 2}}, {"a": 2, "sites": {"x": 1, "z": 3}})
    [{'op': 'set', 'key': 'a', 'value': 2}, {'op': 'del', 'key': 'sites', 'item': 'y'}, {'op': 'set', 'key': 'sites', 'item': 'z', 'value': 3}]
    """
    ops: list[dict[str, Any]] = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            ops.append({"op": "del", "key": key})
            continue
        a, b = old.get(key), new[key]
        if key in _MAPS and isinstance(a, dict) and isinstance(b, dict):
            if a == b:
                continue
            for item in a:
                if item not in b:
                    ops.append({"op": "del", "key": key, "item": item})
            for item, val in b.items():
                if item not in a or a[item] != val:
                    ops.append({"op": "set", "key": key, "item": item, "value": val})
        elif a != b or key not in old:
            ops.append({"op": "set", "key": key, "value": b})
    return ops


def apply(state: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """``state`` with the operations of :func:`diff` applied (a new dict; ``state`` is not changed)."""
    out = dict(state)
    copied: set[str] = set()
    for op in ops:
        key = op["key"]
        if "item" in op:
            if key not in copied:
                out[key] = dict(out.get(key) or {})
                copied.add(key)
            if op["op"] == "del":
                out[key].pop(op["item"], None)
            else:
                out[key][op["item"]] = op["value"]
        elif op["op"] == "del":
            out.pop(key, None)
        else:
            out[key] = op["value"]
            copied.discard(key)
    return out


def parse_token(token: str) -> tuple[str, str, str]:
    """``pnt1.<site>.<secret>.<cert_sha256>`` -> (site, secret, cert_sha256);
    ConfigError naming what is wrong.

    >>> parse_token("pnt1.br1." + "a" * 43 + "." + "0" * 64)[0]
    'br1'
    """
    parts = token.strip().split(".") if isinstance(token, str) else []
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
        raise ConfigError("token", "<redacted>", f"is not an enrolment token ({TOKEN_PREFIX}.<site>.<secret>.<sha256>)")
    _, site, secret, pin = parts
    if not _TOKEN_SITE_RE.fullmatch(site):
        raise ConfigError("token", "<redacted>", "names no valid site")
    if not _TOKEN_SECRET_RE.fullmatch(secret):
        raise ConfigError("token", "<redacted>", "has a malformed secret")
    if not _HEX64_RE.fullmatch(pin):
        raise ConfigError("token", "<redacted>", "has a malformed certificate SHA-256 (64 lower-case hex digits)")
    return site, secret, pin


class CertificatePinError(PatronusError):
    """The controller presented a certificate whose SHA-256 is not the one
    the enrolment token pins: nothing was sent to it."""


class ControllerSource:
    """The desired state from a controller (``patronus controller run``).

    The first run enrols with ``token`` (``pnt1.<site>.<secret>.<cert sha256>``,
    from ``POST /api/v1/tokens``): the controller's certificate is fetched
    and its SHA-256 compared with the token's pin (:class:`CertificatePinError`
    when it differs, before anything is sent), then used as the only trusted
    CA (the hostname is not checked: the pin is the identity). The agent
    credential the controller returns, the pinned certificate and the last
    desired state are kept in ``cache`` (one JSON file, mode 0600). Later
    runs need no token. ``load()`` asks for the state since the version
    held (a delta is applied and checked against the digest, else a full
    copy), and returns the cached state when the controller is unreachable.
    """

    def __init__(self, url: str, cache: str | os.PathLike[str], *, token: str | None = None,
                 site: str | None = None, interval_s: float = 10.0, timeout: float = 10.0) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError("--controller", url, "is not an https://host:port URL")
        self.url = url.rstrip("/")
        self.host, self.port = parts.hostname, parts.port or 443
        self.cache = Path(cache)
        self.token, self.site, self.interval_s, self.timeout = token, site, interval_s, timeout
        self.offline = False   # the last load() came from the cache
        self._data: dict[str, Any] = self._read_cache()
        if self._data:
            if site is not None and self._data.get("site") != site:
                raise ConfigError("agent --site", site, f"differs from the site {self._data.get('site')!r} "
                                                        f"enrolled in {str(self.cache)!r}")
            self.site = self._data["site"]
        elif token is not None:
            tsite = parse_token(token)[0]
            if site is not None and site != tsite:
                raise ConfigError("agent --site", site, f"differs from the site of the enrolment token ({tsite!r})")
            self.site = tsite

    # -- the cache file ---------------------------------------------------------------

    def _read_cache(self) -> dict[str, Any]:
        if not os.path.lexists(self.cache):
            return {}
        try:
            data = json.loads(read_secret_file(self.cache, "controller cache"))
        except ValueError as e:
            raise StateError(f"{str(self.cache)!r} is not a controller cache: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("credential"), str):
            raise StateError(f"{str(self.cache)!r} is not a controller cache (no credential)")
        return data

    def _write_cache(self) -> None:
        tmp = self.cache.with_name(f"{self.cache.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._data, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.cache)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- talking to the controller --------------------------------------------------------

    def _ssl(self) -> Any:
        import ssl

        ctx = ssl.create_default_context(cadata=self._data["cert_pem"])
        ctx.check_hostname = False   # the pinned certificate is the identity, whatever name it carries
        return ctx

    def _client(self) -> Any:
        import httpx

        return httpx.Client(base_url=self.url, verify=self._ssl(), timeout=self.timeout,
                            headers={"Authorization": f"Bearer {self._data['credential']}"})

    def enrol(self) -> None:
        """Pin the controller's certificate and trade the token for a credential (once)."""
        import socket
        import ssl

        import httpx

        if self._data:
            return
        if not self.token:
            raise PatronusError(f"no controller credential in {str(self.cache)!r} and no enrolment token: give one "
                                "with --token-file PATH (make it with POST /api/v1/tokens)")
        site, _, pin = parse_token(self.token)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE   # read the certificate, trust nothing yet
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=self.host) as tls:
            der = tls.getpeercert(binary_form=True)
        got = hashlib.sha256(der or b"").hexdigest()
        if got != pin:
            raise CertificatePinError(f"the controller at {self.url} presents a certificate with SHA-256 {got}, "
                                      f"the enrolment token pins {pin}: refusing to enrol")
        self._data = {"url": self.url, "site": site, "cert_pem": ssl.DER_cert_to_PEM_cert(der),
                      "cert_sha256": pin, "credential": ""}
        body = {"interval_s": self.interval_s, "hostname": os.uname().nodename[:253]}
        with httpx.Client(base_url=self.url, verify=self._ssl(), timeout=self.timeout) as c:
            r = c.post("/api/v1/agent/enrol", json=body, headers={"Authorization": f"Bearer {self.token}"})
        if r.status_code != 201:
            self._data = {}
            raise PatronusError(f"the controller refused the enrolment: {r.status_code} {_detail(r)}")
        self._data["credential"] = r.json()["credential"]
        self.site = site
        self._write_cache()

    def fetch(self) -> DesiredState:
        """The desired state from the controller (httpx.TransportError when it is unreachable)."""
        self.enrol()
        since = self._data.get("version")
        with self._client() as c:
            r = c.get("/api/v1/agent/state", params={} if since is None else {"since": since})
            if r.status_code != 200:
                raise PatronusError(f"the controller refused the desired state: {r.status_code} {_detail(r)}")
            msg = r.json()
            state = None
            if "delta" in msg and "state" in self._data:
                state = apply(self._data["state"], msg["delta"])
                if digest(state) != msg["digest"]:   # not what the controller has: ask for all of it
                    state = None
            elif msg.get("unchanged") and "state" in self._data:
                state = self._data["state"]
            elif "full" in msg:
                state = msg["full"]
            if state is None:
                msg = c.get("/api/v1/agent/state").raise_for_status().json()
                state = msg["full"]
        if self._data.get("version") != msg["version"] or "state" not in self._data:
            self._data.update(version=msg["version"], digest=msg["digest"], state=state)
            self._write_cache()
        self.offline = False
        return DesiredState(to_mesh(state), str(msg["version"]))

    def load(self) -> DesiredState:
        """The controller's desired state, or the cached one when the controller is unreachable."""
        import httpx

        try:
            return self.fetch()
        except (httpx.TransportError, OSError) as e:
            if "state" not in self._data:
                raise StateError(f"the controller at {self.url} is unreachable ({e}) and there is no cached "
                                 f"desired state in {str(self.cache)!r}") from None
            if not self.offline:
                log.warning("controller %s unreachable (%s): using the cached desired state, version %s",
                            self.url, e, self._data["version"])
            self.offline = True
            return DesiredState(to_mesh(self._data["state"]), str(self._data["version"]))

    def version(self) -> str:
        return self.load().version

    def post_telemetry(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Send one telemetry batch (``{"metrics": [...], "bfd": [...], "events": [...], "flows": [...]}``)."""
        self.enrol()
        with self._client() as c:
            r = c.post("/api/v1/agent/telemetry", json={"site": self.site, **batch})
        if r.status_code != 200:
            raise PatronusError(f"the controller refused the telemetry: {r.status_code} {_detail(r)}")
        return dict(r.json())


def _detail(r: Any) -> str:
    try:
        return str(r.json().get("detail"))
    except ValueError:
        return r.text[:200]


def _no_state_file(path: Path) -> StateError:
    return StateError(f"no state file at {str(path)!r}: save the mesh there first "
                      f"(patronus.save_mesh(mesh, {str(path)!r}), "
                      f"or `patronus lab up --agents`), or point --state at the mesh's state file")


def _mesh_version(mesh: Mesh) -> str:
    """A digest of the mesh's content: equal meshes, equal versions."""
    text = json.dumps(mesh.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
                 interval_s: float = 1.0, bfd_ms: int = 50, source: StateSource | None = None,
                 wireguard: str = "userspace") -> None:
        """``state``: the SQLite state file (discovery registry, events,
        metrics; keys and the status file next to it). ``source``: where
        the desired mesh comes from (default: the mesh in ``state``).
        ``backend``: the data plane ("auto", "xdp", "userspace");
        ``wireguard``: the tunnels ("userspace" wireguard-go, "kernel", "auto")."""
        self.state = Path(state)
        self.site = site
        self.source: StateSource = source if source is not None else LocalStateFile(self.state)
        self.lan_if, self.token, self.backend, self.wireguard = lan_if, token, backend, wireguard
        self.prefix = prefix or f"{site[:6]}w"
        self.interval_s, self.bfd_ms = interval_s, bfd_ms
        self._stop = asyncio.Event()
        self.net: SiteRealiser | None = None
        self.version: str | None = None  # of the desired state in use
        self.sessions: dict[str, Any] = {}
        self.dp: Any = None
        self.engine: Any = None
        self.bfd_changes = 0  # BFD sessions that came Up or went Down, all paths
        self.path_downs: dict[str, int] = {}  # path id -> times its BFD session left Up
        # telemetry (flow table scans, SQLite writes, the status file) runs on
        # this thread, with its own store connection, off the event loop
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-io")
        self._io_store: Store | None = None
        self._next_prune = 0.0

    # -- keys and discovery -------------------------------------------------------

    def _key_base(self) -> Path:
        return self.state.with_name(f"{self.state.name}.{self.site}")

    @property
    def tunnels(self) -> dict[int, Tunnel]:
        """The site's tunnels by path index."""
        return self.net.tunnels if self.net is not None else {}

    @property
    def adopted(self) -> list[str]:
        """Tunnel interfaces an earlier run left and this one took over."""
        return self.net.adopted if self.net is not None else []

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
            if registry.is_enrolled(self.site, public):
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
        writing anything: the desired state loads, the site is one of its
        mesh, and it is enrolled or has a valid token."""
        if not self.state.exists():  # the registry lives there, whatever the source of the mesh
            raise _no_state_file(self.state)
        mesh = self.source.load().mesh
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
        """Publish the site's signed announcement (key, subnets, uplinks)."""
        assert self.net is not None
        self.net.announce(self.mesh, self.registry, self.signer)

    # -- tunnels ------------------------------------------------------------------

    def _sync_tunnels(self) -> None:
        """Tunnels to every announced site; reconfigured when a peer's key or endpoint changed."""
        assert self.net is not None
        net, peers = self.net, SiteRealiser.peers(self.registry, exclude=self.site)
        net.sync(self.mesh, lambda t: net.config(self.mesh, t, peers[t.path.remote_site])
                 if t.path.remote_site in peers else None)

    # -- run ------------------------------------------------------------------------

    async def run(self) -> None:
        from . import dataplane
        from .failover import BfdSession, Engine

        desired = self.source.load()
        self.mesh, self.version = desired.mesh, desired.version
        self.store = Store(self.state)
        self.registry = SqliteRegistry(self.state)
        try:
            self._keys()
            self.net = SiteRealiser(self.site, self.key, prefix=self.prefix, wireguard=self.wireguard,
                                    route_paths=True)
            self.announce()
            self._sync_tunnels()
            table = self.mesh.policy_table()
            self.dp = dataplane.open(table, backend=self.backend, flow_capacity=1 << 18)
            if self.lan_if:  # XDP + tc, or nftables marks: what the backend offers
                self.dp.steer(self.lan_if, mark_base=PATH_MARK)
            limited = [p.name for p in self.mesh.policies if p.qos.rate_kbps]
            if limited and dataplane.QOS_RATE not in self.dp.capabilities:
                log.warning("the %s data plane does not enforce QoS.rate_kbps (policies %s); "
                            "run with --backend userspace for rate limits", type(self.dp).__name__,
                            ", ".join(limited))
            self.engine = Engine(self.mesh, self.dp, local_site=self.site, store=self.store, tick_s=0.02)
            self.engine.on_event(self._log_event)
            log.info("site %s started: backend %s, LAN interface %s, %d tunnels, %d policies", self.site,
                     self.backend_name(), self.lan_if or "(none)", len(self.tunnels), len(self.mesh.policies))
            from .paths import Monitor, Responder

            self.responder = await Responder(("0.0.0.0", DEFAULT_PORT)).start()
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
                self.monitor.add(t.path.id, remote=(t.remote_v4, DEFAULT_PORT), local=(t.local_v4.split("/")[0], 0))

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
        last = self.status(stopped=True)  # with the tunnels it had
        if self.net is not None:
            self.net.close()
        self.registry.close()
        self.store.close()
        try:
            self.write_status(status=last)
        except Exception as e:  # the last status must not hide why the agent stops
            log.warning("status file %s: %s", self.status_path, e)
        log.info("site %s stopped", self.site)

    def stop(self) -> None:
        self._stop.set()

    # -- status and log ---------------------------------------------------------------

    def backend_name(self) -> str | None:
        """The data plane in use ("Xdp", "Userspace"), or None before it is open."""
        return None if self.dp is None else type(self.dp).__name__

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
                                "downs": self.path_downs.get(t.path.id, 0),
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
            if tr.old == State.UP:
                self.path_downs[path_id] = self.path_downs.get(path_id, 0) + 1
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
        source: StateSource | None = None
        controller = getattr(args, "controller", None)
        if controller:
            # the token is the controller's enrolment token; the credential and the
            # last desired state are kept next to --state
            source = ControllerSource(controller, f"{args.state}.{args.site}.controller.json", token=token,
                                      site=args.site)
            token = None
        agent = SiteAgent(args.state, args.site, lan_if=args.lan_if, token=token, backend=args.backend,
                          prefix=args.prefix, wireguard=getattr(args, "wireguard", "userspace"), source=source)
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
