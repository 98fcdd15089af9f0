"""The agent channel of the controller: enrolment tokens, agent credentials,
desired state per site (versioned, with deltas), pushes over a WebSocket,
telemetry batches and agent status.

- An **enrolment token** is one string, ``pnt1.<site>.<secret>.<cert_sha256>``:
  a one-time secret bound to a site (stored as its SHA-256, with an expiry)
  and the SHA-256 of the controller's TLS certificate (DER), so the agent's
  first contact is already pinned (the ``kubeadm join`` pattern).
- ``POST /api/v1/agent/enrol`` takes the token as its bearer (a second use
  is refused by name) and returns the agent's own credential,
  ``pna_<id>_<secret>`` (stored as SHA-256), bound to the site: it can read
  that site's desired state and post that site's telemetry, nothing else.
- **Desired state** of a site (:func:`desired_state`) is derived from the
  mesh: every site in mesh order (so path indexes are the same on both
  ends), the paths of the site with their indexes, the policies, profiles
  and failover settings. Each site has a version, a number in the
  controller database bumped when the site's desired state changes
  (:class:`AgentStore.current`); an agent holding the previous version gets
  a delta (:func:`diff`, applied with :func:`apply`), any other a full copy.
- ``GET /api/v1/agent/state?since=V`` and ``WS /api/v1/agent/ws`` (pushes a
  new version on every change the service publishes).
- ``POST /api/v1/agent/telemetry``: path metrics, BFD states, failover
  events, flow summaries; bounded (413), validated (422 naming the field),
  stored in one transaction or not at all.
- ``GET /api/v1/agents``: each agent's last contact and status, computed on
  read: Active, Degraded (no contact for 3 x its interval), Inactive (10 x).

Routes carry the same markers as :mod:`patronus.controller.app`
(``require(action)``), so ``create_app`` registers them in ROUTE_ACTIONS.
Agent routes use the actions ``agent`` and ``agent.enrol``, which no role
has: a user or API key gets 403 there, an agent credential passes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..agent import TOKEN_PREFIX, apply, canonical, diff, digest, digest_of, manifest, parse_token, to_mesh
from ..errors import ConfigError
from ..mesh import Mesh
from . import auth as _auth
from .problems import NotFound, Unavailable
from .rbac import require
from .tables import Exists, StoreConflict, StoreUnavailable

__all__ = [
    "build_router", "desired_state", "desired_states", "AgentStore", "Hub", "diff", "apply", "digest",
    "to_mesh", "parse_token", "TOKEN_PREFIX", "CREDENTIAL_PREFIX", "AGENT", "AGENT_ENROL", "MAX_TELEMETRY_BYTES",
    "MAX_TELEMETRY_ITEMS", "status_of",
]

PREFIX = "/api/v1"
CREDENTIAL_PREFIX = "pna_"
AGENT = "agent"              # an agent credential, for its own site
AGENT_ENROL = "agent.enrol"  # an enrolment token as the bearer
log = logging.getLogger("patronus.controller.agents")
MAX_TELEMETRY_BYTES = 256 * 1024
MAX_TELEMETRY_ITEMS = 2000   # per list of a batch
TELEMETRY_RETENTION_S = 86400.0   # raw telemetry kept a day (metrics, events and flows also go to the state file,
TELEMETRY_MAX_ROWS = 1_000_000    # which keeps them by its own retention), at most this many rows
MAX_ANNOUNCEMENT = 64 * 1024  # bytes of an announcement body (discovery.MAX_BODY)
DEFAULT_INTERVAL_S = 10.0
DEGRADED_AFTER = 3           # x the agent's interval without contact
INACTIVE_AFTER = 10
REFRESH_CHUNK = 15   # sites a refresh() transaction writes on etcd: a row, 3 parts of its own, old parts gone: < 128 ops
REFRESH_TRIES = 5            # AgentStore.refresh: attempts of its transaction when another replica's commit wins

# The agent actions belong to no role (auth.PERMISSIONS): users and API
# keys are refused with 403.
assert AGENT in _auth.PERMISSIONS and AGENT_ENROL in _auth.PERMISSIONS

_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_ID_RE = re.compile(r"[0-9a-f]{16}")

_bearer = HTTPBearer(auto_error=False, description="an agent credential (pna_...) or an enrolment token (pnt1...)")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _remote(request: Request | WebSocket) -> str | None:
    return request.client.host if request.client else None


# -- desired state (pure) -------------------------------------------------------------------


_SAFE_END = re.compile(r"[A-Za-z0-9_.-]+")   # site and uplink names: path ids need no JSON escaping
_KEYS = ("mesh", "site", "order", "sites", "paths", "policies", "failover", "profiles", "peers")


class _Topology:
    """The path ids of a mesh and each site's ``paths`` (path id -> index)
    with its part digest, for one site order and uplink names: kept across
    recomputes while those are the same (a policy change rebuilds nothing here).

    Path indexes run pair by pair (Mesh.paths): block j holds the pairs
    (i < j, j), P[k] = uplinks of the sites before k, B[j] = start of block j;
    site k's paths are all of block k, then in each later block m the pairs
    (k, m)."""

    def __init__(self, order: tuple[str, ...], uplinks: tuple[tuple[str, ...], ...]) -> None:
        import numpy as np

        n = len(order)
        u = [len(x) for x in uplinks]
        p, b = [0] * (n + 1), [0] * (n + 1)
        for k in range(n):
            p[k + 1] = p[k] + u[k]
        for j in range(n):
            b[j + 1] = b[j] + u[j] * p[j]
        self.order, self.u, self.p, self.b = order, u, p, b
        self.pos = {s: i for i, s in enumerate(order)}
        self._u, self._b = np.array(u, dtype=np.int64), np.array(b[:n], dtype=np.int64)
        ends = [f"{s}.{x}" for s, ups in zip(order, uplinks, strict=True) for x in ups]
        self.safe = all(_SAFE_END.fullmatch(e) for e in ends)
        ids: list[str] = []
        for j in range(n):
            mine = ends[p[j]:p[j + 1]]
            ids.extend([f"{x}~{y}" if x < y else f"{y}~{x}" for x in ends[:p[j]] for y in mine])
        self.ids = ids
        self._paths: dict[str, dict[str, int]] = {}
        self._digests: dict[str, str] = {}

    def indexes(self, k: int) -> list[int]:
        """Indexes of site k's paths, in Mesh.paths(site) order."""
        import numpy as np

        b, uk = self.b, self.u[k]
        out = list(range(b[k], b[k + 1]))
        lens = uk * self._u[k + 1:]
        total = int(lens.sum())
        if total:
            starts = self._b[k + 1:] + self.p[k] * self._u[k + 1:]
            if total == len(lens):   # one path per pair
                out.extend(starts.tolist())
            else:
                offs = np.cumsum(lens) - lens
                out.extend((np.repeat(starts - offs, lens) + np.arange(total)).tolist())
        return out

    def paths(self, site: str) -> dict[str, int]:
        got = self._paths.get(site)
        if got is None:
            idx = self.indexes(self.pos[site])
            got = self._paths[site] = dict(zip(map(self.ids.__getitem__, idx), idx, strict=True))
        return got

    def body(self, site: str) -> bytes:
        """canonical(paths(site)), without the general encoder when the ids need no escaping."""
        p = self.paths(site)
        if not self.safe:
            return canonical(p)
        return ("{" + ",".join([f'"{k}":{p[k]}' for k in sorted(p)]) + "}").encode()

    def digest(self, site: str) -> str:
        got = self._digests.get(site)
        if got is None:
            got = self._digests[site] = hashlib.sha256(self.body(site)).hexdigest()
        return got


_TOPOLOGIES: dict[tuple[Any, ...], _Topology] = {}
_TOPOLOGY_LOCK = threading.Lock()


def _topology(order: list[str], uplinks: list[list[str]]) -> _Topology:
    """The cached :class:`_Topology` of this order and uplinks (the last two kept)."""
    key = (tuple(order), tuple(map(tuple, uplinks)))
    with _TOPOLOGY_LOCK:
        topo = _TOPOLOGIES.pop(key, None)
        if topo is None:
            topo = _Topology(*key)
        _TOPOLOGIES[key] = topo   # most recent last
        while len(_TOPOLOGIES) > 2:
            del _TOPOLOGIES[next(iter(_TOPOLOGIES))]
        return topo


class _Shared:
    """What every site's desired state has in common, computed once per mesh,
    with the digest of each part (:func:`patronus.agent.part_digest`) computed
    once for every site that shares it. ``prev`` (the previous snapshot) lends
    the parts that did not change, and their digests."""

    def __init__(self, mesh: Mesh, peers: dict[str, dict[str, Any]] | None = None,
                 prev: _Shared | None = None) -> None:
        sites = mesh.sites
        self.mesh = mesh.name
        self.order = [s.name for s in sites]
        self.topology = _topology(self.order, [[u.name for u in s.uplinks] for s in sites])
        self.pos = self.topology.pos
        common = {"mesh": self.mesh, "order": self.order, "sites": {s.name: s.to_dict() for s in sites},
                  "policies": {p.name: p.to_dict() for p in mesh.policies}, "failover": mesh.failover.to_dict(),
                  "profiles": {p["name"]: p for p in mesh.to_dict()["profiles"]}}
        self._digests: dict[str, str] = {}
        if prev is not None:
            for k, v in common.items():
                if k in prev._common and prev._common[k] == v:
                    common[k] = prev._common[k]
                    if k in prev._digests:
                        self._digests[k] = prev._digests[k]
        self._common = common
        self.sites, self.policies = common["sites"], common["policies"]
        self.failover, self.profiles = common["failover"], common["profiles"]
        self.peers = {k: v for k, v in (peers or {}).items() if k in self.pos}
        if prev is not None and prev.peers == self.peers:
            self._peers, self._peer_digests, self._peer_enc = prev._peers, prev._peer_digests, prev._peer_enc
        else:
            self._peers: dict[str, dict[str, Any]] = {}
            self._peer_digests: dict[str, str] = {}
            self._peer_enc: list[tuple[str, bytes]] | None = None

    def paths(self, site: str) -> dict[str, int]:
        """Path id -> index, for every path of ``site``, in Mesh.paths(site) order."""
        return self.topology.paths(site)

    def _peers_of(self, site: str) -> dict[str, Any]:
        got = self._peers.get(site)
        if got is None:
            got = self._peers[site] = {k: v for k, v in self.peers.items() if k != site}
        return got

    def _check(self, site: str) -> None:
        if site not in self.pos:
            raise NotFound(f"no site {site!r} in the mesh")

    def value(self, site: str, key: str) -> Any:
        """The value of ``key`` in ``site``'s state (shared objects: read-only)."""
        if key in self._common:
            return self._common[key]
        if key == "site":
            return site
        if key == "paths":
            return self.topology.paths(site)
        return self._peers_of(site)

    def body(self, site: str, key: str) -> bytes:
        """canonical(value(site, key))."""
        if key == "paths":
            return self.topology.body(site)
        if key == "peers" and self.peers:
            if self._peer_enc is None:
                self._peer_enc = [(k, canonical(k) + b":" + canonical(self.peers[k])) for k in sorted(self.peers)]
            return b"{" + b",".join([e for k, e in self._peer_enc if k != site]) + b"}"
        return canonical(self.value(site, key))

    def manifest(self, site: str) -> dict[str, str]:
        """Key -> part digest of ``site``'s state (``patronus.agent.manifest(self.state(site))``)."""
        self._check(site)
        dg = self._digests
        for k in self._common:
            if k not in dg:
                dg[k] = hashlib.sha256(canonical(self._common[k])).hexdigest()
        peers = self._peer_digests.get(site)
        if peers is None:
            peers = self._peer_digests[site] = hashlib.sha256(self.body(site, "peers")).hexdigest()
        return {"mesh": dg["mesh"], "site": hashlib.sha256(canonical(site)).hexdigest(), "order": dg["order"],
                "sites": dg["sites"], "paths": self.topology.digest(site), "policies": dg["policies"],
                "failover": dg["failover"], "profiles": dg["profiles"], "peers": peers}

    def state(self, site: str) -> dict[str, Any]:
        """``site``'s desired state; its values are shared with other sites and later snapshots (read-only)."""
        self._check(site)
        return {k: self.value(site, k) for k in _KEYS}

    def copy(self, site: str) -> dict[str, Any]:
        """``site``'s desired state with containers of its own (what callers outside may change)."""
        st = self.state(site)
        for k in ("order",):
            st[k] = list(st[k])
        for k in ("sites", "paths", "policies", "profiles", "peers"):
            st[k] = dict(st[k])
        return st


def desired_state(mesh: Mesh, site: str, peers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The desired state of ``site``: a JSON-able dict of ``mesh`` (name),
    ``site``, ``order`` (every site name, in mesh order), ``sites`` (name ->
    Site.to_dict, the site itself and its peers), ``paths`` (path id ->
    index, the site's paths), ``policies`` (name -> Policy.to_dict),
    ``failover``, ``profiles`` and ``peers`` (site -> ``{"wg_public_key"}``
    of every other site whose agent announced itself, ``peers`` given as
    :meth:`AgentStore.peers` returns it). NotFound for a site the mesh lacks.

    >>> from patronus import Mesh, Site, Uplink
    >>> m = Mesh("acme")
    >>> m.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp1", "192.0.2.1")]))
    >>> m.add_site(Site("br1", subnets=["10.2.0.0/24"], uplinks=[Uplink("isp1", "203.0.113.9")]))
    >>> desired_state(m, "br1")["paths"]
    {'br1.isp1~hq.isp1': 0}
    """
    return _Shared(mesh, peers).copy(site)


def desired_states(mesh: Mesh, sites: list[str] | None = None,
                   peers: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`desired_state` of several sites (default: all), sharing the work
    (and, while the site order and uplinks stay the same, the paths of earlier calls)."""
    shared = _Shared(mesh, peers)
    return {s: shared.copy(s) for s in (shared.order if sites is None else sites)}


def state_delta(prev: dict[str, str], old: dict[str, Any], now: dict[str, str],
                new: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`diff` of two states over only the keys whose part digests
    (manifests ``prev`` and ``now``) differ: ``old`` needs those keys only.

    >>> from patronus.agent import manifest
    >>> a, b = {"x": 1, "m": {"k": 1}}, {"x": 1, "m": {"k": 2}}
    >>> state_delta(manifest(a), {"m": a["m"]}, manifest(b), b) == diff(a, b)
    True
    """
    keys = sorted(k for k in prev.keys() | now.keys() if prev.get(k) != now.get(k))
    return diff({k: old[k] for k in keys if k in prev}, {k: new[k] for k in keys if k in now})


class _Stale(Exception):
    """A snapshot older than one already applied (AgentStore.refresh)."""


class _Given:
    """One site's given state, with the interface of :class:`_Shared` (AgentStore.payload(state=...))."""

    def __init__(self, site: str, state: dict[str, Any]) -> None:
        self.site, self._state, self._manifest = site, state, manifest(state)

    def manifest(self, site: str) -> dict[str, str]:
        return self._manifest

    def value(self, site: str, key: str) -> Any:
        return self._state[key]

    def body(self, site: str, key: str) -> bytes:
        return canonical(self._state[key])

    def state(self, site: str) -> dict[str, Any]:
        return self._state


# -- tokens ------------------------------------------------------------------------------


def cert_sha256(cert_path: str | Path) -> str:
    """SHA-256 (lower-case hex, no colons) of a PEM certificate's DER form."""
    import ssl

    der = ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())
    return hashlib.sha256(der).hexdigest()


def status_of(last_seen: float | None, interval_s: float, now: float) -> str:
    """Active, Degraded (no contact for 3 x interval) or Inactive (10 x, or never).

    >>> [status_of(100.0, 1.0, t) for t in (101.0, 103.5, 111.0)], status_of(None, 1.0, 0.0)
    (['Active', 'Degraded', 'Inactive'], 'Inactive')
    """
    if last_seen is None:
        return "Inactive"
    quiet = now - last_seen
    if quiet >= INACTIVE_AFTER * interval_s:
        return "Inactive"
    if quiet >= DEGRADED_AFTER * interval_s:
        return "Degraded"
    return "Active"


# -- store -----------------------------------------------------------------------------------



class AgentStore:
    """Tokens, credentials, versions and announcements in the controller store
    (:mod:`patronus.controller.tables`, either engine, shared by every
    controller replica); raw telemetry in this replica's own database
    (``db.local``). Nothing of the shared tables is trusted from memory:
    several replicas write them, so every decision reads them in its
    transaction. Only part values are cached, by digest (content-addressed,
    immutable)."""

    def __init__(self, service: Any, auth: Any, *, pin: str | None, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.db = service.db
        self.auth = auth
        self.pin = pin
        self.clock = clock
        self._state_lock = threading.Lock()
        self._snap_lock = threading.Lock()
        self._snap: tuple[Any, _Shared] | None = None
        self._gen = self._applied = 0   # snapshots made, and the newest one refresh() applied
        if getattr(self.db, "kind", "sqlite") == "sqlite":   # a legacy table only an SQLite store can hold
            with self.db.transaction() as c:   # the tables are the controller database's (db.MIGRATIONS)
                self._import_full_states(c)
        self._values: dict[str, Any] = {}   # part digest -> value (a cache: parts are content-addressed)
        self._values_cap = 4096   # entries past which a refresh that wrote nothing trims the cache

    @property
    def _known(self) -> set[str]:
        """The digests of the parts stored (read from the store, every time)."""
        with self.db.reading() as t:
            return {r["digest"] for r in t.rows("agent_parts")}

    @staticmethod
    def _import_full_states(c: Any) -> None:
        """Rows of the older table (agent_state: full states) moved to manifests and parts, versions kept."""
        if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'agent_state'").fetchone() is None:
            return
        for r in c.execute("SELECT site, version, state, prev, updated FROM agent_state").fetchall():
            mans = []
            for text in (r["state"], r["prev"]):
                if text is None:
                    mans.append(None)
                    continue
                st = json.loads(text)
                c.executemany("INSERT OR IGNORE INTO agent_parts (digest, body) VALUES (?, ?)",
                              [(d, canonical(st[k]).decode()) for k, d in manifest(st).items()])
                mans.append(manifest(st))
            c.execute("INSERT OR REPLACE INTO agent_versions (site, version, digest, parts, prev, updated) "
                      "VALUES (?,?,?,?,?,?)", (r["site"], r["version"], digest_of(mans[0]), json.dumps(mans[0]),
                                               None if mans[1] is None else json.dumps(mans[1]), r["updated"]))
        c.execute("DROP TABLE agent_state")

    # -- enrolment tokens --------------------------------------------------------------

    def create_token(self, site: str, ttl_s: float, *, actor: str, remote: str | None = None) -> dict[str, Any]:
        if self.pin is None:
            raise Unavailable("the controller has no TLS certificate (tls.crt) for an enrolment token to pin")
        if not any(s.name == site for s in self.service.mesh().sites):
            raise ConfigError("site", site, "is not a site of the mesh (create the site first)")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) \
                or not 0 < ttl_s <= 30 * 86400:
            raise ConfigError("ttl_s", ttl_s, "is not a number of seconds in (0, 2592000]")
        tid, secret, now = secrets.token_hex(8), secrets.token_urlsafe(32), self.clock()
        meta = {"id": tid, "site": site, "created_by": actor, "created": now, "expires": now + ttl_s,
                "used": None, "used_by": None, "revoked": False}
        with self.db.transaction() as t:
            t.insert("agent_tokens", {"id": tid, "site": site, "hash": _sha256(secret), "created_by": actor,
                                      "created": now, "expires": now + ttl_s})
            self.db.audit(actor, "token.create", f"token/{tid}", after=meta, remote=remote)
        return {**meta, "token": f"{TOKEN_PREFIX}.{site}.{secret}.{self.pin}"}

    @staticmethod
    def _token_meta(r: Any) -> dict[str, Any]:
        return {"id": r["id"], "site": r["site"], "created_by": r["created_by"], "created": r["created"],
                "expires": r["expires"], "used": r["used"], "used_by": r["used_by"], "revoked": bool(r["revoked"])}

    def list_tokens(self) -> list[dict[str, Any]]:
        with self.db.reading() as t:
            rows = t.rows("agent_tokens")   # by id: then newest first, stable
        rows.sort(key=lambda r: r["created"], reverse=True)
        return [self._token_meta(r) for r in rows]

    def revoke_token(self, tid: str, *, actor: str, remote: str | None = None) -> None:
        with self.db.transaction() as t:
            r = t.get("agent_tokens", tid)
            if r is None:
                raise NotFound(f"no enrolment token {tid!r}")
            t.update("agent_tokens", tid, revoked=1)
            self.db.audit(actor, "token.revoke", f"token/{tid}", before=self._token_meta(r),
                          after={**self._token_meta(r), "revoked": True}, remote=remote)

    def enrol(self, token: str, *, public_key: str | None, hostname: str | None, interval_s: float,
              remote: str | None, signing_key: str | None = None) -> dict[str, Any]:
        """Consume an enrolment token; the new agent credential. AuthError naming the fault."""
        try:
            site, secret, pin = parse_token(token)
        except ConfigError as e:
            self.auth.reject(f"malformed enrolment token: it {e.reason}", "-", remote, "agent.enrol")
        if self.pin is None or not hmac.compare_digest(pin, self.pin):
            self.auth.reject("the token pins another controller certificate", f"site/{site}", remote,
                              "agent.enrol")
        now = self.clock()
        cid, csecret = secrets.token_hex(8), secrets.token_urlsafe(32)
        reason = None
        with self.db.transaction() as t:
            found = t.rows("agent_tokens", hash=_sha256(secret))
            r = found[0] if found else None
            if r is None or r["site"] != site:
                reason = "unknown enrolment token"
            elif r["revoked"]:
                reason = "enrolment token revoked"
            elif r["used"] is not None:
                reason = "enrolment token already used"
            elif now >= r["expires"]:
                reason = "enrolment token expired"
            elif not any(s.name == site for s in self.service.mesh().sites):
                reason = f"site {site!r} is no longer in the mesh"
            else:
                t.update("agent_tokens", r["id"], used=now, used_by=cid)
                t.insert("agent_credentials", {"id": cid, "site": site, "hash": _sha256(csecret), "token_id": r["id"],
                                               "public_key": public_key, "signing_key": signing_key,
                                               "hostname": hostname, "interval_s": interval_s, "created": now,
                                               "last_seen": now, "last_remote": remote})
                self.db.audit(f"agent:{site}:{cid}", "agent.enrol", f"site/{site}",
                              after={"credential": cid, "token_id": r["id"], "public_key": public_key,
                                     "signing_key": signing_key, "hostname": hostname, "interval_s": interval_s},
                              remote=remote)
        if reason is not None:
            self.auth.reject(reason, f"site/{site}", remote, "agent.enrol")
        self.service.publish_telemetry([{"kind": "contact", "id": cid, "ts": now}])
        return {"credential": f"{CREDENTIAL_PREFIX}{cid}_{csecret}", "id": cid, "site": site,
                "interval_s": interval_s, "cert_sha256": self.pin}

    # -- credentials ----------------------------------------------------------------------

    def agent(self, bearer: str, remote: str | None) -> dict[str, Any]:
        """The agent of a credential (and its contact noted); AuthError otherwise."""
        parts = bearer.split("_", 2)
        if len(parts) != 3 or not _ID_RE.fullmatch(parts[1]) or not _SECRET_RE.fullmatch(parts[2]):
            self.auth.reject("malformed agent credential", "-", remote, "auth.reject")
        with self.db.reading() as t:
            row = t.get("agent_credentials", parts[1])
        stored = row["hash"] if row is not None else "0" * 64
        if not hmac.compare_digest(_sha256(parts[2]), stored) or row is None:
            self.auth.reject("bad agent credential", f"agent/{parts[1]}", remote, "auth.reject")
        if row["revoked"]:
            self.auth.reject("agent credential revoked", f"agent/{parts[1]}", remote, "auth.reject")
        self.seen(row["id"], remote, last=row["last_seen"], interval_s=row["interval_s"])
        return {"id": row["id"], "site": row["site"], "interval_s": row["interval_s"], "signing_key": row["signing_key"]}

    def valid(self, cid: str) -> bool:
        """Whether credential ``cid`` exists and is not revoked (an open channel re-checks)."""
        with self.db.reading() as t:
            row = t.get("agent_credentials", cid)
        return row is not None and not row["revoked"]

    def revoke_agent(self, cid: str, *, actor: str, remote: str | None = None) -> None:
        """Revoke an agent credential: its next request, and its open channel, are refused."""
        with self.db.transaction() as t:
            r = t.get("agent_credentials", cid)
            if r is None:
                raise NotFound(f"no agent credential {cid!r}")
            t.update("agent_credentials", cid, revoked=1)
            # what it announced goes too: the peers stop trusting that machine's WireGuard key
            gone = sum(t.delete("agent_announcements", a["site"])
                       for a in t.rows("agent_announcements", credential=cid))
            self.db.audit(actor, "agent.revoke", f"agent/{cid}", before={"site": r["site"], "revoked": bool(r["revoked"])},
                          after={"site": r["site"], "revoked": True, "announcement_removed": bool(gone)},
                          remote=remote)
        self.service.notify("agent.revoke", f"agent/{cid}")

    # -- announcements (discovery through the controller) -----------------------------

    def peers(self) -> dict[str, dict[str, Any]]:
        """Site -> ``{"wg_public_key"}`` of every site whose agent announced
        itself, and ``"subnets"`` for a site that announces what its routers
        learned (BGP; checked inside its subnets in the mesh when the
        announcement came), which the other agents route to it."""
        with self.db.reading() as t:
            rows = t.rows("agent_announcements")
        out = {}
        for r in rows:
            subnets = _announced_subnets(r["body"], learned_only=True)
            out[r["site"]] = {"wg_public_key": r["wg_public_key"], **({"subnets": subnets} if subnets is not None
                                                                          else {})}
        return out

    def announce(self, agent: dict[str, Any], body: bytes, signature: bytes, key: bytes,
                 remote: str | None) -> dict[str, Any]:
        """Verify and keep an agent's signed announcement, with the checks of
        the discovery registry (:func:`patronus.wireguard.discovery.verify`
        and ``authorize``: the key enrolled by this credential, the signature,
        the body, the site, the time, the prefixes inside the site's subnets
        in the mesh and overlapping no other site's, the nonce not seen).
        AnnouncementRejected naming the reason; nothing is stored then."""
        from ..wireguard.discovery import SignedAnnouncement, authorize, body_text, verify

        site = agent["site"]
        enrolled = agent.get("signing_key")

        def site_of(k: bytes) -> str | None:
            if enrolled and hmac.compare_digest(base64.b64encode(k).decode(), enrolled):
                return site
            return None

        now = self.clock()
        ann = verify(SignedAnnouncement(body, signature, key), site_of, now)
        mesh = self.service.mesh()
        mine = next((s for s in mesh.sites if s.name == site), None)
        if mine is None:
            from ..wireguard.discovery import AnnouncementRejected

            raise AnnouncementRejected("unauthorized", f"{site!r} is not a site of the mesh")
        others = [(s.name, list(s.subnets)) for s in mesh.sites if s.name != site]
        authorize(ann, list(mine.subnets), others)
        changed = False
        with self.db.transaction() as t:
            try:
                t.insert("agent_nonces", {"nonce": ann.nonce, "ts": ann.ts})
            except Exists:
                from ..wireguard.discovery import AnnouncementRejected

                raise AnnouncementRejected("replayed", f"nonce {ann.nonce[:8]}... seen before") from None
            old = t.get("agent_announcements", site)
            if old is None or ann.ts >= old["ts"]:
                t.put("agent_announcements", {"site": site, "body": body_text(ann), "wg_public_key": ann.wg_public_key,
                                              "ts": ann.ts, "received": now, "credential": agent["id"]})
                # what the other sites take from it: the key, and the subnets (a BGP site's learned prefixes)
                old_subnets = None if old is None else _announced_subnets(old["body"])
                changed = old is None or old["wg_public_key"] != ann.wg_public_key or \
                    old_subnets != list(ann.subnets)
                if changed:
                    self.db.audit(f"agent:{site}:{agent['id']}", "agent.announce", f"site/{site}",
                                  before=None if old is None else {"wg_public_key": old["wg_public_key"],
                                                                   "subnets": old_subnets},
                                  after={"wg_public_key": ann.wg_public_key, "subnets": list(ann.subnets)},
                                  remote=remote)
        self._prune_nonces(now)
        if changed:
            self.service.notify("agent.announce", f"site/{site}", {"wg_public_key": ann.wg_public_key,
                                                                   "subnets": list(ann.subnets)})
        return {"site": site, "ts": ann.ts, "changed": changed}

    def _prune_nonces(self, now: float) -> None:
        """Forget the nonces of announcements too old to be taken anyway. A transaction of its own, after
        the announcement's: it lists the whole table, which on etcd would make concurrent announcements
        conflict; one that loses here leaves the pruning to the next announcement."""
        with contextlib.suppress(StoreConflict), self.db.transaction() as t:
            for r in t.rows("agent_nonces"):
                if r["ts"] < now - 120.0:
                    t.delete("agent_nonces", r["nonce"])

    def seen(self, cid: str, remote: str | None, *, last: float | None = None, interval_s: float = 0.0) -> None:
        """Note an agent's contact. At most one write per report interval of
        the agent (its status needs no finer time: Degraded is 3 intervals),
        so a fleet's contacts cost the store ``agents / interval`` writes a
        second, not one per request."""
        now = self.clock()
        if last is None or now - last >= interval_s or now < last:
            # the contact is advisory: one lost to a concurrent change of the row (a revocation on
            # another replica) or to a store without quorum is written by the agent's next request
            with contextlib.suppress(StoreConflict, StoreUnavailable), self.db.transaction() as t:
                t.update("agent_credentials", cid, last_seen=now, last_remote=remote)
        # site status is a function of contact and time: listeners (GraphQL) follow contacts
        self.service.publish_telemetry([{"kind": "contact", "id": cid, "ts": now}])

    def agents(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        with self.db.reading() as t:
            rows = t.rows("agent_credentials")   # by id: then by site and enrolment, stable
        rows.sort(key=lambda r: (r["site"], r["created"]))
        for r in rows:
            out.append({"id": r["id"], "site": r["site"], "hostname": r["hostname"], "public_key": r["public_key"],
                        "enrolled": r["created"], "last_seen": r["last_seen"], "remote": r["last_remote"],
                        "interval_s": r["interval_s"], "revoked": bool(r["revoked"]),
                        "status": "Revoked" if r["revoked"] else status_of(r["last_seen"], r["interval_s"], now)})
        return out

    # -- versions --------------------------------------------------------------------------

    def _mesh_key(self) -> Any:
        """What tells the mesh and the peers changed, cheaply: the service's
        ``mesh_version()`` (it changes with the mesh and the announcements, made
        by any replica or another process); None when unknown (no caching)."""
        return self.service.mesh_version()

    def snapshot(self) -> _Shared:
        """Every site's desired state now (:class:`_Shared`), rebuilt only when
        the mesh or the peers changed (the key is read before the mesh is)."""
        with self._snap_lock:
            key = self._mesh_key()
            snap = self._snap
            if key is not None and snap is not None and snap[0] == key:
                return snap[1]
            shared = _Shared(self.service.mesh(), self.peers(), None if snap is None else snap[1])
            self._gen += 1
            shared.gen = self._gen  # type: ignore[attr-defined]
            self._snap = (key, shared)
            return shared

    def _refreshed(self, sites: list[str], state: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """(source, :meth:`refresh` of ``sites``) from the latest snapshot (or the given state)."""
        while True:
            source = self.snapshot() if state is None else _Given(sites[0], state)
            try:
                return source, self.refresh(source, sites)
            except _Stale:   # a newer snapshot was applied meanwhile: never go back to an older one
                continue

    def refresh(self, source: Any, sites: list[str]) -> dict[str, tuple[int, str, dict[str, str], Any]]:
        """Site -> (version, digest, manifest, previous manifest or None) of
        ``sites`` as ``source`` (a :class:`_Shared`) has them: a site whose
        digest differs from the stored one gets the next version, in one
        transaction for all, with the parts not stored yet.

        The stored rows decide, read in that transaction (other replicas
        write them too). Two replicas writing the same site at once: one
        commit may lose (StoreConflict, nothing written); it is tried again,
        and then finds the other's row, with the same digest, and writes nothing."""
        with self._state_lock:
            gen = getattr(source, "gen", None)
            if gen is not None:
                if gen < self._applied:
                    raise _Stale
                self._applied = gen
            # etcd takes at most 128 operations a transaction (--max-txn-ops): many sites go in chunks,
            # each its own transaction (a site's version is its own; nothing needs them all at once)
            step = REFRESH_CHUNK if getattr(self.db, "kind", "sqlite") == "etcd" else max(1, len(sites))
            out: dict[str, tuple[int, str, dict[str, str], Any]] = {}
            for i in range(0, len(sites), step):
                chunk = sites[i:i + step]
                for attempt in range(REFRESH_TRIES):
                    try:
                        out.update(self._refresh(source, chunk))
                        break
                    except StoreConflict:
                        if attempt == REFRESH_TRIES - 1:
                            raise
                        time.sleep(random.uniform(0.0, 0.005 * 2 ** attempt))   # apart from the replica that won
            return out

    def _refresh(self, source: Any, sites: list[str]) -> dict[str, tuple[int, str, dict[str, str], Any]]:
        """One attempt of :meth:`refresh` (its transaction)."""
        out: dict[str, tuple[int, str, dict[str, str], Any]] = {}
        with self.db.transaction() as t:
            old: dict[str, dict[str, Any] | None] = {}   # site -> its stored row, of the sites to write
            parts: dict[str, tuple[str, str]] = {}        # digest -> (site, key) of a part the new rows use
            # many sites: every row in one read (a round trip each would be the cost on etcd)
            every = {r["site"]: r for r in t.rows("agent_versions")} if len(sites) > 4 else None
            for s in sites:
                m = source.manifest(s)
                dg = digest_of(m)
                r = every.get(s) if every is not None else t.get("agent_versions", s)
                if r is not None and r["digest"] == dg:
                    out[s] = (r["version"], dg, json.loads(r["parts"]),
                              None if r["prev"] is None else json.loads(r["prev"]))
                else:
                    had = set() if r is None else set(json.loads(r["parts"]).values())
                    for k, d in m.items():
                        if d not in had:   # a part the site's stored state has is stored
                            parts.setdefault(d, (s, k))
                    out[s] = (1 if r is None else r["version"] + 1, dg, m,
                              None if r is None else json.loads(r["parts"]))
                    old[s] = r
                for k, d in out[s][2].items():
                    if d not in self._values:
                        self._values[d] = source.value(s, k)
            if not old:
                if len(self._values) > self._values_cap:   # rows other replicas replaced: values nobody holds
                    keep = {d for r in out.values() for m in (r[2], r[3] or {}) for d in m.values()}
                    self._values = {d: v for d, v in self._values.items() if d in keep}
                return out
            stored = list(every.values()) if every is not None else t.rows("agent_versions")   # parts in use
            now = self.clock()
            for d, (s, k) in parts.items():   # content-addressed: writing one stored already changes nothing
                t.put("agent_parts", {"digest": d, "body": source.body(s, k).decode()})
            for s in old:
                version, dg, m, prev = out[s]
                t.put("agent_versions", {"site": s, "version": version, "digest": dg, "parts": json.dumps(m),
                                         "prev": None if prev is None else json.dumps(prev), "updated": now})
            self._collect(t, stored, {s: out[s] for s in old}, old)
        return out

    def _collect(self, t: Any, stored: list[dict[str, Any]], new: dict[str, tuple[int, str, dict[str, str], Any]],
                 old: dict[str, dict[str, Any] | None]) -> None:
        """Drop the parts that the rows this transaction replaces (``old``)
        referred to and that no site's state or previous state refers to any
        more: ``stored`` (every row, as read in the transaction ``t``) with the
        ``new`` rows instead of theirs. The value cache keeps the parts in use."""
        used: set[str] = set()
        for r in stored:
            if r["site"] not in new:
                used.update(json.loads(r["parts"]).values())
                if r["prev"] is not None:
                    used.update(json.loads(r["prev"]).values())
        for _, _, m, prev in new.values():
            used.update(m.values())
            if prev is not None:
                used.update(prev.values())
        stale: set[str] = set()
        for r in old.values():
            if r is not None:
                stale.update(json.loads(r["parts"]).values())
                if r["prev"] is not None:
                    stale.update(json.loads(r["prev"]).values())
        for d in sorted(stale - used):
            t.delete("agent_parts", d)
        for d in [d for d in self._values if d not in used]:
            self._values.pop(d, None)
        self._values_cap = max(4096, 2 * len(used))

    def _part(self, d: str) -> Any:
        """The value of part ``d`` (memory, else the store); KeyError when it is gone."""
        try:
            return self._values[d]
        except KeyError:
            pass
        with self.db.reading() as t:
            row = t.get("agent_parts", d)
        if row is None:
            raise KeyError(d)
        v = self._values[d] = json.loads(row["body"])
        return v

    def current(self, site: str, state: dict[str, Any] | None = None) -> tuple[int, str, dict[str, Any], Any]:
        """(version, digest, state, previous state or None) of ``site`` now:
        the version is bumped (and the previous state kept) when the desired
        state differs from the one stored. ``state`` given: that state, not the mesh's."""
        source, rows = self._refreshed([site], state)
        version, dg, _, prev = rows[site]
        try:
            old = None if prev is None else {k: self._part(d) for k, d in prev.items()}
        except KeyError:
            old = None
        return version, dg, source.state(site), old

    def payload(self, site: str, since: int | None, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """What an agent holding ``since`` gets: unchanged, a delta (over the
        keys whose part digests differ, when the previous state's parts are
        at hand), or the full state."""
        source, rows = self._refreshed([site], state)
        version, dg, now, prev = rows[site]
        if since == version:
            return {"version": version, "digest": dg, "unchanged": True}
        if since is not None and since == version - 1 and prev is not None:
            keys = [k for k in prev if prev[k] != now.get(k)]
            try:
                old = {k: self._part(prev[k]) for k in keys}
            except KeyError:
                old = None
            if old is not None:
                new = {k: source.value(site, k) for k in now if prev.get(k) != now[k]}
                return {"version": version, "digest": dg, "since": since,
                        "delta": state_delta(prev, old, now, new)}
        return {"version": version, "digest": dg, "full": source.state(site)}

    # -- telemetry -------------------------------------------------------------------------

    def store_telemetry(self, site: str, batch: TelemetryIn, remote: str | None) -> int:
        now = self.clock()
        rows: list[tuple[Any, ...]] = []
        for kind, items in (("metric", batch.metrics), ("bfd", batch.bfd), ("event", batch.events),
                            ("flow", batch.flows)):
            for it in items:
                d = it.model_dump(exclude_none=True)
                rows.append((site, now, kind, d.pop("ts"), d.get("path"), json.dumps(d, sort_keys=True)))
        if batch.bgp is not None:   # the edge's state as of this batch (GET /agents/{site}/bgp reads the last)
            rows.append((site, now, "bgp", now, None, json.dumps(batch.bgp.model_dump(), sort_keys=True)))
        with self.db.local.transaction() as c:   # this replica's own (raw telemetry is not shared)
            c.executemany("INSERT INTO agent_telemetry (site, received, kind, ts, path, data) VALUES (?,?,?,?,?,?)",
                          rows)
        live: list[dict[str, Any]] = []
        for m in batch.metrics:
            live.append({"kind": "metric", "site": site, "received": now, **m.model_dump()})
        for b in batch.bfd:
            live.append({"kind": "bfd", "site": site, "received": now, **b.model_dump()})
        for e in batch.events:
            d = e.model_dump()
            d["to_site"] = d.pop("site")
            live.append({"kind": "event", "site": site, "received": now, **d})
        shared = False
        if self.service.shared and (batch.bfd or batch.events):
            # replicas: BFD changes and failover events (few, and what operators watch) through etcd, so
            # every replica's subscribers see them and every replica's state file keeps the events;
            # metrics stay here (one a path an interval: docs/HA.md)
            mine = [x for x in live if x["kind"] == "metric"]
            shared = self.service.share_telemetry([x for x in live if x["kind"] != "metric"],
                                                  [e.model_dump() for e in batch.events])
            live = mine if shared else live
        if live:   # the live views first: a state file that cannot take the copy must not hold them back
            self.service.publish_telemetry(live)
        try:
            return len(rows) + self._to_state(site, batch, events=not shared)
        except Exception:   # the raw telemetry is stored; the copy into the state file is what failed
            log.exception("telemetry of site %s: the copy into the state file failed", site)
            return len(rows)

    def _to_state(self, site: str, batch: TelemetryIn, *, events: bool = True) -> int:
        """Path metrics, failover events and flow records also go where the
        service reads paths, metric series, events and flows from (the state
        file), in one transaction; a path is measured from both ends, each
        end's rows kept. The flow records written."""
        if not batch.metrics and not batch.events and not batch.records:
            return 0
        from ..store import Store

        index: dict[str, int] = {}
        if batch.records:
            with contextlib.suppress(Exception):   # a mesh that cannot load: the records keep no path
                index = {p.id: p.index for p in self.service.mesh().paths(site)}

        with Store(self.service.state) as st:
            db = st._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for m in batch.metrics:
                    st.add_path_metrics(m.ts, [(m.path, m.rtt_ms, m.jitter_ms, m.loss_pct, m.mos, m.mtu,
                                                m.bandwidth_mbps)])
                for e in batch.events if events else ():   # shared: every replica writes them (Service)
                    st.add_event(e.reason, policy=e.policy, from_path=e.from_path, to_path=e.to_path,
                                 detail=e.detail, ts=e.ts, site=e.site)
                for r in batch.records:
                    d = r.model_dump()
                    d["path"] = index.get(r.path) if r.path is not None else None
                    st.add_flow_records(d.pop("ts"), site, [d])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return len(batch.records)

    def prune(self, older_than_s: float = TELEMETRY_RETENTION_S, max_rows: int = TELEMETRY_MAX_ROWS) -> int:
        """Delete telemetry received more than ``older_than_s`` ago, then the
        oldest beyond ``max_rows``; the number of rows deleted."""
        cut = self.clock() - older_than_s
        with self.db.local.transaction() as c:
            n = c.execute("DELETE FROM agent_telemetry WHERE received < ?", (cut,)).rowcount
            n += c.execute("DELETE FROM agent_telemetry WHERE id <= (SELECT max(id) FROM agent_telemetry) - ?",
                           (max_rows,)).rowcount
        return int(n)

    def telemetry(self, site: str | None = None, kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM agent_telemetry WHERE 1=1", []
        if site is not None:
            sql += " AND site = ?"
            params.append(site)
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        rows = self.db.local.query(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [{"site": r["site"], "kind": r["kind"], "ts": r["ts"], "received": r["received"],
                 **json.loads(r["data"])} for r in rows]


# -- request bodies ------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TokenIn(_Body):
    site: str = Field(max_length=32)
    ttl_s: float = Field(3600.0, gt=0, le=30 * 86400)


class EnrolIn(_Body):
    public_key: str | None = Field(None, max_length=64, description="the site's WireGuard public key (base64)")
    signing_key: str | None = Field(None, pattern=r"^[A-Za-z0-9+/]{43}=$",
                                    description="the agent's Ed25519 announcement key (base64 of 32 bytes)")
    hostname: str | None = Field(None, max_length=253)
    interval_s: float = Field(DEFAULT_INTERVAL_S, ge=0.05, le=3600, description="how often the agent reports")


_PathId = Field(max_length=140, pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+~[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_Ts = Field(ge=0, le=1e11)


class MetricIn(_Body):
    ts: float = _Ts
    path: str = _PathId
    rtt_ms: float | None = Field(None, ge=0)
    jitter_ms: float | None = Field(None, ge=0)
    loss_pct: float | None = Field(None, ge=0, le=100)
    mos: float | None = Field(None, ge=0, le=5)
    mtu: int | None = Field(None, ge=0, le=65535)
    bandwidth_mbps: float | None = Field(None, ge=0)


class BfdIn(_Body):
    ts: float = _Ts
    path: str = _PathId
    state: Literal["admindown", "down", "init", "up"]
    diag: str | None = Field(None, max_length=64)


class EventIn(_Body):
    ts: float = _Ts
    reason: str = Field(max_length=64)
    policy: str | None = Field(None, max_length=64)
    site: str | None = Field(None, max_length=32)
    from_path: str | None = Field(None, max_length=140)
    to_path: str | None = Field(None, max_length=140)
    detail: str | None = Field(None, max_length=256)


class FlowIn(_Body):
    ts: float = _Ts
    policy: str | None = Field(None, max_length=64)
    site: str | None = Field(None, max_length=32)
    path: str | None = Field(None, max_length=140)
    flows: int = Field(0, ge=0)
    packets: int = Field(0, ge=0)
    bytes: int = Field(0, ge=0)


class FlowRecordIn(_Body):
    """One flow as the agent's data plane counts it (cumulative since the flow began)."""

    ts: float = _Ts
    src: str = Field(max_length=45)
    dst: str = Field(max_length=45)
    sport: int = Field(ge=0, le=65535)
    dport: int = Field(ge=0, le=65535)
    proto: int = Field(ge=0, le=255)
    packets: int = Field(ge=0, le=2**63 - 1)
    bytes: int = Field(ge=0, le=2**63 - 1)
    first_ns: int = Field(ge=0, le=2**63 - 1)
    last_ns: int = Field(ge=0, le=2**63 - 1)
    policy: str | None = Field(None, max_length=64)
    path: str | None = _PathId
    tcp_flags: int = Field(0, ge=0, le=255)

    @field_validator("src", "dst")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError("is not an IPv4 or IPv6 address") from None

    @model_validator(mode="after")
    def _consistent(self) -> FlowRecordIn:
        if ipaddress.ip_address(self.src).version != ipaddress.ip_address(self.dst).version:
            raise ValueError("src and dst are of different address families")
        if self.last_ns < self.first_ns:
            raise ValueError("last_ns is before first_ns")
        return self


class AnnounceIn(_Body):
    body: str = Field(max_length=4 * MAX_ANNOUNCEMENT // 3 + 4, description="base64 of the canonical announcement")
    signature: str = Field(max_length=128, description="base64 Ed25519 signature of the body")
    key: str = Field(max_length=64, description="base64 Ed25519 public key that signed it")


def _announced_subnets(body: str, learned_only: bool = False) -> list[str] | None:
    """The subnets of a stored announcement body (None: unreadable, or with
    ``learned_only`` not a BGP site's learned prefixes)."""
    try:
        d = json.loads(body)
        if learned_only and d.get("learned") is not True:
            return None
        return [str(x) for x in d["subnets"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _prefix(v: str) -> str:
    try:
        return str(ipaddress.ip_network(v))
    except ValueError:
        raise ValueError(f"{v[:64]!r} is not a prefix") from None


_SitePath = PathParam(max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_BgpState = Literal["idle", "connected", "up", "down", "unknown"]
_BgpReason = Literal["outside", "other_site", "default_route", "as_loop", "max_prefixes", "bad_prefix"]


class BgpSpeakerIn(_Body):
    alive: bool
    exits: int = Field(ge=0)
    restarts: int = Field(ge=0)


class BgpIn(_Body):
    """The BGP edge's state (patronus.bgp.edge.BgpEdge.status), bounded."""
    sessions: dict[str, _BgpState] = Field(max_length=16)
    received: int = Field(ge=0)
    # the lists are the first 1,000 (the counts are whole): a batch stays far below its 256 KiB
    accepted: list[str] = Field([], max_length=1_000)
    accepted_count: int = Field(0, ge=0)
    refused: dict[_BgpReason, int] = {}
    refused_now: dict[str, _BgpReason] = Field({}, max_length=1_000)
    advertised: list[str] = Field([], max_length=1_000)
    advertised_count: int = Field(0, ge=0)
    speaker: BgpSpeakerIn
    looped: int = Field(0, ge=0)

    @field_validator("sessions")
    @classmethod
    def _neighbors(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            try:
                ipaddress.ip_address(k)
            except ValueError:
                raise ValueError(f"{k[:64]!r} is not a neighbor address") from None
        return v

    @field_validator("accepted", "advertised")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        return [_prefix(x) for x in v]

    @field_validator("refused_now")
    @classmethod
    def _refused_prefixes(cls, v: dict[str, str]) -> dict[str, str]:
        return {_prefix(k): r for k, r in v.items()}


class TelemetryIn(_Body):
    site: str = Field(max_length=32)
    metrics: list[MetricIn] = []
    bfd: list[BfdIn] = []
    events: list[EventIn] = []
    flows: list[FlowIn] = []
    records: list[FlowRecordIn] = Field([], description="flow records, the largest active since the last batch")
    records_omitted: int = Field(0, ge=0, description="active flows the batch had no room for")
    bgp: BgpIn | None = Field(None, description="the site's BGP edge: sessions, received, accepted, refused and "
                                                "advertised routes (agents run with --bgp)")


def _problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    from .problems import PROBLEM_JSON, problem

    return JSONResponse(problem(status, title, detail, **extra), status_code=status, media_type=PROBLEM_JSON)


def _field(loc: Any) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# -- the hub: pushes to connected agents --------------------------------------------------------


class Hub:
    """Connected agents by site; on every change the service publishes,
    each connected site's state is recomputed once (off the event loop) and
    the new version handed to its connections."""

    def __init__(self, store: AgentStore) -> None:
        self.store = store
        self.conns: dict[str, set[asyncio.Queue[int]]] = {}
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        store.service.changes.subscribe(self._changed)

    @property
    def connected(self) -> int:
        return sum(len(v) for v in self.conns.values())

    def _changed(self, event: Any) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return   # published off the loop (no server running): nobody is connected here
        if event.get("type") == "agent.revoke":   # open channels re-check their credential now
            for qs in self.conns.values():
                for q in qs:
                    q.put_nowait(-1)
            # and the peers may have lost that agent's key: new versions below
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        while self._dirty:
            self._dirty = False
            sites = [s for s, qs in self.conns.items() if qs]
            if not sites:
                continue
            versions = await loop.run_in_executor(None, self._versions, sites)
            for site, version in versions.items():
                for q in list(self.conns.get(site, ())):
                    q.put_nowait(version)

    def _versions(self, sites: list[str]) -> dict[str, int]:
        while True:
            shared = self.store.snapshot()
            try:
                rows = self.store.refresh(shared, [s for s in sites if s in shared.pos])
            except _Stale:
                continue
            return {s: r[0] for s, r in rows.items()}

    @contextlib.contextmanager
    def connect(self, site: str) -> Any:
        q: asyncio.Queue[int] = asyncio.Queue()
        self.conns.setdefault(site, set()).add(q)
        try:
            yield q
        finally:
            self.conns.get(site, set()).discard(q)


# -- the router ------------------------------------------------------------------------------------


def build_router(service: Any, auth: Any, *, pin: str | None = None,
                 clock: Callable[[], float] = time.time) -> APIRouter:
    """The agent channel's routes over ``service`` and ``auth``. ``pin`` is the
    SHA-256 (hex) of the controller's certificate (default: ``tls.crt`` next
    to the service's state file, as ``patronus controller init`` lays it out)."""

    if pin is None:
        cert = Path(service.state).parent / "tls.crt"
        pin = cert_sha256(cert) if cert.exists() else None   # no certificate: no tokens (503), the rest works
    store = AgentStore(service, auth, pin=pin, clock=clock)
    hub = Hub(store)
    router = APIRouter()
    router.agent_store = store  # type: ignore[attr-defined]
    router.agent_hub = hub      # type: ignore[attr-defined]

    def agent_dep(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> dict[str, Any]:
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise _auth.AuthError("missing bearer token (Authorization: Bearer pna_...)")
        bearer = creds.credentials
        if not bearer.startswith(CREDENTIAL_PREFIX):
            auth.authenticate(bearer, remote=_remote(request))   # 401 for a bad one
            raise _auth.Forbidden("this route is for site agents: it needs an agent credential (pna_...)")
        return store.agent(bearer, _remote(request))

    agent_dep._patronus_action = AGENT  # type: ignore[attr-defined]

    def enrol_dep(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise _auth.AuthError("missing bearer token (Authorization: Bearer pnt1....)")
        bearer = creds.credentials
        if not bearer.startswith(TOKEN_PREFIX + "."):
            if not bearer.startswith(CREDENTIAL_PREFIX):
                auth.authenticate(bearer, remote=_remote(request))
            raise _auth.Forbidden("enrolment takes an enrolment token (pnt1....) as the bearer")
        return bearer

    enrol_dep._patronus_action = AGENT_ENROL  # type: ignore[attr-defined]

    def who(request: Request) -> dict[str, Any]:
        return {"actor": request.state.principal.actor, "remote": _remote(request)}

    # -- tokens (staff) ---------------------------------------------------------------

    @router.get(f"{PREFIX}/tokens", dependencies=[Depends(require("tokens.read"))], tags=["tokens"])
    def list_tokens() -> Any:
        return {"items": store.list_tokens()}

    @router.post(f"{PREFIX}/tokens", status_code=201, dependencies=[Depends(require("tokens.write"))],
                 tags=["tokens"])
    def create_token(body: TokenIn, request: Request) -> Any:
        return store.create_token(body.site, body.ttl_s, **who(request))

    @router.delete(f"{PREFIX}/tokens/{{token_id}}", status_code=204, dependencies=[Depends(require("tokens.write"))],
                   tags=["tokens"])
    def revoke_token(token_id: str, request: Request) -> Response:
        store.revoke_token(token_id, **who(request))
        return Response(status_code=204)

    @router.get(f"{PREFIX}/agents", dependencies=[Depends(require("sites.read"))], tags=["agents"])
    def list_agents() -> Any:
        return {"items": store.agents(), "connected": hub.connected}

    @router.get(f"{PREFIX}/agents/{{site}}/bgp", dependencies=[Depends(require("sites.read"))], tags=["agents"])
    def agent_bgp(site: str = _SitePath) -> Any:
        """The site's BGP edge as its agent last reported it: session state,
        routes received, prefixes accepted (what the site announces),
        refusals by reason, routes advertised to its routers. 404 when the
        agent reported none (no --bgp, or not to this replica)."""
        got = store.telemetry(site=site, kind="bgp", limit=1)
        if not got:
            return _problem(404, "not found", f"no BGP state reported by site {site!r}")
        r = got[0]
        # the row's data holds the edge's own "received" (routes): the report's time is its ts
        return {"site": site, "reported": r["ts"], **{k: v for k, v in r.items() if k not in ("site", "kind", "ts")}}

    @router.delete(f"{PREFIX}/agents/{{agent_id}}", status_code=204, dependencies=[Depends(require("tokens.write"))],
                   tags=["agents"])
    def revoke_agent(agent_id: str, request: Request) -> Response:
        """Revoke an agent's credential (a stolen machine): refused from its next request on."""
        store.revoke_agent(agent_id, **who(request))
        return Response(status_code=204)

    # -- the agents' own routes ------------------------------------------------------------

    @router.post(f"{PREFIX}/agent/enrol", status_code=201, tags=["agent"])
    def enrol(request: Request, body: EnrolIn | None = None, token: str = Depends(enrol_dep)) -> Any:
        body = body or EnrolIn()
        return store.enrol(token, public_key=body.public_key, hostname=body.hostname, interval_s=body.interval_s,
                           remote=_remote(request), signing_key=body.signing_key)

    @router.post(f"{PREFIX}/agent/announce", tags=["agent"])
    def announce(body: AnnounceIn, request: Request, agent: dict[str, Any] = Depends(agent_dep)) -> Any:
        """The agent's signed announcement (its WireGuard key, subnets, uplinks):
        peers learn its key from their desired state."""
        from ..wireguard.discovery import AnnouncementRejected

        remote = _remote(request)
        try:
            raw: list[bytes] | None = [base64.b64decode(x, validate=True)
                                       for x in (body.body, body.signature, body.key)]
        except (ValueError, binascii.Error):
            raw = None
        try:
            if raw is None:
                raise AnnouncementRejected("malformed", "body, signature and key must be base64")
            return store.announce(agent, raw[0], raw[1], raw[2], remote)
        except AnnouncementRejected as e:
            text = str(e)   # "reason: detail" or "reason" (the exception keeps no detail attribute)
            detail = text[len(e.reason) + 2:] if text.startswith(f"{e.reason}: ") else ""
            service.db.audit(f"agent:{agent['site']}:{agent['id']}", "agent.announce", f"site/{agent['site']}",
                             None, {"rejected": e.reason, "detail": detail}, remote, False)
            return _problem(403 if e.reason in ("unknown_key", "bad_signature", "unauthorized") else 422,
                            "announcement rejected", text, field="body", reason=e.reason)

    @router.get(f"{PREFIX}/agent/state", tags=["agent"])
    def agent_state(since: int | None = Query(None, ge=0), agent: dict[str, Any] = Depends(agent_dep)) -> Any:
        return store.payload(agent["site"], since)

    @router.post(f"{PREFIX}/agent/telemetry", tags=["agent"],
                 openapi_extra={"requestBody": {"content": {"application/json": {
                     "schema": TelemetryIn.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def telemetry(request: Request, agent: dict[str, Any] = Depends(agent_dep)) -> Any:
        remote = _remote(request)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_TELEMETRY_BYTES:
                return _problem(413, "content too large",
                                f"a telemetry batch is at most {MAX_TELEMETRY_BYTES} bytes", field="body")
            chunks.append(chunk)
        try:
            raw = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            return _problem(422, "unprocessable content", f"the batch is not JSON: {e}", field="body")
        if isinstance(raw, dict):
            for k in ("metrics", "bfd", "events", "flows", "records"):
                if isinstance(raw.get(k), list) and len(raw[k]) > MAX_TELEMETRY_ITEMS:
                    return _problem(413, "content too large",
                                    f"{k}: {len(raw[k])} items, a batch holds at most {MAX_TELEMETRY_ITEMS}", field=k)
        try:
            batch = TelemetryIn.model_validate(raw, strict=True)   # no true for 1.0, no "1.5" for 1.5
        except ValidationError as e:
            first = e.errors()[0]
            f = _field(first.get("loc", ()))
            return _problem(422, "unprocessable content", f"{f}: {first.get('msg')}", field=f)
        site = agent["site"]
        if batch.site != site:
            await run_in_threadpool(service.db.audit, f"agent:{site}:{agent['id']}", "agent.telemetry",
                                    f"site/{batch.site}", None, {"reason": "another site's telemetry"}, remote, False)
            raise _auth.Forbidden(f"this credential is site {site!r}'s: it may not post telemetry for {batch.site!r}")
        for k, attrs in (("metrics", ("path",)), ("bfd", ("path",)), ("events", ("from_path", "to_path")),
                         ("flows", ("path",)), ("records", ("path",))):
            for i, it in enumerate(getattr(batch, k)):
                for a in attrs:
                    pid = getattr(it, a)
                    if pid is not None and site not in {e.split(".", 1)[0] for e in pid.split("~")}:
                        return _problem(422, "unprocessable content", f"path {pid!r} is not a path of site {site!r}",
                                        field=f"{k}[{i}].{a}")
        n = await run_in_threadpool(store.store_telemetry, site, batch, remote)
        return {"stored": n}

    @router.websocket(f"{PREFIX}/agent/ws")
    async def agent_ws(ws: WebSocket) -> None:
        """Agent credential in the Authorization header or in the first message
        ``{"credential": "pna_...", "since": V}``; then a message with the state
        (full, delta or unchanged) now and at every new version."""
        await ws.accept()
        remote = _remote(ws)
        try:
            hello = await asyncio.wait_for(ws.receive_json(), 10.0)
        except (asyncio.TimeoutError, ValueError, WebSocketDisconnect):
            await ws.close(code=1008)
            return
        header = ws.headers.get("authorization", "")
        bearer = header[7:] if header[:7].lower() == "bearer " else (hello.get("credential") if isinstance(hello, dict) else None)
        if not isinstance(bearer, str) or not bearer.startswith(CREDENTIAL_PREFIX):
            await ws.send_json({"error": "unauthorized", "detail": "an agent credential (pna_...) is required"})
            await ws.close(code=1008)
            return
        try:
            agent = await run_in_threadpool(store.agent, bearer, remote)
        except _auth.ControllerError as e:
            await ws.send_json({"error": getattr(e, "title", "unauthorized"), "detail": str(e)})
            await ws.close(code=1008)
            return
        since = hello.get("since") if isinstance(hello, dict) else None
        since = since if isinstance(since, int) and not isinstance(since, bool) else None
        site = agent["site"]
        loop = asyncio.get_running_loop()
        check = True        # the credential is re-read on a revocation and at every quiet interval,
        last_seen = loop.time()   # and the contact written at most every half interval (not per push:
        with hub.connect(site) as q:   # a change fans out to every agent at once)
            try:
                while True:
                    if check and not await run_in_threadpool(store.valid, agent["id"]):
                        await ws.send_json({"error": "unauthorized", "detail": "agent credential revoked"})
                        await ws.close(code=1008)
                        return
                    msg = await run_in_threadpool(store.payload, site, since)
                    if not msg.get("unchanged") or since is None:
                        await ws.send_json(msg)
                    since = msg["version"]
                    if check or loop.time() - last_seen >= agent["interval_s"] / 2:
                        await run_in_threadpool(store.seen, agent["id"], remote)
                        last_seen = loop.time()
                    recv = asyncio.ensure_future(ws.receive_text())
                    pushed = asyncio.ensure_future(q.get())
                    done, pending = await asyncio.wait({recv, pushed}, timeout=agent["interval_s"],
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for t in pending:
                        t.cancel()
                    check = pushed not in done or pushed.result() < 0
                    if recv in done:
                        recv.result()   # raises WebSocketDisconnect when the agent went away
            except (WebSocketDisconnect, RuntimeError):
                return

    return router
