"""The controller's service layer: every operation on sites and policies.

REST (``patronus.controller.app``) is a thin layer over it, and so will
every other front end be. A change is made on a copy of the mesh, which the
model validates (``ConfigError`` naming the field), saved in one
transaction of the patronus state file, written to the audit log with its
before and after, and published as an event to every listener of
``Service.changes``.

The state file and the audit log are two SQLite files, so a change commits
in three steps: its audit row is recorded as pending in the controller
database (with the versions of the mesh before and after it), the state
file saves the mesh, the pending row becomes an audit row. A process killed
in between leaves the pending row, which the next ``Service`` settles by
the state file: the audit row is appended when the state file has the new
mesh, a refusal (ok false, "not applied") when it has the old one. So the
audit log has one ok row for every change the state file holds, however
the process ends (tests/test_controller_crash.py).

Every site and policy has a version, its ``etag`` (a quoted SHA-256 of the
canonical JSON of its ``to_dict``). A change that names the version it read
(``if_match``, HTTP ``If-Match``) and finds another is refused with
:class:`PreconditionFailed` (412): no lost updates. A policy priority in use
and a duplicate name are :class:`Conflict` (409).

>>> import tempfile, os
>>> from patronus.controller.db import ControllerDB
>>> d = tempfile.mkdtemp()
>>> svc = Service(os.path.join(d, "state.db"), ControllerDB(os.path.join(d, "ctl.db")))
>>> site = {"name": "hq", "subnets": ["10.1.0.0/24"], "uplinks": [{"name": "isp1", "address": "192.0.2.1"}]}
>>> r = svc.create_site(site, actor="doc")
>>> r.data["uplinks"][0]["mtu"], r.etag == svc.get_site("hq").etag
(1500, True)
>>> svc.db.close()
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from .._fanout import Fanout
from ..errors import ConfigError, StateError
from ..mesh import Mesh
from ..model import Failover, Policy, Site
from ..store import Store
from .db import _row_of
from .problems import Conflict, NotFound, PreconditionFailed, ServiceError, Unavailable
from .tables import StoreConflict

__all__ = ["Service", "Resource", "etag_of", "BadCursor", "parse_time", "Page", "SITE_STATUSES"]

log = logging.getLogger("patronus.controller.service")
DEFAULT_MESH = "default"
EVENT_RETENTION_S = 3600.0   # etcd: change events are kept this long (replicas catch up from them)
CHANGE_ATTEMPTS = 5          # etcd: a change that lost a race is edited again this often
#: a site's status as its agent's channel reports it; "pending" until the agent has connected
SITE_STATUSES = ("pending", "active", "degraded", "inactive")
_METRIC_COLS = ("ts", "rtt_ms", "jitter_ms", "loss_pct", "mos", "mtu", "bandwidth_mbps")
# failover events that say what became of a path itself (the engine records policy=None for them)
_PATH_STATE = {"bfd_up": "up", "reuse": "up", "damped": "damped", "bfd_down": "down"}


class BadCursor(ServiceError):
    """A pagination cursor this API did not hand out, or one of another query (422, field ``cursor``)."""

    status = 422
    title = "Bad Cursor"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, field="cursor")


def parse_time(field: str, value: Any) -> float | None:
    """A query's time bound: None, seconds since the epoch (``1700000000.5``)
    or an RFC 3339 / ISO 8601 date-time (``2024-05-01T12:00:00Z``; without an
    offset, UTC). ConfigError naming ``field`` for anything else.

    >>> parse_time("start", "1700000000.5"), parse_time("end", "2023-11-14T22:13:20Z"), parse_time("x", None)
    (1700000000.5, 1700000000.0, None)
    >>> parse_time("start", "yesterday")
    Traceback (most recent call last):
    ...
    patronus.errors.ConfigError: start: 'yesterday' is not a time (epoch seconds, or RFC 3339: 2024-05-01T12:00:00Z)
    """
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        t = float(value)
    else:
        text = str(value).strip()
        try:
            t = float(text)
        except ValueError:
            try:
                dt = datetime.datetime.fromisoformat(text.replace("z", "Z"))
            except ValueError:
                raise ConfigError(field, value, "is not a time (epoch seconds, or RFC 3339: "
                                  "2024-05-01T12:00:00Z)") from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=datetime.timezone.utc)
            t = dt.timestamp()
    if not math.isfinite(t):
        raise ConfigError(field, value, "is not a finite time")
    return t


def _range(start: Any, end: Any) -> tuple[float, float]:
    """[start, end) as floats (unbounded ends as -inf/inf); ConfigError when end precedes start."""
    lo, hi = parse_time("start", start), parse_time("end", end)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    if hi < lo:
        raise ConfigError("end", end, f"is before start ({start})")
    return lo, hi


@attrs.frozen
class Page:
    """One page of a query: the rows, and the cursor of the next page (None on the last)."""

    items: list[dict[str, Any]]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "next_cursor": self.next_cursor}


def _query_key(kind: str, filters: tuple[Any, ...]) -> str:
    text = json.dumps([kind, *filters], separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _encode_cursor(kind: str, filters: tuple[Any, ...], position: list[Any]) -> str:
    body = json.dumps({"v": 1, "q": _query_key(kind, filters), "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None, kind: str, filters: tuple[Any, ...],
                   shape: tuple[Any, ...]) -> list[Any] | None:
    """The position in a cursor made by :func:`_encode_cursor` for the same query; BadCursor otherwise."""
    if cursor is None or cursor == "":
        return None
    if not isinstance(cursor, str) or len(cursor) > 512:
        raise BadCursor("the cursor is not one this API handed out (too long)")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        body = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise BadCursor("the cursor is not one this API handed out (not decodable)") from None
    if not isinstance(body, dict) or body.get("v") != 1 or not isinstance(body.get("p"), list):
        raise BadCursor("the cursor is not one this API handed out (unknown format)")
    pos = body["p"]
    if len(pos) != len(shape) or any(isinstance(x, bool) or not isinstance(x, t) for x, t in zip(pos, shape)):
        raise BadCursor("the cursor is not one this API handed out (bad position)")
    if body.get("q") != _query_key(kind, filters):
        raise BadCursor("the cursor belongs to another query: pass the same filters as the request that "
                        "returned it, or no cursor to start again")
    return pos


def etag_of(data: Any) -> str:
    """A strong ETag for a JSON-able value: the quoted SHA-256 of its canonical JSON.

    >>> etag_of({"b": 1, "a": [1, 2]}) == etag_of({"a": [1, 2], "b": 1})
    True
    """
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:40] + '"'


def _mesh_tag(mesh: Mesh) -> str:
    """The version of a whole mesh (what a pending change is settled by)."""
    return etag_of(mesh.to_dict())


def _matches(if_match: str | None, etag: str) -> bool:
    """Does an ``If-Match`` header value accept ``etag``? None (no header) accepts everything."""
    if if_match is None:
        return True
    for tag in if_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag == etag:
            return True
    return False


@attrs.frozen
class Resource:
    """One site or policy as a dict (``to_dict``) with its version."""

    data: dict[str, Any]
    etag: str

    @classmethod
    def of(cls, obj: Site | Policy | Failover) -> Resource:
        d = obj.to_dict()
        return cls(d, etag_of(d))


class Service:
    """Sites, policies, paths, topology and events of one mesh.

    ``state`` is the patronus state file (created, with an empty mesh
    ``"default"``, when missing); ``db`` the controller database (audit log).
    Methods are blocking and thread-safe: changes are serialised by a lock,
    and each call opens the state file (SQLite connections are per thread).
    """

    def __init__(self, state: str | os.PathLike[str], db: Any) -> None:
        self.state = os.fspath(state)
        self.db = db
        self.changes: Fanout[dict[str, Any]] = Fanout()
        # agents' telemetry as it is stored (GraphQL subscriptions); not a change of the mesh
        self.telemetry: Fanout[dict[str, Any]] = Fanout()
        self._lock = threading.Lock()
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._site_status: dict[str, str] = {}   # set by the agent channel; missing: "pending"
        self._local = threading.local()
        self._mesh_cache: tuple[Any, Mesh] | None = None
        self.shared = getattr(db, "kind", "sqlite") == "etcd"   # the mesh and changes in etcd (replicas)
        self._watch_stop = threading.Event()
        self._event_rev = 0   # etcd: the newest change event this replica has seen
        self._live_lease: tuple[int, float] | None = None   # etcd: (lease of shared telemetry, granted at)
        #: etcd: called with every change the replica's watch sees (key, value or None, revision)
        self.watch_hooks: list[Callable[[str, bytes | None, int], None]] = []
        if self.shared:
            self._shared_init()
            return
        with self._store() as st:
            try:
                st.load_mesh()
            except StateError:
                if self._has_mesh():
                    raise
                st.save_mesh(Mesh(DEFAULT_MESH))
        self._settle()

    # -- the mesh in etcd (replicas) -----------------------------------------------

    def _shared_init(self) -> None:
        """The mesh document created when missing (by whichever replica is
        first), and a watch that publishes every replica's changes here."""
        from .etcd import EtcdTx

        while True:
            t = EtcdTx(self.db)
            if t.raw_get(self.db.mesh_key) is not None:
                break
            t.raw_put(self.db.mesh_key, json.dumps(Mesh(DEFAULT_MESH).to_dict()).encode())
            try:
                t.commit()
                break
            except StoreConflict:
                continue
        with self._store():   # the replica's own state file (telemetry) exists
            pass
        self._event_rev = self.db.revision()
        self._watcher = self.db.watch(self._on_watch, start_revision=self._event_rev + 1, stop=self._watch_stop,
                                      on_reset=self._on_reset)

    def share_telemetry(self, live: list[dict[str, Any]], events: list[dict[str, Any]]) -> bool:
        """etcd: put live telemetry items (BFD changes, failover events) and
        the failover events to keep on the shared stream, on a lease of
        :data:`LIVE_TTL_S` (etcd forgets them by itself); every replica's
        watch publishes them to its ``telemetry`` listeners and writes the
        events into its state file. False (nothing shared: the caller
        keeps them here) when etcd cannot take them."""
        from .etcd import LIVE_TTL_S

        try:
            now = time.monotonic()
            lease = self._live_lease
            if lease is None or now - lease[1] > LIVE_TTL_S / 2:   # a fresh lease each half TTL
                lease = self._live_lease = (self.db.grant(LIVE_TTL_S), now)
            with self.db.transaction() as t:
                t.raw_put(f"{self.db.prefix}/live/{time.time_ns():020d}-{os.urandom(4).hex()}",
                          json.dumps({"live": live, "events": events}, default=str).encode(), lease=lease[0])
            return True
        except Exception as e:  # the store away: this replica's listeners and state file get them
            log.warning("telemetry not shared through etcd (%s): kept on this replica", e)
            return False

    def _on_live(self, value: bytes) -> None:
        try:
            body = json.loads(value)
            live, events = list(body["live"]), list(body["events"])
        except (ValueError, KeyError, TypeError):
            return
        if live:
            self.publish_telemetry(live)
        if events:
            try:
                with self._store() as st:
                    st._db.execute("BEGIN IMMEDIATE")
                    try:
                        for e in events:
                            st.add_event(e["reason"], policy=e.get("policy"), from_path=e.get("from_path"),
                                         to_path=e.get("to_path"), detail=e.get("detail"), ts=e["ts"],
                                         site=e.get("site"))
                        st._db.execute("COMMIT")
                    except BaseException:
                        st._db.execute("ROLLBACK")
                        raise
            except Exception:
                log.exception("shared failover events not kept in the state file")

    def _on_watch(self, key: str, value: bytes | None, rev: int) -> None:
        for hook in list(self.watch_hooks):   # (the leader election follows its key here)
            try:
                hook(key, value, rev)
            except Exception:
                log.exception("a watch hook failed on %s", key)
        if key.startswith(f"{self.db.prefix}/live/"):
            if value is not None:
                self._on_live(value)
            return
        if key == self.db.mesh_key:
            self._mesh_cache = None if self._mesh_cache is None or self._mesh_cache[0] < rev else self._mesh_cache
            return
        if value is None or not key.startswith(f"{self.db.prefix}/events/"):
            return
        try:
            event = json.loads(value)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        event["seq"] = rev
        self._event_rev = max(self._event_rev, rev)
        self._publish(event)

    def _on_reset(self) -> None:
        self._mesh_cache = None

    def close(self) -> None:
        """Stop watching the shared store (etcd); nothing to do on SQLite."""
        self._watch_stop.set()

    def mesh_version(self) -> Any:
        """A value that changes whenever the mesh or the agents' announcements change."""
        if self.shared:
            self.mesh()
            cached = self._mesh_cache
            return (self._event_rev, None if cached is None else cached[0])
        try:   # the file's own word (another process may write it), on this thread's connection
            with self._store() as st:
                rows = st.records("mesh", "SELECT saved_at FROM mesh")
        except sqlite3.Error:
            return None
        return (self._seq, rows[0]["saved_at"]) if rows else None

    # -- plumbing --------------------------------------------------------------

    @contextlib.contextmanager
    def _store(self) -> Iterator[Store]:
        """This thread's connection to the state file (opened once per
        thread: an open costs about a millisecond, a request should not pay
        it). A connection left inside a transaction by an error is closed."""
        st = getattr(self._local, "store", None)
        if st is None:
            st = self._local.store = Store(self.state)
        try:
            yield st
        except BaseException:
            if st._db.in_transaction:
                st.close()
                self._local.store = None
            raise

    def _has_mesh(self) -> bool:
        con = sqlite3.connect(f"file:{self.state}?mode=ro", uri=True)
        try:
            return bool(con.execute("SELECT count(*) FROM mesh").fetchone()[0])
        finally:
            con.close()

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Publish events on this event loop (called from it): calls from
        other threads (the web server's worker threads) are handed over to it."""
        self._loop = loop or asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the bound event loop (now, when called from it)."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            if not loop.is_closed():
                loop.call_soon_threadsafe(fn)
            return
        fn()

    def _publish(self, event: dict[str, Any]) -> None:
        self._on_loop(lambda: self.changes.publish(event))

    def publish_telemetry(self, items: list[dict[str, Any]]) -> None:
        """Hand stored telemetry items to ``telemetry`` listeners, a batch at
        once (on the event loop: one callback, so a listener sees the whole
        batch before any consumer runs)."""
        def all_of_them() -> None:
            for item in items:
                self.telemetry.publish(item)

        self._on_loop(all_of_them)

    def prune(self, *, shared: bool = True) -> dict[str, int]:
        """Apply the state file's retention (``Store.prune``: metrics and
        flow records a week, events a month, each table at most
        ``MAX_ROWS``); rows deleted per table. On etcd, with ``shared`` (the
        leader), change events older than :data:`EVENT_RETENTION_S` go too."""
        if self.shared and shared:
            self.db.prune_events(EVENT_RETENTION_S)
        with self._store() as st:
            return st.prune()

    def mesh(self) -> Mesh:
        """The current mesh, as stored: one shared copy until the next save
        (checked against the stored mesh's save time on every call, so a
        change by another process is seen too). Do not change it: edits go
        through the service."""
        if self.shared:
            cached = self._mesh_cache
            doc, rev = self.db.load_mesh(0 if cached is None else cached[0])
            if doc is None:
                if cached is not None:
                    return cached[1]
                raise StateError(f"{self.db.url}: no mesh stored")
            mesh = Mesh.from_dict(doc)
            self._mesh_cache = (rev, mesh)
            return mesh
        with self._store() as st:
            row = st._db.execute("SELECT saved_at FROM mesh").fetchone()
            stamp = None if row is None else row[0]
            cached = self._mesh_cache
            if cached is not None and stamp is not None and cached[0] == stamp:
                return cached[1]
            mesh = st.load_mesh()
        self._mesh_cache = (stamp, mesh)
        return mesh

    def ready(self) -> None:
        """Raise :class:`Unavailable` unless the state file and the controller database answer."""
        try:
            with Store(self.state, create=False) as st:
                st.version  # noqa: B018 - the read is the check
            if self.shared:
                self.db.version  # noqa: B018 - a linearizable read: the cluster has quorum
            else:
                self.db.audit_log(limit=1)
        except Exception as e:  # any failure means not ready; the message says which
            raise Unavailable(f"store not reachable: {type(e).__name__}: {e}") from e

    def _change(self, *, actor: str, remote: str | None, action: str, target: str,
                edit: Callable[[Mesh], tuple[Mesh, Any, Any]]) -> None:
        """Load, apply ``edit`` (mesh -> (new mesh, before, after)), save and audit
        in one step, publish. A refused change is audited with ok=False."""
        if self.shared:
            self._shared_change(actor=actor, remote=remote, action=action, target=target, edit=edit)
            return
        with self._lock:
            self._settle()   # a change a failed save or audit left pending
            try:
                with self._store() as st:
                    mesh = self.mesh()   # the cached copy when it is current (edits build a new mesh)
                    new, before, after = edit(mesh)
                    # two files, so two steps: the change and its audit row are recorded
                    # as pending (committed) before the state file saves it, and the row
                    # is appended after; a crash in between is settled at the next start
                    self.db.prepare_change(actor, action, target, before, after, remote,
                                           _mesh_tag(mesh), _mesh_tag(new))
                    try:
                        st.save_mesh(new)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            self._settle(st)
                        raise
                    self.db.finish_change(True)
                    row = st._db.execute("SELECT saved_at FROM mesh").fetchone()
                    self._mesh_cache = (row[0], new)   # what was saved is what the next read gets
            except (ConfigError, Conflict, NotFound, PreconditionFailed) as e:
                self.db.audit(actor, action, target, after={"error": str(e)}, remote=remote, ok=False)
                raise
            self._seq += 1
            seq = self._seq
        self._publish({"seq": seq, "ts": time.time(), "type": action, "target": target,
                       "before": before, "after": after,
                       "etag": None if after is None else etag_of(after)})

    def _shared_change(self, *, actor: str, remote: str | None, action: str, target: str,
                       edit: Callable[[Mesh], tuple[Mesh, Any, Any]]) -> None:
        """:meth:`_change` on etcd: the mesh, its audit row and its change
        event in one transaction that commits only if the mesh is still the
        one the edit read; a lost race edits the newer mesh again (where an
        If-Match or a duplicate name now fails, 412/409), at most
        :data:`CHANGE_ATTEMPTS` times."""
        from .etcd import EtcdTx

        for attempt in range(CHANGE_ATTEMPTS):
            t = EtcdTx(self.db)
            try:
                raw = t.raw_get(self.db.mesh_key)
                if raw is None:
                    raise StateError(f"{self.db.url}: no mesh stored")
                new, before, after = edit(Mesh.from_dict(json.loads(raw)))
            except (ConfigError, Conflict, NotFound, PreconditionFailed) as e:
                self.db.audit(actor, action, target, after={"error": str(e)}, remote=remote, ok=False)
                raise
            t.raw_put(self.db.mesh_key, json.dumps(new.to_dict()).encode())
            t.audit(_row_of(self.db.clock(), actor, action, target, before, after, remote, True))
            self.db.put_event(t, {"ts": time.time(), "type": action, "target": target, "before": before,
                                  "after": after, "etag": None if after is None else etag_of(after)})
            try:
                rev = t.commit()
            except StoreConflict:
                if attempt + 1 == CHANGE_ATTEMPTS:
                    raise
                continue
            if rev is not None:
                self._mesh_cache = (rev, new)
            return

    def _settle(self, st: Store | None = None) -> None:
        """End the change a crash (or a failed save) left pending: its audit
        row is appended when the state file has the mesh it made, a refusal
        (ok false) when the state file has the mesh from before it."""
        pending = self.db.pending_change()
        if pending is None:
            return
        if st is None:
            with self._store() as store:
                tag = _mesh_tag(store.load_mesh())
        else:
            tag = _mesh_tag(st.load_mesh())
        if tag == pending["mesh_after"]:
            self.db.finish_change(True)
        elif tag == pending["mesh_before"]:
            self.db.finish_change(False, "not applied: the controller stopped or failed before the state file "
                                         "saved the change")
        else:
            self.db.finish_change(False, "outcome unknown: the state file has changed since, outside this "
                                         "controller")

    def notify(self, type_: str, target: str, after: Any = None) -> None:
        """Publish a change made outside the mesh (an agent's announcement,
        say) on the same stream as the service's own, with the next ``seq``."""
        if self.shared:   # through etcd: every replica's watch publishes it
            with self.db.transaction() as t:
                self.db.put_event(t, {"ts": time.time(), "type": type_, "target": target, "before": None,
                                      "after": after, "etag": None})
            return
        with self._lock:
            self._seq += 1
            seq = self._seq
        self._publish({"seq": seq, "ts": time.time(), "type": type_, "target": target, "before": None,
                       "after": after, "etag": None})

    # -- sites -----------------------------------------------------------------

    def list_sites(self) -> list[Resource]:
        return [Resource.of(s) for s in self.mesh().sites]

    def get_site(self, name: str) -> Resource:
        return Resource.of(self._site(self.mesh(), name))

    @staticmethod
    def _site(mesh: Mesh, name: str) -> Site:
        for s in mesh.sites:
            if s.name == name:
                return s
        raise NotFound(f"no site {name!r}")

    @staticmethod
    def _named(kind: str, body: Any, name: str | None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ConfigError(kind, body, "is not a mapping")
        body = copy.deepcopy(body)
        if name is not None:
            if body.setdefault("name", name) != name:
                raise ConfigError(f"{kind}.name", body["name"], f"does not match the name in the URL ({name!r}): "
                                  "a rename is a delete and a create")
        return body

    def create_site(self, body: dict[str, Any], *, actor: str, remote: str | None = None) -> Resource:
        """Add a site (409 when the name is taken)."""
        body = self._named("Site", body, None)
        site = Site.from_dict(body)
        out: list[Site] = []

        def edit(mesh: Mesh) -> tuple[Mesh, Any, Any]:
            if any(s.name == site.name for s in mesh.sites):
                raise Conflict(f"site {site.name!r} exists", field="Site.name")
            new = Mesh.from_dict(mesh.to_dict())
            new.add_site(site)
            out.append(site)
            return new, None, site.to_dict()

        self._change(actor=actor, remote=remote, action="site.create", target=f"site/{site.name}", edit=edit)
        return Resource.of(out[0])

    def replace_site(self, name: str, body: dict[str, Any], *, if_match: str | None = None, actor: str,
                     remote: str | None = None) -> Resource:
        """Replace a site (its position, so path indexes, stay)."""
        body = self._named("Site", body, name)
        site = Site.from_dict(body)

        def edit(mesh: Mesh) -> tuple[Mesh, Any, Any]:
            old = self._site(mesh, name)
            self._check(if_match, old, f"site {name!r}")
            d = mesh.to_dict()
            d["sites"] = [site.to_dict() if s["name"] == name else s for s in d["sites"]]
            return Mesh.from_dict(d), old.to_dict(), site.to_dict()

        self._change(actor=actor, remote=remote, action="site.replace", target=f"site/{name}", edit=edit)
        return Resource.of(site)

    def delete_site(self, name: str, *, if_match: str | None = None, actor: str, remote: str | None = None) -> None:
        """Remove a site; 409 while a policy needs it (the model's rule)."""

        def edit(mesh: Mesh) -> tuple[Mesh, Any, Any]:
            old = self._site(mesh, name)
            self._check(if_match, old, f"site {name!r}")
            new = Mesh.from_dict(mesh.to_dict())
            try:
                new.remove_site(name)
            except ConfigError as e:
                raise Conflict(str(e), field=e.field) from e
            return new, old.to_dict(), None

        self._change(actor=actor, remote=remote, action="site.delete", target=f"site/{name}", edit=edit)

    # -- policies --------------------------------------------------------------

    def list_policies(self) -> list[Resource]:
        return [Resource.of(p) for p in self.mesh().policies]

    def get_policy(self, name: str) -> Resource:
        return Resource.of(self._policy(self.mesh(), name))

    @staticmethod
    def _policy(mesh: Mesh, name: str) -> Policy:
        for p in mesh.policies:
            if p.name == name:
                return p
        raise NotFound(f"no policy {name!r}")

    @staticmethod
    def _priority_free(mesh: Mesh, policy: Policy, *, besides: str | None = None) -> None:
        for p in mesh.policies:
            if p.name != besides and p.priority == policy.priority:
                raise Conflict(f"priority {policy.priority} is already used by policy {p.name!r}",
                               field="Policy.priority")

    def create_policy(self, body: dict[str, Any], *, actor: str, remote: str | None = None) -> Resource:
        """Add a policy (409 when the name or the priority is taken)."""
        body = self._named("Policy", body, None)
        policy = Policy.from_dict(body)

        def edit(mesh: Mesh) -> tuple[Mesh, Any, Any]:
            if any(p.name == policy.name for p in mesh.policies):
                raise Conflict(f"policy {policy.name!r} exists", field="Policy.name")
            self._priority_free(mesh, policy)
            new = Mesh.from_dict(mesh.to_dict())
            new.add_policy(policy)
            return new, None, policy.to_dict()

        self._change(actor=actor, remote=remote, action="policy.create", target=f"policy/{policy.name}", edit=edit)
        return Resource.of(policy)

    def replace_policy(self, name: str, body: dict[str, Any], *, if_match: str | None = None, actor: str,
                       remote: str | None = None) -> Resource:
        body = self._named("Policy", body, name)
        policy = Policy.from_dict(body)

        def edit(mesh: Mesh) -> tuple[Mesh, Any, Any]:
            old = self._policy(mesh, name)
            self._check(if_match, old, f"policy {name!r}")
            self._priority_free(mesh, policy, besides=name)
            d = mesh.to_dict()
            d["policies"] = [policy.to_dict() if p["name"] == name else p for p in d["policies"]]
            return Mesh.from_dict(d), old.to_dict(), policy.to_dict()

        self._change(actor=actor, remote=remote, action="policy.replace", target=f"policy/{name}", edit=edit)
        return Resource.of(policy)

    def delete_policy(self, name: str, *, if_match: str | None = None, actor: str,
                      remote: str | None = None) -> None:
        def edit(mesh: Mesh) -> tuple[Mesh, Any, Any]:
            old = self._policy(mesh, name)
            self._check(if_match, old, f"policy {name!r}")
            new = Mesh.from_dict(mesh.to_dict())
            new.remove_policy(name)
            return new, old.to_dict(), None

        self._change(actor=actor, remote=remote, action="policy.delete", target=f"policy/{name}", edit=edit)

    # -- failover settings ---------------------------------------------------------

    def get_failover(self) -> Resource:
        """The mesh's failover settings (``Failover``), with their ETag."""
        return Resource.of(self.mesh().failover)

    def replace_failover(self, body: dict[str, Any], *, if_match: str | None = None, actor: str,
                         remote: str | None = None) -> Resource:
        """Replace the failover settings (validated by ``Failover.from_dict``;
        omitted fields take their defaults); every agent gets them with its
        next desired state."""
        failover = Failover.from_dict(body)

        def edit(mesh: Mesh) -> tuple[Mesh, Any, Any]:
            self._check(if_match, mesh.failover, "the failover settings")
            d = mesh.to_dict()
            d["failover"] = failover.to_dict()
            return Mesh.from_dict(d), mesh.failover.to_dict(), failover.to_dict()

        self._change(actor=actor, remote=remote, action="failover.replace", target="failover", edit=edit)
        return Resource.of(failover)

    @staticmethod
    def _check(if_match: str | None, obj: Site | Policy | Failover, what: str) -> None:
        tag = Resource.of(obj).etag
        if not _matches(if_match, tag):
            raise PreconditionFailed(f"{what} has changed: its version is {tag}, If-Match names {if_match}")

    # -- read-only views -----------------------------------------------------------

    def paths(self) -> list[dict[str, Any]]:
        """Every path of the full mesh: id, index, the two sites and their
        uplinks, with ``metrics`` (the latest measurement an agent stored:
        ``ts``, ``rtt_ms``, ``jitter_ms``, ``loss_pct``, ``mos``, ``mtu``,
        ``bandwidth_mbps``) and ``state`` (from the latest failover event about
        the path itself: ``status`` up, down or damped, ``reason``, ``since``);
        each None while the store has nothing for the path."""
        mesh = self.mesh()
        ids = [p.id for p in mesh.paths()]
        with self._store() as st:
            latest = self._latest_metrics(st, ids)
            states = self._path_states(st, set(ids))
        return [{"id": p.id, "index": p.index, "sites": [p.local_site, p.remote_site],
                 "uplinks": [p.local_uplink, p.remote_uplink], "metrics": latest.get(p.id),
                 "state": states.get(p.id)} for p in mesh.paths()]

    @staticmethod
    def _latest_metrics(st: Store, ids: list[str]) -> dict[str, dict[str, Any]]:
        out = {}
        q = (f"SELECT {', '.join(_METRIC_COLS)}, path FROM path_metrics WHERE path = ? "
             "ORDER BY ts DESC, rowid DESC LIMIT 1")
        for pid in ids:   # one index lookup per path (path_metrics_path_ts)
            rows = st.records("path_metrics", q, (pid,))
            if rows:
                out[pid] = {k: rows[0][k] for k in _METRIC_COLS}
        return out

    @staticmethod
    def _path_states(st: Store, ids: set[str]) -> dict[str, dict[str, Any]]:
        """The newest path-level failover event of each path, newest first until every path has one."""
        out: dict[str, dict[str, Any]] = {}
        marks = ", ".join("?" * len(_PATH_STATE))
        rows = st.records("failover_events", "SELECT id, ts, reason, from_path, to_path, detail FROM "
                           f"failover_events WHERE reason IN ({marks}) ORDER BY id DESC", tuple(_PATH_STATE))
        for r in rows:
            if len(out) == len(ids):
                break
            # bfd_down and damped name the path left (from_path); bfd_up and reuse the path back (to_path)
            pid = r["from_path"] if _PATH_STATE[r["reason"]] in ("down", "damped") else r["to_path"]
            if pid in ids and pid not in out:
                out[pid] = {"status": _PATH_STATE[r["reason"]], "reason": r["reason"], "since": r["ts"],
                            "detail": r["detail"]}
        return out

    def path_metrics(self, path_id: str, *, start: Any = None, end: Any = None, limit: int = 1000,
                     cursor: str | None = None) -> dict[str, Any]:
        """One path's measurements with ``start <= ts < end`` as a time series,
        oldest first, ``limit`` points a page (``next_cursor`` for the next).
        A path the mesh no longer has keeps its history (``in_mesh`` False);
        an id nothing was measured for is an empty series."""
        lo, hi = _range(start, end)
        limit = self._limit(limit, 10_000)
        filters = (path_id, lo, hi)
        pos = _decode_cursor(cursor, "path_metrics", filters, ((int, float), int))
        q = (f"SELECT rowid AS rid, {', '.join(_METRIC_COLS)} FROM path_metrics "
             "WHERE path = ? AND ts >= ? AND ts < ?")
        params: tuple[Any, ...] = (path_id, lo, hi)
        if pos is not None:
            q += " AND (ts > ? OR (ts = ? AND rowid > ?))"
            params += (pos[0], pos[0], pos[1])
        q += " ORDER BY ts, rowid LIMIT ?"
        with self._store() as st:
            rows = st.records("path_metrics", q, (*params, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = _encode_cursor("path_metrics", filters, [rows[-1]["ts"], rows[-1]["rid"]]) if more else None
        in_mesh = any(p.id == path_id for p in self.mesh().paths())
        return {"path": path_id, "in_mesh": in_mesh, "columns": list(_METRIC_COLS),
                "items": [{k: r[k] for k in _METRIC_COLS} for r in rows], "next_cursor": nxt}

    def flows(self, *, site: str | None = None, policy: str | None = None, start: Any = None, end: Any = None,
              limit: int = 100, cursor: str | None = None) -> Page:
        """Flow records the agents stored (one per flow and snapshot), of
        ``site`` and ``policy`` when given, with ``start <= ts < end``, in the
        order they were stored, ``limit`` a page. Following ``next_cursor``
        from the first page visits every matching row exactly once, also
        while agents keep writing (new rows come on later pages)."""
        lo, hi = _range(start, end)
        limit = self._limit(limit, 1000)
        filters = (site, policy, lo, hi)
        pos = _decode_cursor(cursor, "flows", filters, (int,))
        q = "SELECT rowid AS rid, * FROM flow_snapshots WHERE ts >= ? AND ts < ?"
        params: tuple[Any, ...] = (lo, hi)
        if site is not None:
            q += " AND site = ?"
            params += (site,)
        if policy is not None:
            q += " AND policy = ?"
            params += (policy,)
        if pos is not None:
            q += " AND rowid > ?"
            params += (pos[0],)
        q += " ORDER BY rowid LIMIT ?"
        with self._store() as st:
            rows = st.records("flow_snapshots", q, (*params, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = _encode_cursor("flows", filters, [rows[-1]["rid"]]) if more else None
        for r in rows:
            del r["rid"]
        return Page(rows, nxt)

    @staticmethod
    def _limit(limit: Any, most: int) -> int:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= most:
            raise ConfigError("limit", limit, f"is not an integer from 1 to {most}")
        return limit

    # -- site status (the agent channel reports it) ---------------------------------

    def set_site_status(self, site: str, status: str) -> None:
        """Record a site's status (one of :data:`SITE_STATUSES`), as its agent channel sees it."""
        if status not in SITE_STATUSES:
            raise ConfigError("status", status, f"is not one of {', '.join(SITE_STATUSES)}")
        self._site_status[site] = status

    def site_status_counts(self) -> dict[str, int]:
        """The sites of the mesh by status (every status, 0 when none)."""
        counts = dict.fromkeys(SITE_STATUSES, 0)
        for s in self.mesh().sites:
            counts[self._site_status.get(s.name, "pending")] += 1
        return counts

    def topology(self) -> dict[str, Any]:
        """Sites as nodes, paths as edges."""
        mesh = self.mesh()
        return {
            "mesh": mesh.name,
            "nodes": [{"id": s.name, "subnets": list(s.subnets), "uplinks": [u.name for u in s.uplinks]}
                      for s in mesh.sites],
            "edges": [{"id": p.id, "index": p.index, "source": p.local_site, "target": p.remote_site,
                       "source_uplink": p.local_uplink, "target_uplink": p.remote_uplink} for p in mesh.paths()],
        }

    def events(self, limit: int = 100, *, start: Any = None, end: Any = None) -> list[dict[str, Any]]:
        """The latest ``limit`` failover events with ``start <= ts < end``, oldest first."""
        lo, hi = _range(start, end)
        limit = self._limit(limit, 10_000)
        with self._store() as st:
            rows = st.records(
                "failover_events",
                "SELECT id, ts, policy, site, from_path, to_path, reason, detail FROM failover_events "
                "WHERE ts >= ? AND ts < ? ORDER BY id DESC LIMIT ?", (lo, hi, limit))
        rows.reverse()
        return rows
