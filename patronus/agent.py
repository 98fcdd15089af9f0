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
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .dataplane import PATH_MARK
from .errors import ConfigError, DataplaneUnavailable, PatronusError, StateError
from .failover.engine import DEFAULT_CLASS
from .mesh import Mesh
from .paths.monitor import DEFAULT_PORT
from .site import SiteRealiser
from .store import Store, flow_records
from .wireguard.discovery import AnnouncementRejected, SigningKey, SqliteRegistry
from .wireguard.keys import PrivateKey, read_secret_file, write_secret_file
from .wireguard.plan import Tunnel

__all__ = ["SiteAgent", "StateSource", "DesiredState", "LocalStateFile", "ControllerSource", "CertificatePinError",
           "parse_token", "diff", "apply", "digest", "digest_of", "manifest", "part_digest", "to_mesh", "TOKEN_PREFIX"]

AGENT_NICE = -10   # the agent's scheduling priority by default (SiteAgent nice=)
STALL_S = 0.1   # an event-loop wake-up this late is logged as a stall (two thirds of 50 ms x 3)
log = logging.getLogger("patronus.agent")

PRUNE_EVERY_S = 60.0  # how often the agent applies the state's retention policy
OUTBOX = 2000         # telemetry items of a kind held for the controller (its MAX_TELEMETRY_ITEMS per batch)
SCAN_REUSE_S = 1.0    # a telemetry batch reuses the status snapshot's flow-table scan this young
FLOW_RECORDS = 200    # flow records a telemetry batch carries: the largest of those active since the last one


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


def part_digest(value: Any) -> str:
    """SHA-256 (hex) of one value's canonical JSON: the digest of one key of a state."""
    return hashlib.sha256(canonical(value)).hexdigest()


def manifest(state: dict[str, Any]) -> dict[str, str]:
    """Key -> :func:`part_digest` of its value, for every top-level key of ``state``."""
    return {k: part_digest(v) for k, v in state.items()}


def digest_of(parts: dict[str, str]) -> str:
    """The state digest of a :func:`manifest`: SHA-256 (hex) of the canonical
    JSON of its ``[key, part digest]`` pairs in key order."""
    return hashlib.sha256(canonical(sorted(parts.items()))).hexdigest()


def digest(state: dict[str, Any]) -> str:
    """The digest of a desired state: SHA-256 over its keys and the SHA-256
    of each key's canonical JSON (``digest_of(manifest(state))``), so the
    controller computes each part's digest once for the sites that share it.
    Equal states (as JSON), equal digests.

    >>> digest({"a": 1, "b": [2]}) == digest({"b": [2], "a": 1}) != digest({"a": 1, "b": [3]})
    True
    """
    return digest_of(manifest(state))


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

        self.urls: list[str] = []
        for u in str(url).split(","):
            parts = urlsplit(u.strip())
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                parts = urlsplit("")
            if parts.scheme != "https" or not parts.hostname:
                raise ConfigError("--controller", url, "is not an https://host:port URL (several, for controller "
                                                       "replicas, separated by commas)")
            self.urls.append(u.strip().rstrip("/"))
        self._at = 0
        self._use(0)
        self.cache = Path(cache)
        self.token, self.site, self.interval_s, self.timeout = token, site, interval_s, timeout
        self.offline = False   # the last load() came from the cache
        # sent at enrolment: the agent's announcement key and WireGuard key (base64)
        self.signing_key: str | None = None
        self.wg_public_key: str | None = None
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

    # -- controller replicas ------------------------------------------------------------

    def _use(self, i: int) -> None:
        from urllib.parse import urlsplit

        self._at = i % len(self.urls)
        self.url = self.urls[self._at]
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "", parts.port or 443

    def next_controller(self) -> str:
        """Move to the next controller address (replicas share the store and
        the certificate: the pin holds for every one); the new URL."""
        if len(self.urls) > 1:
            self._use(self._at + 1)
            log.warning("controller: trying %s", self.url)
        return self.url

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        """One request to the current controller, moving on to the next when
        it cannot be reached (a connection refused or not made: the request
        surely went nowhere) or answers 503 (a replica that cannot reach its
        store), each address tried once; the last error or response otherwise.
        A request that may have arrived (a read timed out) is not sent twice."""
        import httpx

        last: Any = None
        for k in range(len(self.urls)):
            if k:
                self.next_controller()
            try:
                with self._client() as c:
                    r = c.request(method, path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:   # surely not delivered: the next one
                last = e
                continue
            if r.status_code == 503 and k + 1 < len(self.urls):
                last = r
                continue
            return r
        if isinstance(last, BaseException):
            raise last
        return last

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
        """Pin the controller's certificate and trade the token for a credential (once), with the
        first controller address that answers."""
        import httpx

        if self._data:
            return
        if not self.token:
            raise PatronusError(f"no controller credential in {str(self.cache)!r} and no enrolment token: give one "
                                "with --token-file PATH (make it with POST /api/v1/tokens)")
        for k in range(len(self.urls)):
            if k:
                self.next_controller()
            try:
                return self._enrol_once()
            except (httpx.TransportError, OSError):
                if k + 1 == len(self.urls):
                    raise

    def _enrol_once(self) -> None:
        import socket
        import ssl

        import httpx

        assert self.token is not None
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
        body: dict[str, Any] = {"interval_s": self.interval_s, "hostname": os.uname().nodename[:253]}
        if self.signing_key:
            body["signing_key"] = self.signing_key
        if self.wg_public_key:
            body["public_key"] = self.wg_public_key
        with httpx.Client(base_url=self.url, verify=self._ssl(), timeout=self.timeout) as c:
            r = c.post("/api/v1/agent/enrol", json=body, headers={"Authorization": f"Bearer {self.token}"})
        if r.status_code != 201:
            self._data = {}
            raise PatronusError(f"the controller refused the enrolment: {r.status_code} {_detail(r)}")
        self._data["credential"] = r.json()["credential"]
        self.site = site
        self._write_cache()

    def check(self) -> None:
        """What ``load`` would refuse at once, without a request: no credential and no usable token."""
        if self._data:
            return
        if not self.token:
            raise PatronusError(f"no controller credential in {str(self.cache)!r} and no enrolment token: give one "
                                "with --token-file PATH (make it with POST /api/v1/tokens)")
        parse_token(self.token)

    @property
    def enrolled(self) -> bool:
        return bool(self._data.get("credential"))

    @property
    def held_version(self) -> int | None:
        """The version of the desired state held (cached), or None."""
        v = self._data.get("version")
        return v if isinstance(v, int) else None

    def ws_url(self) -> str:
        """The agent channel's WebSocket URL."""
        return "wss://" + self.url.split("://", 1)[1] + "/api/v1/agent/ws"

    def ssl_context(self) -> Any:
        """TLS trusting exactly the pinned controller certificate."""
        return self._ssl()

    def credential(self) -> str:
        return str(self._data["credential"])

    def accept(self, msg: dict[str, Any]) -> DesiredState | None:
        """Take one message of the agent channel (``full``, ``delta`` or
        ``unchanged``, as GET /api/v1/agent/state and the WebSocket send it):
        the new desired state (cached), or None when nothing changed. A delta
        that does not give the controller's digest, or one for a version not
        held, is answered by fetching the full state."""
        if not isinstance(msg, dict) or not isinstance(msg.get("version"), int):
            raise PatronusError(f"the controller sent a message that is not a desired state: {str(msg)[:200]}")
        state = None
        if msg.get("unchanged") and "state" in self._data and self._data.get("version") == msg["version"]:
            return None
        if "delta" in msg and "state" in self._data and msg.get("since") == self._data.get("version"):
            state = apply(self._data["state"], msg["delta"])
            if digest(state) != msg.get("digest"):   # not what the controller has: ask for all of it
                state = None
        elif "full" in msg and isinstance(msg["full"], dict):
            state = msg["full"]
            if digest(state) != msg.get("digest"):
                raise PatronusError(f"the controller's desired state version {msg['version']} does not match "
                                    "its digest")
        if state is None:
            r = self._call("GET", "/api/v1/agent/state")
            if r.status_code != 200:
                raise PatronusError(f"the controller refused the desired state: {r.status_code} {_detail(r)}")
            msg = r.json()
            state = msg["full"]
        changed = self._data.get("version") != msg["version"] or "state" not in self._data
        if changed:
            self._data.update(version=msg["version"], digest=msg["digest"], state=state)
            self._write_cache()
        self.offline = False
        return DesiredState(to_mesh(state), str(msg["version"])) if changed else None

    def fetch(self) -> DesiredState:
        """The desired state from the controller (httpx.TransportError when it is unreachable)."""
        self.enrol()
        since = self._data.get("version")
        r = self._call("GET", "/api/v1/agent/state", params={} if since is None else {"since": since})
        if r.status_code != 200:
            raise PatronusError(f"the controller refused the desired state: {r.status_code} {_detail(r)}")
        self.accept(r.json())
        self.offline = False
        return DesiredState(to_mesh(self._data["state"]), str(self._data["version"]))

    def peers(self) -> dict[str, str]:
        """Site -> WireGuard public key (base64) of every peer that announced
        itself, from the desired state held."""
        peers = (self._data.get("state") or {}).get("peers") or {}
        return {s: str(p["wg_public_key"]) for s, p in peers.items()
                if s != self.site and isinstance(p, dict) and isinstance(p.get("wg_public_key"), str)}

    def peer_subnets(self) -> dict[str, tuple[str, ...]]:
        """Site -> the subnets it announced (as the controller verified them),
        of every peer in the desired state held."""
        peers = (self._data.get("state") or {}).get("peers") or {}
        return {s: tuple(str(x) for x in p["subnets"]) for s, p in peers.items()
                if s != self.site and isinstance(p, dict) and isinstance(p.get("subnets"), list)}

    def publish(self, signed: Any) -> Any:
        """Send the site's signed announcement (``SigningKey.sign``) to the
        controller; AnnouncementRejected with the controller's reason."""
        from .wireguard.discovery import REJECT_REASONS, Announcement, AnnouncementRejected

        self.enrol()
        body = {"body": base64.b64encode(signed.body).decode(), "signature": base64.b64encode(signed.signature).decode(),
                "key": base64.b64encode(signed.key).decode()}
        r = self._call("POST", "/api/v1/agent/announce", json=body)
        if r.status_code != 200:
            try:
                reason = str(r.json().get("reason") or "malformed")
            except ValueError:
                reason = "malformed"
            raise AnnouncementRejected(reason if reason in REJECT_REASONS else "malformed",
                                       f"by the controller: {r.status_code} {_detail(r)}")
        return Announcement.from_bytes(signed.body)

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
        r = self._call("POST", "/api/v1/agent/telemetry", json={"site": self.site, **batch})
        if r.status_code in (413, 422):
            raise TelemetryRefused(f"the controller refused the telemetry: {r.status_code} {_detail(r)}")
        if r.status_code != 200:
            raise PatronusError(f"the controller refused the telemetry: {r.status_code} {_detail(r)}")
        return dict(r.json())


class TelemetryRefused(PatronusError):
    """The controller named a fault in a telemetry batch (413, 422): sending
    it again would be refused again."""


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
                 wireguard: str = "userspace", report_s: float = 2.0, metrics_listen: str | None = None,
                 metrics_token: str | None = None, nice: int = AGENT_NICE, ipfix: str | None = None,
                 flow_idle_s: float = 15.0, flow_active_s: float = 60.0, bgp: Any = None) -> None:
        """``state``: the SQLite state file (discovery registry, events,
        metrics; keys and the status file next to it). ``source``: where
        the desired mesh comes from (default: the mesh in ``state``); with a
        :class:`ControllerSource` the controller is also the discovery
        registry (nothing is shared through ``state``, which stays local),
        pushes every new desired state over its WebSocket (reconnecting with
        backoff, running on the last state meanwhile) and gets telemetry
        every ``report_s``. ``backend``: the data plane ("auto", "xdp",
        "userspace"); ``wireguard``: the tunnels ("userspace" wireguard-go,
        "kernel", "auto"). A new desired state (a pushed one, or a changed
        mesh in the state file) is applied while running (``apply_desired``).
        ``metrics_listen``: serve Prometheus metrics there
        (:mod:`patronus.agent_metrics`; off loopback, ``metrics_token`` is required).
        ``nice``: the scheduling priority the agent (and the wireguard-go it
        starts) runs at, -20..19 (default -10): BFD at 50 ms x 3 declares a
        path Down after 150 ms without packets, so the process that sends
        them must not wait behind bulk work on a busy machine. Without the
        privilege to raise it, the agent says so and runs at its own.
        ``ipfix``: export every flow the data plane counts to this IPFIX
        collector (HOST:PORT, :mod:`patronus.ipfix`): idle for
        ``flow_idle_s``, or every ``flow_active_s`` while it lives on
        (:class:`patronus.export.FlowMeter`). ``bgp``: a :class:`patronus.bgp.Bgp`:
        the edge peers with the site's LAN routers through ExaBGP, announces
        the prefixes they announce (filtered) as the site's subnets, and
        advertises every reachable remote site's subnets back to them
        (:mod:`patronus.bgp.edge`, docs/BGP.md)."""
        if isinstance(bfd_ms, bool) or not isinstance(bfd_ms, int) or not 10 <= bfd_ms <= 10_000:
            raise ConfigError("agent bfd_ms", bfd_ms, "is not an integer from 10 to 10,000 ms")
        if isinstance(nice, bool) or not isinstance(nice, int) or not -20 <= nice <= 19:
            raise ConfigError("agent nice", nice, "is not an integer from -20 to 19")
        self.nice = nice
        if ipfix is not None:
            from .ipfix import parse_collector

            parse_collector(ipfix)   # refused before anything starts
        self.ipfix, self.flow_idle_s, self.flow_active_s = ipfix, flow_idle_s, flow_active_s
        self.bgp = bgp
        self.edge: Any = None                  # the BGP edge (patronus.bgp.edge.BgpEdge), with ``bgp``
        self.desired: DesiredState | None = None   # the desired state in use; self.mesh is it with announced subnets
        self._apply_lock = asyncio.Lock()
        self._effective_cache: tuple[Any, Mesh, Mesh] | None = None   # (key, desired mesh, effective mesh)
        self._bgp_task: asyncio.Task[None] | None = None   # announcing and applying learned prefixes
        self._bgp_again = False
        self._ipfix: Any = None                # the exporter (one socket for the agent's life)
        self._ipfix_retry_at = 0.0             # when to try an unreachable collector again
        self.meter: Any = None                 # the FlowMeter of the data plane in use
        self._meter_lock = threading.Lock()    # polled on the I/O thread, replaced on the loop
        self._dp_lock = threading.Lock()       # the I/O thread's scans against the loop replacing the data plane
        self.state = Path(state)
        self.site = site
        self.source: StateSource = source if source is not None else LocalStateFile(self.state)
        self.controller: ControllerSource | None = source if isinstance(source, ControllerSource) else None
        self.report_s = report_s
        self.metrics_listen, self.metrics_token = metrics_listen, metrics_token
        self.metrics_server: Any = None
        self.applied_at: float | None = None   # wall time the desired state in use was applied
        self.connected = False                 # the controller's channel is open
        self._announced: tuple[Any, ...] | None = None
        self._outbox: dict[str, list[dict[str, Any]]] = {"bfd": [], "events": []}
        self.telemetry_dropped = 0             # items the outbox had no room for while the controller was away
        self._next_report = 0.0
        self._last_batch = 0.0                 # wall time of the last telemetry batch (its flows are newer)
        self._flow_scan: tuple[float, Any, Any, float] | None = None   # _scan(): (wall, flows, dp, monotonic)
        self.loop_stalls = 0                   # times the event loop woke >= STALL_S late (false Downs follow)
        self.loop_lag_max = 0.0                # the latest wake-up seen, seconds
        self._beat = time.monotonic()          # when the event loop last woke (the stall catcher reads it)
        self._catcher_stop = threading.Event()  # set when run() ends, however it ends
        self.dedup: Any = None                 # the far end of duplication, on this site's tunnels
        self._dedup_building: asyncio.Future[Any] | None = None   # its program compiling off the loop
        self._dedup_again = False   # a sync asked for while that ran: done after it
        self._dedup_loaded: Any = None   # the program compiled at start, not attached (``_preload_dedup``)
        self._dup_warned: set[str] = set()
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
        # program compiles and tc attaches (a second of CPU, a subprocess per command), off the loop. At the
        # loop's own priority: a build thread at nice 10 held the GIL while the scheduler left it waiting
        # behind wireguard-go's crypto, and the loop waited for the GIL 100+ ms (priority inversion)
        self._bg = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-build")
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
        mesh, and it is enrolled or has a valid token (with a controller:
        enrolled, or a well-formed token; the controller is asked by ``run``),
        and the metrics address is usable."""
        if self.metrics_listen is not None:
            from .agent_metrics import check_listen

            check_listen(self.metrics_listen, self.metrics_token)
        if self.controller is not None:
            self.controller.check()
            return
        if not self.state.exists():  # the registry lives there, whatever the source of the mesh
            raise _no_state_file(self.state)
        mesh = self.source.load().mesh
        if self.bgp is not None and self.site in [x.name for x in mesh.sites]:
            self.bgp.check_site(mesh.site(self.site).subnets)
        registry = SqliteRegistry(self.state, create=False)
        try:
            self._check_enrolment(mesh, registry)
        finally:
            registry.close()

    def _keys(self) -> None:
        enroll = self.controller is None and self._check_enrolment(self.mesh, self.registry)  # refuses first
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
        try:
            self.net.announce(self.mesh, self.registry, self.signer,
                              subnets=self.edge.learned() if self.edge is not None else None)
        except AnnouncementRejected as e:
            if self.edge is None:
                raise
            # what the routers taught us is refused (the mesh changed under it): the last accepted one stands
            log.warning("announcement of the learned prefixes refused: %s", e, extra={"reason": "announce_refused"})
            self._announced = None
            return
        self._announced = self._announcing()

    def _own_subnets(self) -> tuple[str, ...]:
        """What this site announces: its subnets in the desired mesh, or with
        BGP what its routers announce (accepted) and ``Bgp.networks``."""
        if self.edge is not None:
            return self.edge.learned()
        mesh = self.desired.mesh if self.desired is not None else self.mesh
        return tuple(mesh.site(self.site).subnets)

    def _announcing(self) -> tuple[Any, ...]:
        site = (self.desired.mesh if self.desired is not None else self.mesh).site(self.site)
        return (self._own_subnets(), tuple((u.name, u.address, u.port) for u in site.uplinks))

    def _announced_subnets(self) -> dict[str, tuple[str, ...]]:
        """The subnets of every site that announces what its routers learned
        (BGP: the registry's signed announcements marked ``learned``, checked
        there against the mesh). Other sites are routed by their subnets in
        the mesh, whatever they announced."""
        if self.controller is not None:
            return self.controller.peer_subnets()
        try:
            return {st.site: tuple(st.announcement.subnets) for st in self.registry.sites() if st.announcement.learned}
        except Exception as e:   # an unreadable registry: the desired mesh's subnets meanwhile
            log.warning("registry unreadable: %s", e)
            return {}

    def _effective(self, mesh: Mesh) -> Mesh:
        """The desired mesh with each BGP site's subnets as it announces them
        (its learned prefixes), where they lie inside its subnets in the
        mesh. Without BGP in the mesh this is the desired mesh itself."""
        ann = self._announced_subnets()
        if self.edge is not None:
            ann[self.site] = self._own_subnets()
        key = (id(mesh), tuple(sorted(ann.items())))
        if self._effective_cache is not None and self._effective_cache[0] == key and \
                self._effective_cache[1] is mesh:   # every second, from the loop: the answer of last time
            return self._effective_cache[2]
        out = self._effective_of(mesh, ann)
        self._effective_cache = (key, mesh, out)
        return out

    @staticmethod
    def _effective_of(mesh: Mesh, ann: dict[str, tuple[str, ...]]) -> Mesh:
        d = mesh.to_dict()
        changed = False
        for site in d["sites"]:
            got = ann.get(site["name"])
            if got is None:
                continue
            mine = [ipaddress.ip_network(x) for x in site["subnets"]]
            cands = []
            for x in got:   # inside its space
                try:
                    n = ipaddress.ip_network(x)
                except (ValueError, TypeError):
                    continue
                if any(n.version == m.version and n.subnet_of(m) for m in mine):  # type: ignore[arg-type]
                    cands.append(n)
            # neither repeated nor covered by a shorter one (a Site refuses overlapping subnets)
            inside = [str(n) for i, n in enumerate(cands)
                      if n not in cands[:i] and not any(o.version == n.version and o != n and n.subnet_of(o)
                                                        for o in cands)]  # type: ignore[arg-type]
            if tuple(inside) != tuple(site["subnets"]):
                site["subnets"] = inside
                changed = True
        if not changed:
            return mesh
        try:
            return Mesh.from_dict(d)
        except PatronusError as e:   # announcements the mesh cannot hold: route by the mesh's subnets
            log.warning("announced subnets not usable (%s): routing by the mesh's subnets", e)
            return mesh

    def _peer_keys(self) -> dict[str, Any]:
        """The WireGuard key of every other site: from the controller's desired
        state, or the discovery registry in the state file."""
        from .wireguard.keys import PublicKey

        if self.controller is not None:
            return {s: PublicKey.from_text(k) for s, k in self.controller.peers().items()}
        return SiteRealiser.peers(self.registry, exclude=self.site)

    # -- tunnels ------------------------------------------------------------------

    def _sync_tunnels(self) -> None:
        """Tunnels to every announced site; reconfigured when a peer's key or endpoint changed."""
        assert self.net is not None
        net, peers = self.net, self._peer_keys()
        net.sync(self.mesh, lambda t: net.config(self.mesh, t, peers[t.path.remote_site])
                 if t.path.remote_site in peers else None)
        if self.dp is not None:   # after start: the de-duplication follows the tunnels and the policies
            self._sync_dedup()

    def _tunnel_of(self, path_id: str) -> str | None:
        """The tunnel interface of one of this site's paths (None: no tunnel yet)."""
        for t in self.tunnels.values():
            if t.path.id == path_id:
                return t.ifname
        return None

    def _sync_dedup(self) -> None:
        """Duplication in the mesh: the far-end half runs on every tunnel of
        this site (bpf/patronus_dedup.c), whatever this site itself sends.
        A data plane that cannot copy packets is said so, once per policy."""
        from .dataplane import DUPLICATE

        dup = [p.name for p in self.mesh.policies if p.qos.duplicate]
        if not dup:
            if self.dedup is not None:   # detached on the build thread (tc commands), kept loaded for the next
                gone, self.dedup = self.dedup, None

                def detach() -> None:
                    self._dedup_follow(gone, set())
                    self._dedup_loaded = gone

                self._dedup_job(detach)
            return
        if DUPLICATE not in getattr(self.dp, "capabilities", ()):
            for name in dup:
                if name not in self._dup_warned:
                    self._dup_warned.add(name)
                    log.warning("policy %s asks for duplication (QoS.duplicate), which needs the XDP data plane "
                                "(--backend xdp): on %s its packets take one path", name, self.backend_name())
            return
        if self.dedup is None:
            self._build_dedup()
            return
        ifnames = {t.ifname for t in self.tunnels.values()}
        if ifnames != set(self.dedup.ifnames):
            self._dedup_job(self._dedup_follow, self.dedup, ifnames)

    def _dedup_job(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` on the build thread (tc runs a subprocess per
        command: 16 of them for 8 tunnels held the loop 130 ms, and every
        BFD session of the site expired); one job at a time, and the state
        is synced again after it (the tunnels or the policies may have
        changed meanwhile)."""
        if self._dedup_building is not None:
            self._dedup_again = True
            return
        fut = asyncio.get_running_loop().run_in_executor(self._bg, fn, *args)
        self._dedup_building = fut

        def done(f: asyncio.Future[Any]) -> None:
            self._dedup_building = None
            if not f.cancelled() and (e := f.exception()) is not None:
                log.warning("de-duplication on the tunnels: %s", e)
            if self._dedup_again and not self._stop.is_set() and self.dp is not None:
                self._dedup_again = False
                self._sync_dedup()

        fut.add_done_callback(done)

    @staticmethod
    def _dedup_follow(dedup: Any, ifnames: set[str]) -> None:
        """Attach ``dedup`` to ``ifnames`` and detach it from the rest (build thread)."""
        problems = []
        for ifname in sorted(ifnames - set(dedup.ifnames)):
            try:
                dedup.add(ifname)
            except PatronusError as e:   # an interface not there yet: the next sync adds it
                problems.append(str(e))
        for ifname in set(dedup.ifnames) - ifnames:
            dedup.remove(ifname)
        if problems:
            raise DataplaneUnavailable("; ".join(problems), "the next sync tries again")

    def _set_priority(self) -> None:
        """Run at ``self.nice`` (before any thread or child starts: they inherit it)."""
        try:   # Linux keeps a priority per thread: every thread of the process, then what they start
            for tid in os.listdir("/proc/self/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, int(tid), self.nice)
        except OSError as e:
            log.warning("cannot run at nice %d (%s): BFD may be starved on a busy machine (fix: run as root or "
                        "with CAP_SYS_NICE, or --nice 0 to keep the default)", self.nice, e.strerror)

    async def _watch_loop(self) -> None:
        """Time how late the event loop wakes a 20 ms sleep. A loop held for
        the detection time of a BFD session (150 ms at 50 ms x 3) stops its
        packets and every peer declares it Down: each stall of ``STALL_S`` or
        more is counted and logged (at most once a second), so a false Down
        is explained by the agent's own log."""
        loop = asyncio.get_running_loop()
        logged = 0.0
        self._beat = time.monotonic()
        catcher = threading.Thread(target=self._catch_stalls, args=(threading.get_ident(),), daemon=True,
                                   name="stall-catcher")
        catcher.start()
        while True:
            t = loop.time()
            await asyncio.sleep(0.02)
            self._beat = time.monotonic()
            late = loop.time() - t - 0.02
            self.loop_lag_max = max(self.loop_lag_max, late)
            if late >= STALL_S:
                self.loop_stalls += 1
                if loop.time() - logged >= 1.0:
                    logged = loop.time()
                    log.warning("event loop stalled %.0f ms (%d stalls so far): BFD sessions may have been "
                                "declared Down by their peers", late * 1e3, self.loop_stalls)

    def _catch_stalls(self, loop_thread: int) -> None:
        """A thread that looks where the event loop is while it is held: when
        the loop has not woken for ``STALL_S``, the stacks of the loop's thread
        and of every other busy thread go to the log (once a stall, at most
        every 5 s), so a stall names its cause."""
        import traceback

        reported, last = False, 0.0
        while not self._stop.is_set() and not self._catcher_stop.is_set():
            time.sleep(0.025)
            held = time.monotonic() - self._beat
            if held < STALL_S:
                reported = False
                continue
            if reported or time.monotonic() - last < 5.0:
                continue
            reported, last = True, time.monotonic()
            frames = sys._current_frames()
            names = {t.ident: t.name for t in threading.enumerate()}
            parts = []
            for ident, frame in frames.items():
                if ident == threading.get_ident():
                    continue
                stack = "".join(traceback.format_stack(frame, limit=4 if ident != loop_thread else 8))
                parts.append(f"-- {'event loop' if ident == loop_thread else names.get(ident, ident)}:\n{stack}")
            log.warning("event loop held for %.0f ms so far; where the threads are:\n%s", held * 1e3,
                        "".join(parts).rstrip())

    def _preload_dedup(self) -> None:
        """Compile the de-duplication program now, at start, before any BFD
        session runs, when the data plane can duplicate: a duplicating
        policy added later then only attaches it. Compiled when the policy
        came, three sites compiling at once on two cores starved their
        loops (364 ms) and every path flapped and was damped (the demo in
        CI). Costs about a second of the start and the program's map
        (``ENTRIES`` digests, about 8 MiB of kernel memory)."""
        from .dataplane import DUPLICATE

        if DUPLICATE not in getattr(self.dp, "capabilities", ()) or self._dedup_loaded is not None:
            return
        from .dataplane.dedup import Dedup

        try:
            self._dedup_loaded = Dedup()
        except PatronusError as e:   # said again, by name, when a policy asks for duplication
            log.info("de-duplication program not preloaded: %s", e)

    def _build_dedup(self) -> None:
        """Compile the de-duplication program and attach it to the tunnels
        on the build thread (BCC takes about a second of CPU; the loop keeps
        BFD going meanwhile), then sync again. This site sends no copies
        until it is attached (``_copies_via``): every site takes a
        duplicating policy at the same time, so its own far-end half being
        ready is the sign."""
        if self._dedup_building is not None:
            self._dedup_again = True
            return
        from .dataplane.dedup import Dedup

        ifnames = {t.ifname for t in self.tunnels.values()}
        loaded, self._dedup_loaded = self._dedup_loaded, None   # compiled at start: only attached here

        def build() -> Any:
            d = loaded if loaded is not None else Dedup()
            try:
                self._dedup_follow(d, ifnames)
            except DataplaneUnavailable as e:   # attached where it could: the next sync adds the rest
                log.warning("de-duplication on the tunnels: %s", e)
            except BaseException:
                d.close()
                raise
            return d

        fut = asyncio.get_running_loop().run_in_executor(self._bg, build)
        self._dedup_building = fut

        def built(f: asyncio.Future[Any]) -> None:
            self._dedup_building = None
            if f.cancelled():
                return
            if (e := f.exception()) is not None:
                log.warning("de-duplication program: %s; this site sends no copies", e)
                return
            self.dedup = f.result()
            if self._stop.is_set() or self.dp is None:
                self.dedup.close()
                self.dedup = None
                return
            log.info("de-duplication program ready (%s ms window, %d entries, on %d tunnels)",
                     f"{self.dedup.window_ms:g}", self.dedup.entries, len(self.dedup.ifnames))
            self._dedup_again = False
            self._sync_dedup()

        fut.add_done_callback(built)

    def _copies_via(self, path_id: str) -> str | None:
        """Where the engine sends a duplicating pair's copies: the tunnel of
        ``path_id``, once this site's own de-duplication is attached."""
        if self.dedup is None:
            return None
        return self._tunnel_of(path_id)

    # -- run ------------------------------------------------------------------------

    async def run(self) -> None:
        from .failover import BfdSession, Engine

        loop = asyncio.get_running_loop()
        self._set_priority()
        self.store = Store(self.state)
        try:
            if self.controller is not None:
                # keys first: the enrolment sends their public halves; the
                # controller is the registry, the state file stays local
                self._keys()
                self.controller.signing_key = base64.b64encode(self.signer.public_bytes).decode()
                self.controller.wg_public_key = self.key.public_key().base64
                desired = await loop.run_in_executor(self._io, self.source.load)
                self.registry = self.controller
            else:
                desired = self.source.load()
            self.mesh, self.version, self.desired = desired.mesh, desired.version, desired
            if self.site not in [x.name for x in self.mesh.sites]:
                raise ConfigError("agent --site", self.site, "is not a site of the desired mesh")
            if self.controller is None:
                self.registry = SqliteRegistry(self.state)
                self._keys()
            self.net = SiteRealiser(self.site, self.key, prefix=self.prefix, wireguard=self.wireguard,
                                    route_paths=True)
            if self.bgp is not None:
                await self._start_bgp()
            self.mesh = self._effective(desired.mesh)
            await self._announce()
            self._sync_tunnels()
            self.dp = self._open_dataplane(self.mesh)
            self._start_meter()
            self.engine = Engine(self.mesh, self.dp, local_site=self.site, store=self.store, tick_s=0.02)
            self.engine.on_event(self._log_event)
            self.engine.duplicate_via = self._copies_via
            self._preload_dedup()
            self._sync_dedup()
            self.applied_at = time.time()
            log.info("site %s started: backend %s, LAN interface %s, %d tunnels, %d policies, desired state %s",
                     self.site, self.backend_name(), self.lan_if or "(none)", len(self.tunnels),
                     len(self.mesh.policies), self.version)
            from .paths import Monitor, Responder

            self.responder = await Responder(("0.0.0.0", DEFAULT_PORT)).start()
            self.monitor = await Monitor(interval_ms=100, window=50).start()
            self.engine.watch_monitor(self.monitor)
            await self._watch_new_tunnels(BfdSession)
            engine_task = asyncio.create_task(self.engine.run())
            engine_task.add_done_callback(self._engine_done)
            self._engine_task = engine_task
            if self.metrics_listen is not None:
                from .agent_metrics import serve

                self.metrics_server = serve(self, self.metrics_listen, self.metrics_token)
                log.info("metrics on http://%s:%d/metrics", *self.metrics_server.address)
            follow = asyncio.create_task(self._follow()) if self.controller is not None else None
            watchdog = asyncio.create_task(self._watch_loop())
            next_announce, last_snap = 0.0, 0.0
            while not self._stop.is_set():
                now = time.time()
                if self.controller is None:
                    if now >= next_announce:   # the registry's liveness: announce every 5 s
                        self.announce()
                        next_announce = now + 5
                    await self._poll_local()
                elif self._announced is None or now >= next_announce:   # once, and again after a failure
                    await self._announce()
                    next_announce = now + 300
                self._sync_tunnels()  # sites that joined since: new tunnels, BFD on them
                await self._watch_new_tunnels(BfdSession)
                await self._refresh_effective()   # a site announced other subnets (BGP): routes follow
                self._bgp_advertise()
                # flows, metrics and status off the event loop: a scan of the
                # flow table and SQLite writes must not hold up BFD (at 50 ms
                # x 3, a 150 ms stall is a false Down at every peer)
                ms = self.monitor.all_metrics()
                names = [p.name for p in self.mesh.policies]
                await loop.run_in_executor(self._io, self._telemetry, now, last_snap, names, ms, self.status())
                last_snap = now
                try:
                    await asyncio.wait_for(self._stop.wait(), self.interval_s)
                except asyncio.TimeoutError:
                    pass
            for task in (follow, watchdog):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self.engine.stop()
            await engine_task
        finally:
            self._catcher_stop.set()
            await self._teardown()

    def _start_meter(self) -> None:
        """Flow export for the data plane in use (with ``ipfix``)."""
        if self.ipfix is None or self.dp is None:
            return
        from .export import FlowMeter
        from .ipfix import IpfixExporter

        if self._ipfix is None:   # both backends give flow times as Unix time
            try:
                self._ipfix = IpfixExporter(self.ipfix, clock_offset_ns=0)
            except OSError as e:   # no route or name yet: forwarding goes on, telemetry tries again
                log.warning("IPFIX collector %s: %s; flows are kept in the data plane until it can be reached",
                            self.ipfix, e)
                return
        with self._meter_lock:
            self.meter = FlowMeter(self.dp, [self._ipfix.export], idle_timeout_s=self.flow_idle_s,
                                   active_timeout_s=self.flow_active_s)
        log.info("flows exported by IPFIX to %s (idle %g s, active %g s)", self.ipfix, self.flow_idle_s,
                 self.flow_active_s)

    def _stop_meter(self) -> None:
        with self._meter_lock:
            if self.meter is not None:
                try:
                    self.meter.close()
                except Exception as e:   # the data plane half closed: say so, do not stop the shutdown
                    log.warning("flow export at close: %s", e)
                self.meter = None

    def _open_dataplane(self, mesh: Mesh) -> Any:
        dp = self._build_dataplane(mesh)
        self._attach_dataplane(dp, mesh)
        return dp

    def _build_dataplane(self, mesh: Mesh) -> Any:
        """The data plane of ``mesh``'s policies, loaded, not yet steering (any thread)."""
        from . import dataplane

        dp = dataplane.open(mesh.policy_table(), backend=self.backend, flow_capacity=1 << 18)
        prepare = getattr(dp, "prepare_steering", None)   # XDP: the tc program's compile, here too
        if self.lan_if and prepare is not None:
            try:
                prepare(PATH_MARK)
            except BaseException:
                dp.close()
                raise
        return dp

    def _attach_dataplane(self, dp: Any, mesh: Mesh) -> None:
        """Steer the LAN's traffic through ``dp`` (XDP + tc, or nftables marks: what the backend offers)."""
        from . import dataplane

        if self.lan_if:
            dp.steer(self.lan_if, mark_base=PATH_MARK)
        limited = [p.name for p in mesh.policies if p.qos.rate_kbps]
        if limited and dataplane.QOS_RATE not in dp.capabilities:
            log.warning("the %s data plane does not enforce QoS.rate_kbps (policies %s); "
                        "run with --backend userspace for rate limits", type(dp).__name__, ", ".join(limited))

    def _flows_of(self, dp: Any) -> Any:
        """The flows of a data plane about to go (on the I/O thread: a full scan); None when unreadable."""
        with self._dp_lock:
            try:
                return dp.flows()
            except Exception as e:
                log.warning("flows of the old data plane not read: %s", e)
                return None

    async def _announce(self) -> None:
        """Announce (to the controller off the event loop: it is a request); a
        failure is logged and retried by the loop."""
        if self.controller is None:
            self.announce()
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, self.announce)
        except Exception as e:  # the controller away or refusing: forwarding goes on, the loop retries
            self._announced = None
            log.warning("announcement to the controller failed: %s", e)

    async def _poll_local(self) -> None:
        """The state file's mesh changed: apply it."""
        try:
            desired = self.source.load()
        except PatronusError as e:
            log.warning("desired state unreadable, keeping version %s: %s", self.version, e)
            return
        if desired.version != self.version:
            await self.apply_desired(desired)

    async def apply_desired(self, desired: DesiredState) -> None:
        """Run on a new desired state: tunnels to new peers (and new
        configuration of the others), the new policy table in the data plane
        (swapped in place; re-opened when the number of policies changed, the
        flows drained to the store first), the failover engine reconfigured
        (path health kept, every pair on its best path under the new
        policies). A state without this site is refused and the old one kept."""
        from .tracing import span

        async with self._apply_lock:   # the loop, a push and BGP may each ask at once
            with span("agent.apply", site=self.site, version=desired.version, previous=self.version):
                await self._apply_desired(desired)

    async def _apply_desired(self, desired: DesiredState) -> None:
        from .failover import BfdSession

        if self.site not in [x.name for x in desired.mesh.sites]:
            log.error("desired state %s has no site %r: keeping version %s", desired.version, self.site, self.version)
            return
        mesh = self._effective(desired.mesh)
        old, old_desired = self.mesh, self.desired
        self.mesh, self.desired = mesh, desired
        try:
            assert self.net is not None
            plan = {t.path.index: t.path.id for t in self.net.plan(mesh)}
            stale = [i for i, t in self.tunnels.items() if plan.get(i) != t.path.id]
            stale_ids = {self.tunnels[i].path.id for i in stale}
            if stale:   # a site left (or the paths were re-indexed): those tunnels go
                self.net.remove(stale)
            self._sync_tunnels()
            table = mesh.policy_table()
            if len(mesh.policies) == len(old.policies):
                self.engine.reconfigure(mesh, table)
            else:
                names = [p.name for p in old.policies]
                # the old table's flows go out before it does, on the I/O thread (after what is queued there)
                loop = asyncio.get_running_loop()
                # make before break: the new data plane is built first, the old one forwarding meanwhile; a
                # build that fails leaves the old one in place, its flow export going on. Built on the loop's
                # thread: built on the build thread while the loop ran (to spare BFD the compile's 1-1.8 s),
                # the XDP backend's voice policy stopped forwarding after the swap in 3 runs of 4
                # (tests/test_mesh_forwarding.py), with the route map and the engine's routes right: not
                # understood yet (docs/PERFORMANCE.md, "Caveats")
                fresh = self._build_dataplane(mesh)
                old_dp = self.dp
                try:
                    await loop.run_in_executor(self._io, self._stop_meter)
                    flows = await loop.run_in_executor(self._io, self._flows_of, old_dp)
                    with contextlib.suppress(Exception):
                        self.store.add_flow_snapshot(time.time(), self.site, flows, names)
                    # the swap, and every pair's path written into the new tables, with no await between
                    # (the XDP backend's paths need its program attached: its redirect ports)
                    with self._dp_lock:   # no scan of the I/O thread runs on a data plane being closed
                        old_dp.close()
                        self.dp = fresh
                        self._attach_dataplane(fresh, mesh)
                    self.engine.reconfigure(mesh, dataplane=fresh)
                except BaseException:
                    if self.dp is not fresh:   # not swapped: the new one goes, the old one keeps steering
                        with contextlib.suppress(Exception):
                            fresh.close()
                    self._start_meter()
                    raise
                self._start_meter()
            self.net.route_subnets(mesh)   # the path tables follow the sites' (announced) subnets
        except Exception:
            self.mesh, self.desired = old, old_desired
            raise
        self._bgp_space()
        gone = [pid for pid in self.sessions if pid not in self.engine.paths or pid in stale_ids]
        for pid in gone:   # paths the new mesh has not: their BFD and probes stop
            await self.sessions.pop(pid).stop()
            with contextlib.suppress(Exception):
                self.monitor.remove(pid)
        if getattr(self, "monitor", None) is not None:
            await self._watch_new_tunnels(BfdSession)
        self.version, self.applied_at = desired.version, time.time()
        if self._announced != self._announcing():
            await self._announce()
        self._bgp_advertise()
        log.info("desired state %s applied: %d policies, %d tunnels", self.version, len(mesh.policies),
                 len(self.tunnels))

    # -- BGP on the LAN side ------------------------------------------------------------

    def _lan_addresses(self) -> list[str]:
        """The LAN interface's addresses (``ip -j addr``)."""
        if not self.lan_if:
            return []
        assert self.net is not None
        r = self.net.ip("-j", "addr", "show", "dev", self.lan_if, check=False)
        try:
            return [a["local"] for link in json.loads(r.stdout or "[]") for a in link.get("addr_info", [])]
        except (ValueError, KeyError, TypeError):
            return []

    async def _start_bgp(self) -> None:
        """The BGP edge: ExaBGP peering with every neighbor from the LAN
        address in the neighbor's subnet (or its ``local_address``)."""
        from .bgp.edge import BgpEdge

        bgp = self.bgp
        assert bgp is not None and self.desired is not None and self.net is not None
        bgp.check_site(self.desired.mesh.site(self.site).subnets)
        addrs = self._lan_addresses()
        local: dict[str, str] = {}
        for n in bgp.neighbors:
            if n.local_address is not None:
                local[n.address] = n.local_address
                continue
            nb = ipaddress.ip_address(n.address)
            r = self.net.ip("-j", "route", "get", n.address, check=False)
            try:
                src = json.loads(r.stdout or "[]")[0].get("prefsrc")
            except (ValueError, IndexError, AttributeError):
                src = None
            src = src or next((a for a in addrs if ipaddress.ip_address(a).version == nb.version), None)
            if src is None:
                raise ConfigError("Bgp.neighbors", n.address, f"has no local address to peer from (give "
                                  f"local_address, or an address on {self.lan_if or 'the LAN interface'})")
            local[n.address] = src
        router_id = bgp.router_id or next((a for a in local.values() if ipaddress.ip_address(a).version == 4),
                                          None)
        if router_id is None:
            raise ConfigError("Bgp.router_id", None, "is needed when no neighbor is reached over IPv4")
        net = self.net
        for fam in ("-4", "-6"):   # learned routes an earlier run left (a crash): the routers tell us again
            net.ip(fam, "route", "flush", "proto", "bgp", check=False)
        self.edge = BgpEdge(bgp, workdir=Path(f"{self._key_base()}.bgp"), local=local, router_id=router_id,
                            lan_if=self.lan_if, route=net.ip_batch_routes,
                            on_learned=self._bgp_changed)
        self._bgp_space()
        await self.edge.start()

    def _bgp_space(self) -> None:
        """The edge's filter follows the desired mesh: this site's subnets
        (where learned prefixes must lie) and every other site's."""
        if self.edge is None or self.desired is None:
            return
        m = self.desired.mesh
        self.edge.set_space(m.site(self.site).subnets, {x.name: x.subnets for x in m.sites if x.name != self.site})

    def _bgp_changed(self) -> None:
        """The accepted prefixes changed: announce them, and take them into
        this site's own data plane. One task at a time: changes that come
        while it runs are taken by one more round of it."""
        if self._bgp_task is not None and not self._bgp_task.done():
            self._bgp_again = True
            return

        async def go() -> None:
            while True:
                self._bgp_again = False
                await self._announce()
                await self._refresh_effective()
                if not self._bgp_again:
                    return

        task = self._bgp_task = asyncio.get_running_loop().create_task(go())
        task.add_done_callback(lambda t: None if t.cancelled() or t.exception() is None else
                               log.warning("bgp: applying learned prefixes failed: %r", t.exception()))

    async def _refresh_effective(self) -> None:
        """Apply the desired state again when the subnets sites announce
        changed what the mesh holds (BGP sites learning or losing prefixes).
        The desired state is read under the apply lock: one pushed meanwhile
        is the one applied, never the one it replaced."""
        if self.desired is None or self.engine is None:
            return
        async with self._apply_lock:
            desired = self.desired
            eff = self._effective(desired.mesh)
            if [x.subnets for x in eff.sites] != [x.subnets for x in self.mesh.sites]:
                from .tracing import span

                with span("agent.apply", site=self.site, version=desired.version, previous=self.version):
                    await self._apply_desired(desired)

    def _bgp_advertise(self, now_up: dict[str, bool] | None = None) -> None:
        """Advertise to the routers the subnets of every remote site with a
        path whose BFD session is up (``now_up``: a transition being
        reported), each tagged with its site's community."""
        if self.edge is None:
            return
        from .bgp import community_of
        from .failover.bfd import State

        now_up = now_up or {}
        routes: dict[str, str] = {}
        for i, site in enumerate(self.mesh.sites, 1):
            if site.name == self.site:
                continue
            up = False
            for p in self.mesh.paths(self.site, site.name):
                sess = self.sessions.get(p.id)
                if now_up.get(p.id, sess is not None and sess.state == State.UP):
                    up = True
                    break
            if up:
                for n in site.subnets:
                    routes[n] = community_of(self.bgp, i)
        self.edge.advertise(routes)

    # -- the controller's channel --------------------------------------------------------

    async def _follow(self) -> None:
        """Hold the controller's WebSocket: every state it pushes is applied;
        when it drops, reconnect with exponential backoff (0.5 s doubling to
        30 s, with jitter), running on the last state meanwhile. Telemetry
        goes out every ``report_s`` from here too."""
        import random

        import websockets

        ctl = self.controller
        assert ctl is not None
        loop = asyncio.get_running_loop()
        backoff, tried = 0.5, 0
        reporter = asyncio.create_task(self._reporter())
        reporter.add_done_callback(lambda t: None if t.cancelled() or t.exception() is None else
                                   log.error("telemetry stopped: %r", t.exception()))
        try:
            while not self._stop.is_set():
                try:
                    async with websockets.connect(ctl.ws_url(), ssl=ctl.ssl_context(), open_timeout=10,
                                                  additional_headers={"Authorization": f"Bearer {ctl.credential()}"},
                                                  max_size=64 << 20) as ws:
                        await ws.send(json.dumps({"since": ctl.held_version}))
                        log.info("controller %s: channel open, holding desired state %s", ctl.url, self.version)
                        self.connected = True
                        async for raw in ws:
                            msg = json.loads(raw)
                            if isinstance(msg, dict) and "error" in msg:
                                raise PatronusError(f"the controller closed the channel: {msg.get('detail')}")
                            backoff, tried = 0.5, 0   # a state came: this controller works
                            desired = await loop.run_in_executor(self._io, ctl.accept, msg)
                            if desired is not None and desired.version != self.version:
                                await self.apply_desired(desired)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # unreachable, closed, refused: keep forwarding, try again
                    if self.connected or backoff == 0.5:
                        log.warning("controller %s: channel lost (%s: %s); running on desired state %s, "
                                    "reconnecting", ctl.url, type(e).__name__, e, self.version)
                self.connected = False
                # replicas: the next address at once, backing off only once every one has failed
                tried += 1
                if len(ctl.urls) > 1:
                    ctl.next_controller()
                    if tried < len(ctl.urls):   # the next replica soon (a jitter, not a spin)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), 0.05 + 0.2 * random.random())
                        continue
                tried = 0
                delay = backoff * (0.5 + random.random())
                backoff = min(backoff * 2, 30.0)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.connected = False
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

    async def _reporter(self) -> None:
        """A batch every ``report_s``, and at once (50 ms after, to take what
        came with it) when a failover event is queued: a move is news."""
        loop = asyncio.get_running_loop()
        self._urgent = asyncio.Event()
        while not self._stop.is_set():
            stop, urgent = asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._urgent.wait())
            done, pending = await asyncio.wait({stop, urgent}, timeout=self.report_s,
                                               return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            if urgent in done:
                await asyncio.sleep(0.05)
                self._urgent.clear()
            if self.dp is None or self.engine is None:
                continue
            # the outbox and the metrics on the loop (they change there); the flow table's scan (tens of
            # ms at a quarter of a million slots, more on a loaded machine) on the I/O thread
            batch = self._batch_head()
            try:
                batch.update(await loop.run_in_executor(self._io, self._batch_flows))
            except Exception:   # the BFD changes and failover events go anyway
                log.exception("telemetry: flows not read")
            try:
                await loop.run_in_executor(self._io, self._post, batch)
            except TelemetryRefused as e:
                # one bad item must not hold back the failover events: they go again alone
                log.warning("%s; sending its BFD changes and failover events alone", e)
                slim = {"bfd": batch["bfd"], "events": batch["events"]}
                try:
                    await loop.run_in_executor(self._io, self._post, slim)
                except Exception as e2:
                    self._requeue(slim)
                    log.warning("telemetry not sent: %s", e2)
            except Exception as e:
                self._requeue(batch)
                log.debug("telemetry not sent: %s", e)

    def _queue(self, kind: str, item: dict[str, Any]) -> None:
        self._outbox[kind].append(item)
        self._trim(kind)

    def _trim(self, kind: str) -> None:
        """The controller away for long: the oldest items go, counted."""
        box = self._outbox[kind]
        if len(box) > OUTBOX:
            self.telemetry_dropped += len(box) - OUTBOX
            del box[:len(box) - OUTBOX]

    def _requeue(self, batch: dict[str, Any]) -> None:
        for kind in ("bfd", "events"):
            self._outbox[kind][:0] = batch.get(kind, [])
            self._trim(kind)

    def _scan(self, max_age: float = 0.0) -> tuple[float, Any]:
        """(wall time just before the scan, flows) of the data plane in use,
        on the I/O thread: one scan of the flow table (a quarter of a million
        slots: tens of ms, and the Python around it holds the GIL) shared by
        the status snapshot and the telemetry batch when it is at most
        ``max_age`` seconds old."""
        cached = self._flow_scan
        if cached is not None and cached[2] is self.dp and time.monotonic() - cached[3] <= max_age:
            return cached[0], cached[1]
        with self._dp_lock:   # the loop may be replacing the data plane
            dp = self.dp
            t = time.time()
            fl = dp.flows()
        self._flow_scan = (t, fl, dp, time.monotonic())
        return t, fl

    def _batch_head(self) -> dict[str, Any]:
        """What changes on the event loop: the paths' latest metrics and the
        outbox (BFD changes and failover events), taken out of it."""
        now = time.time()

        def num(x: Any) -> float | None:
            return None if x is None or not np.isfinite(x) else float(x)

        metrics = []
        for pid, m in self.monitor.all_metrics().items():
            if m.samples:
                metrics.append({"ts": now, "path": pid, "rtt_ms": num(m.rtt_ms), "jitter_ms": num(m.jitter_ms),
                                "loss_pct": num(m.loss_pct), "mos": num(m.mos)})
        head = {"metrics": metrics[:OUTBOX], "bfd": self._outbox["bfd"][:OUTBOX],
                "events": self._outbox["events"][:OUTBOX], "flows": [], "records": [], "records_omitted": 0}
        if self.edge is not None:   # the controller's GET /agents/{site}/bgp
            b = self.edge.status()
            head["bgp"] = {"sessions": b["sessions"], "received": b["received"], "accepted": b["accepted"][:1_000],
                           "accepted_count": len(b["accepted"]), "refused": b["refused"],
                           "refused_now": dict(list(b["refused_now"].items())[:1_000]),
                           "advertised": b["advertised"][:1_000], "advertised_count": len(b["advertised"]),
                           "looped": b["looped"],
                           "speaker": {k: b["speaker"][k] for k in ("alive", "exits", "restarts")}}
        self._outbox = {"bfd": self._outbox["bfd"][OUTBOX:], "events": self._outbox["events"][OUTBOX:]}
        return head

    def _batch_flows(self) -> dict[str, Any]:
        """Per-policy flow totals and the busiest flows since the last batch,
        from one scan of the flow table (run off the loop)."""
        now = time.time()
        flows = []
        scanned, fl = self._scan(max_age=SCAN_REUSE_S)   # the status snapshot's scan, when recent
        names = [p.name for p in self.mesh.policies]
        if len(fl):
            pol = fl["policy"].astype(np.int64)
            for i in np.unique(pol):
                sel = fl[pol == i]
                flows.append({"ts": now, "policy": names[i] if 0 <= i < len(names) else None, "flows": int(len(sel)),
                              "packets": int(sel["packets"].sum()), "bytes": int(sel["bytes"].sum())})
        # the flows that saw packets since the last batch (10 ms of slack for the kernel's coarse clock),
        # the largest first, their paths by id (the controller checks they are this site's)
        active = fl[fl["last_ns"] >= np.uint64(max(0, int(self._last_batch * 1e9) - 10_000_000))] if len(fl) else fl
        self._last_batch = scanned   # what came after the scan is the next batch's
        top = active[np.argsort(active["bytes"], kind="stable")[::-1][:FLOW_RECORDS]] if len(active) else active
        path_ids = {i: t.path.id for i, t in list(self.tunnels.items())}   # (the loop may change the dict)
        records = []
        for r in flow_records(top, names):
            r["path"] = path_ids.get(r["path"]) if r["path"] is not None else None
            records.append({"ts": now, **r})
        return {"flows": flows[:OUTBOX], "records": records, "records_omitted": len(active) - len(records)}

    def _post(self, batch: dict[str, Any]) -> None:
        assert self.controller is not None
        self.controller.post_telemetry(batch)

    def _telemetry(self, now: float, last_snap: float, names: list[str], ms: dict[str, Any],
                   status: dict[str, Any]) -> None:
        """Flow snapshot, path metrics and the status file; runs on the agent's
        I/O thread with a store connection of its own."""
        if self._io_store is None:
            self._io_store = Store(self.state)
        if self.ipfix is not None and self._ipfix is None and now >= self._ipfix_retry_at:
            self._ipfix_retry_at = now + 30   # the collector was unreachable: try again, every 30 s
            self._start_meter()
        with self._meter_lock:
            if self.meter is not None:
                try:
                    self.meter.poll()
                except Exception as e:   # one bad poll must not end the telemetry
                    log.warning("flow export: %s", e)
        _, flows = self._scan()   # a fresh scan, kept for the next telemetry batch
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
        if self._bgp_task is not None:   # no apply of learned prefixes under what is being closed
            self._bgp_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._bgp_task
        if self.edge is not None:   # the routers stop hearing from us; the learned routes' kernel routes go
            with contextlib.suppress(Exception):
                await self.edge.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        await asyncio.get_running_loop().run_in_executor(self._io, self._io_close)
        self._io.shutdown(wait=True)
        if self._dedup_building is not None:   # its callback attaches or closes it; the close below detaches
            with contextlib.suppress(Exception):
                await self._dedup_building
        self._bg.shutdown(wait=True)
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
            self._stop_meter()
            self.dp.close()
        if self._ipfix is not None:
            self._ipfix.close()
        last = self.status(stopped=True)  # with the tunnels it had
        for d in (self.dedup, self._dedup_loaded):
            if d is not None:
                d.close()
        self.dedup = self._dedup_loaded = None
        if self.net is not None:
            self.net.close()
        if isinstance(getattr(self, "registry", None), SqliteRegistry):
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
                "bfd_changes": self.bfd_changes, "version": self.version, "applied_at": self.applied_at,
                "controller": None if self.controller is None else {
                    "url": self.controller.url, "connected": self.connected,
                    "telemetry_dropped": self.telemetry_dropped},
                "paths": paths, "routes": self.routes(), "duplication": self._duplication(),
                "loop": {"stalls": self.loop_stalls, "lag_max_ms": round(self.loop_lag_max * 1e3, 1)},
                "ipfix": None if self._ipfix is None else {"collector": self.ipfix, **self._ipfix.stats()},
                "bgp": None if self.edge is None else self.edge.status()}

    def _duplication(self) -> dict[str, Any]:
        """Copies sent by policy, where each duplicating pair's copies go, and
        what the far-end half dropped (empty without duplicating policies)."""
        out: dict[str, Any] = {}
        if self.engine is not None and self.engine.duplicating:
            out["copies_to"] = {f"{cls}->{site}": ifname for (cls, site), ifname in self.engine.duplicating.items()}
        if self.dp is not None and hasattr(self.dp, "duplicates"):
            with contextlib.suppress(Exception):
                if (sent := self.dp.duplicates()):
                    out["sent"] = sent
        if self.dedup is not None:
            with contextlib.suppress(Exception):
                out["dedup"] = self.dedup.stats()
        return out

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

        if self.controller is not None:
            self._queue("bfd", {"ts": time.time(), "path": path_id, "state": tr.new.name.lower().replace("_", ""),
                                "diag": None if tr.diag == Diag.NONE else tr.diag.name.lower()})
        if tr.new == State.UP or tr.old == State.UP:
            self.bfd_changes += 1
            self._bgp_advertise({path_id: tr.new == State.UP})   # a site that became (un)reachable
            if tr.old == State.UP:
                self.path_downs[path_id] = self.path_downs.get(path_id, 0) + 1
            log.info("bfd %s %s (%s -> %s%s)", path_id, "up" if tr.new == State.UP else "down", tr.old.name.lower(),
                     tr.new.name.lower(), "" if tr.diag == Diag.NONE else f", {tr.diag.name.lower()}",
                     extra={"path": path_id, "reason": "bfd_up" if tr.new == State.UP else "bfd_down"})

    def _log_event(self, ev: Any) -> None:
        site = getattr(ev, "site", None)
        if self.controller is not None and self.engine is not None:
            self._queue("events", {"ts": self.engine.wall_time(ev.ts), "reason": ev.reason[:64], "policy": ev.policy,
                                   "site": site, "from_path": ev.from_path, "to_path": ev.to_path,
                                   "detail": None if ev.detail is None else str(ev.detail)[:256]})
            urgent = getattr(self, "_urgent", None)
            if urgent is not None:
                urgent.set()
        detail = f" ({ev.detail})" if ev.detail else ""
        if ev.policy is None and site is None:   # about a path, not a move
            if ev.reason != "bfd_up":            # (the bfd line said that)
                log.info("path %s: %s%s", ev.to_path or ev.from_path, ev.reason, detail,
                         extra={"path": ev.to_path or ev.from_path, "reason": ev.reason})
            return
        log.info("move %s%s: %s -> %s, %s%s", ev.policy or "(default)", f" to {site}" if site else "",
                 ev.from_path or "(none)", ev.to_path or "(none)", ev.reason, detail,
                 extra={"policy": ev.policy or "(default)", "remote_site": site, "path": ev.to_path,
                        "reason": ev.reason})


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


def _bgp_file(path: str | None) -> Any:
    """``--bgp FILE``: the site's BGP configuration (JSON, :meth:`patronus.bgp.Bgp.from_dict`)."""
    if not path:
        return None
    from .bgp import Bgp

    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError("--bgp", str(path), f"cannot be read as JSON: {e}") from None
    return Bgp.from_dict(data)


def main(args: Any) -> int:
    if not logging.getLogger().handlers:  # an embedding program's logging stays as it is
        from .logfmt import configure

        # a stream of its own on what fd 2 is now: BCC's compiles on the build thread redirect fd 2 for
        # a second or more to catch the compiler's and verifier's words, and the loop logs meanwhile
        log_stream = os.fdopen(os.dup(2), "w", buffering=1)
        configure(getattr(args, "log_format", "text"), site=getattr(args, "site", None), stream=log_stream)
        logging.getLogger("httpx").setLevel(logging.WARNING)   # not a line per request
    from .tracing import setup, shutdown

    setup("patronus-agent")   # OTEL_TRACES_EXPORTER=otlp|console turns it on
    try:
        return _main(args)
    finally:
        shutdown()


def _main(args: Any) -> int:
    try:
        token = _token(args)
        source: StateSource | None = None
        controller = getattr(args, "controller", None)
        if controller:
            # the token is the controller's enrolment token; the credential and the
            # last desired state are kept next to --state
            source = ControllerSource(controller, f"{args.state}.{args.site}.controller.json", token=token,
                                      site=args.site, interval_s=2.0)
            token = None
        metrics_token = None
        if getattr(args, "metrics_token_file", None):
            metrics_token = read_secret_file(args.metrics_token_file, "metrics token file").decode().strip() or None
        agent = SiteAgent(args.state, args.site, lan_if=args.lan_if, token=token, backend=args.backend,
                          prefix=args.prefix, wireguard=getattr(args, "wireguard", "userspace"), source=source,
                          metrics_listen=getattr(args, "metrics_listen", None), metrics_token=metrics_token,
                          nice=getattr(args, "nice", AGENT_NICE), bfd_ms=getattr(args, "bfd_ms", 50),
                          ipfix=getattr(args, "ipfix", None), flow_idle_s=getattr(args, "flow_idle_timeout", 15.0),
                          flow_active_s=getattr(args, "flow_active_timeout", 60.0),
                          bgp=_bgp_file(getattr(args, "bgp", None)))
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
