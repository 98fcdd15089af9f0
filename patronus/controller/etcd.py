"""The controller store on etcd: several controller replicas share one
state, each change one etcd transaction.

``patronus controller run --store etcd://h1:2379,h2:2379,h3:2379`` puts the
controller's tables (:mod:`patronus.controller.tables`), the mesh, the audit
log and the stream of changes into etcd (v3 API, through its JSON gateway,
with the ``etcd3gw`` client). What stays on the replica's own disk: raw
agent telemetry and path measurements (high rate; docs/HA.md says why).

Layout under the prefix (``/patronus`` unless the URL names another):

- ``schema``: ``{"version": N}`` (versioned migrations, :data:`MIGRATIONS`)
- ``t/<table>/<key>``: one row, JSON
- ``i/<table>/<column>/<value>/<key>``: an index entry (``Table.indexes``)
- ``v/t/<table>``, ``v/i/<table>/<column>/<value>``: bumped by every delete
  under that prefix (what a listing of it depends on)
- ``mesh``: the mesh, JSON (``Mesh.to_dict``)
- ``audit/<ns>-<n>``: one audit row; its id is ``create_revision * 1000 + n``
- ``events/<ns>-<n>``: one change of the mesh, JSON; every replica watches
  them and publishes them to its listeners (``seq`` is the etcd revision)
- ``leader/<name>``: the replica holding a role, on a lease
- ``live/<ns>-<n>``: agents' BFD changes and failover events, on a lease of
  :data:`LIVE_TTL_S` (every replica's subscribers see them)

Transactions are optimistic (etcd's STM pattern): reads are taken at one
revision, writes are buffered, and the commit is one etcd ``Txn`` that
checks every key read still has the revision it was read at (and no key was
added to a table the transaction listed). A lost race is
:class:`~patronus.controller.tables.StoreConflict` (409) with nothing
written. An etcd that cannot commit (no quorum, unreachable) is
:class:`~patronus.controller.tables.StoreUnavailable` (503) naming the
members tried; reads then fall back to one member's copy and say so
(:func:`stale`).

>>> parse_url("etcd://10.0.0.1:2379,10.0.0.2:2379/sdwan")
(['http://10.0.0.1:2379', 'http://10.0.0.2:2379'], '/sdwan')
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from ..errors import ConfigError, SchemaVersionError, StateError
from .db import ControllerDB, _row_of
from .tables import Exists, StoreConflict, StoreUnavailable, table

__all__ = ["EtcdDB", "EtcdTx", "Leadership", "parse_url", "stale", "stale_reads", "MIGRATIONS", "SCHEMA_VERSION"]

log = logging.getLogger("patronus.controller.etcd")

#: request timeout (s): longer than an etcd leader election (1 s by default), shorter than a client's patience
TIMEOUT_S = 3.0
LIVE_TTL_S = 120   # shared telemetry (BFD changes, failover events) lives this long in etcd
DEGRADED_S = 2.0
WATCH_IDLE_S = 60.0   # a watch stream silent this long is opened again (from the next revision)
STALE_MAX_S = 300.0   # reads answer from one member's copy at most this long after the quorum was lost
# etcd's answers that mean "try another member" (no leader there, overloaded, stopping) ...
_TRANSIENT = ("no leader", "timed out", "leader changed", "unavailable", "Unavailable", "not capable",
              "too many requests", "stopped")
# ... and, of those and transport errors, the ones that say a request was surely not applied
_NOT_APPLIED = ("refused", "failed to establish a new connection", "name or service not known", "no leader",
                "leader changed", "not capable", "too many requests", "server stopped")   # after a quorum failure, reads skip the linearizable attempt this long
_AUDIT_N = 1000   # audit rows one transaction may append (ids are create_revision * 1000 + n)

# Each entry migrates the stored format from version i to i + 1: a function of (EtcdDB, EtcdTx), run in
# one transaction that also sets the version. Append only; never edit a shipped one.
MIGRATIONS: list[Callable[[EtcdDB, EtcdTx], None]] = [
    lambda db, t: None,   # 1: the layout of this module's docstring
]
SCHEMA_VERSION = len(MIGRATIONS)

_stale: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("patronus_etcd_stale", default=None)


@contextlib.contextmanager
def stale_reads() -> Iterator[list[bool]]:
    """Collect, for the code inside (a request), whether any read answered
    from one member's possibly stale copy: the yielded list's first item.
    Works across threads that copy the context (FastAPI's thread pool)."""
    box = [False]
    token = _stale.set(box)
    try:
        yield box
    finally:
        _stale.reset(token)


def stale() -> bool:
    """Whether a read in this context (see :func:`stale_reads`) was stale."""
    box = _stale.get()
    return bool(box and box[0])


def parse_url(url: str) -> tuple[list[str], str]:
    """``etcd://h1:2379,h2:2379[/prefix]`` (``etcds://`` for TLS) -> (endpoint URLs, key prefix).

    >>> parse_url("etcds://[::1]:2379")
    (['https://[::1]:2379'], '/patronus')
    >>> parse_url("http://x")
    Traceback (most recent call last):
    ...
    patronus.errors.ConfigError: --store: 'http://x' is not etcd://host:port[,host:port...][/prefix]
    """
    bad = ConfigError("--store", url, "is not etcd://host:port[,host:port...][/prefix]")
    if not isinstance(url, str) or "://" not in url:
        raise bad
    scheme, rest = url.split("://", 1)
    if scheme not in ("etcd", "etcds"):
        raise bad
    hosts, _, prefix = rest.partition("/")
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else "/patronus"
    proto = "https" if scheme == "etcds" else "http"
    out = []
    for h in hosts.split(","):
        h = h.strip()
        try:
            parts = urlsplit(f"//{h}")
            port = parts.port
        except ValueError:
            raise bad from None
        if not parts.hostname or port is None or any(c in h for c in "@?#"):
            raise bad
        out.append(f"{proto}://{h}")
    if not out or any(c in prefix for c in "?#") or len(prefix) > 100:
        raise bad
    return out, prefix


def _b64(b: bytes | str) -> str:
    return base64.b64encode(b.encode() if isinstance(b, str) else b).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def _end(prefix: str) -> str:
    """The range end of every key starting with ``prefix``."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b).decode()


class _Members:
    """HTTP clients of every endpoint; a call goes to the one that answered
    last and moves on when it cannot (unreachable, timed out, no leader)."""

    def __init__(self, endpoints: list[str], *, ca: str | None, cert: str | None, key: str | None,
                 user: str | None, password: str | None, timeout: float) -> None:
        try:
            import etcd3gw   # an optional dependency
        except ImportError:
            raise StateError("the etcd store needs the etcd3gw client: pip install 'patronus[etcd]'") from None

        self._errors = etcd3gw.exceptions
        self.endpoints = endpoints
        self.clients = []
        for ep in endpoints:
            u = urlsplit(ep)
            c = etcd3gw.Etcd3Client(host=u.hostname or "", port=u.port or 2379, protocol=u.scheme,
                                    ca_cert=ca, cert_cert=cert, cert_key=key, timeout=timeout, api_path="/v3/")
            # the CA given is the one trusted: requests would let REQUESTS_CA_BUNDLE (and proxies) of the
            # environment override it; etcd members are reached directly
            c.session.trust_env = False
            self.clients.append(c)
        self.user, self._password = user, password
        self._i = 0
        self._lock = threading.Lock()
        self.degraded_until = 0.0   # until then, reads go straight to one member's copy
        self.lost_at: float | None = None   # when requests needing a majority began to fail (None: they work)

    def _auth(self, c: Any) -> None:
        if self.user is None:
            return
        r = c.post(c.get_url("/auth/authenticate"), json={"name": self.user, "password": self._password or ""})
        c.session.headers["Authorization"] = r["token"]

    def call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` of a member; StoreUnavailable when none answers.

        A commit (``kv/txn``) goes to another member only when the first
        surely did not take it (refused the connection, had no leader): one
        that timed out may have been applied, so it is not sent twice; the
        caller is told the outcome is unknown."""
        errors = []
        n = len(self.clients)
        start = self._i
        for k in range(n):
            i = (start + k) % n
            c = self.clients[i]
            try:
                if self.user is not None and "Authorization" not in c.session.headers:
                    self._auth(c)
                try:
                    out = c.post(c.get_url(path), json=dict(body))
                except self._errors.Etcd3Exception as e:
                    if self.user is not None and "invalid auth token" in _short(e):
                        self._auth(c)
                        out = c.post(c.get_url(path), json=dict(body))
                    else:
                        raise
                self._i = i
                if not body.get("serializable"):
                    self.lost_at = None   # a linearizable answer: there is a majority
                return out
            except self._errors.Etcd3Exception as e:
                text = _short(e)
                transport = isinstance(e, (self._errors.ConnectionFailedError, self._errors.ConnectionTimeoutError))
                if not transport and not any(w in text for w in _TRANSIENT):
                    raise StateError(f"etcd refused the request ({path}): {text}") from e
                errors.append(f"{self.endpoints[i]}: {text}")
                if path == "kv/txn" and not any(w in text.lower() for w in _NOT_APPLIED):
                    self.degraded_until = time.monotonic() + DEGRADED_S
                    raise StoreUnavailable(
                        f"etcd did not answer the commit in time (no quorum, or overloaded: {errors[-1]}): it "
                        "may or may not have been "
                        "applied (it will be, if at all, when the cluster has a majority); read again before "
                        "retrying") from e
        self.degraded_until = time.monotonic() + DEGRADED_S
        if self.lost_at is None:
            self.lost_at = time.monotonic()
        raise StoreUnavailable(
            "the etcd cluster cannot serve this (no quorum, or no member reachable): " + "; ".join(errors)
            + ". Writes are refused until a majority of members is back; reads answer from one member's "
              "copy, marked stale")

    def stream(self, body: Mapping[str, Any]) -> tuple[Any, Any]:
        """A watch stream on some member: (response, client)."""
        n = len(self.clients)
        for k in range(n):
            i = (self._i + k) % n
            c = self.clients[i]
            try:
                if self.user is not None and "Authorization" not in c.session.headers:
                    self._auth(c)
                # a member that loses its leader ends the watch (it would go quiet, not fail); a stream
                # silent past WATCH_IDLE_S (progress notes come every few minutes) is opened again
                r = c.session.post(c.get_url("/watch"), json=dict(body), stream=True,
                                   timeout=(TIMEOUT_S, WATCH_IDLE_S), headers={"Grpc-Metadata-hasleader": "true"})
                if r.status_code == 200:
                    return r, c
                r.close()
            except Exception:   # unreachable: the next one
                continue
        raise StoreUnavailable("no etcd member answers a watch")


def _short(e: BaseException) -> str:
    detail = getattr(e, "detail_text", None)   # etcd3gw: the server's own words
    try:
        detail = json.loads(detail)["error"] if detail else None
    except (ValueError, KeyError, TypeError):
        pass
    text = " ".join(f"{e} {detail or ''}".split())
    return text[:300] or type(e).__name__


class EtcdTx:
    """One optimistic transaction on etcd (see the module docstring); a
    :class:`patronus.controller.tables.Tx`."""

    def __init__(self, db: EtcdDB, *, readonly: bool = False) -> None:
        self.db = db
        self.readonly = readonly
        self.rev: int | None = None              # the revision every read is taken at
        self._read: dict[str, int] = {}          # key -> mod_revision seen (0: absent)
        self._ranges: list[str] = []             # prefixes listed: no key may appear or change in them
        self._writes: dict[str, bytes | None] = {}   # key -> value, None: delete
        self._lease_writes: dict[str, tuple[bytes, int]] = {}
        self._audits: list[dict[str, Any]] = []
        self.stale = False

    # -- reading ------------------------------------------------------------------------

    def _range(self, key: str, end: str | None = None, **extra: Any) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"key": _b64(key), **extra}
        if end is not None:
            body["range_end"] = _b64(end)
        if self.rev is not None:
            body["revision"] = self.rev
        if self.readonly and not self.stale and time.monotonic() < self.db.members.degraded_until:
            self._mark_stale()
        if self.stale or self.rev is not None:
            # at a revision this transaction has seen: the member that served it has it, no quorum
            # round needed (the commit's compares are what guarantee the rest)
            body["serializable"] = True
        try:
            try:
                r = self.db.members.call("kv/range", body)
            except StateError as e:
                if "future revision" not in str(e):
                    raise
                body.pop("serializable", None)   # another member, behind: ask for a linearizable read
                r = self.db.members.call("kv/range", body)
        except StoreUnavailable:
            if not self.readonly or self.stale:
                raise
            members = self.db.members
            if members.lost_at is not None and time.monotonic() - members.lost_at > STALE_MAX_S:
                raise StoreUnavailable(f"the etcd cluster has had no quorum for more than {STALE_MAX_S:g} s: "
                                       "reads from one member's copy are refused too (revocations since are "
                                       "not in it)") from None
            # no quorum: one member's copy, and the caller is told it may be stale
            self._mark_stale()
            body["serializable"] = True
            body.pop("revision", None)
            self.rev = None
            r = self.db.members.call("kv/range", body)
        if self.rev is None:
            self.rev = int(r["header"]["revision"])
        return r.get("kvs", [])

    def _mark_stale(self) -> None:
        self.stale = True
        box = _stale.get()
        if box is not None:
            box[0] = True

    def raw_get(self, key: str) -> bytes | None:
        """The value of one key (through this transaction's writes)."""
        if key in self._writes:
            return self._writes[key]
        kvs = self._range(key)
        if not kvs:
            self._read.setdefault(key, 0)
            return None
        self._read.setdefault(key, int(kvs[0]["mod_revision"]))
        return _unb64(kvs[0].get("value"))

    def _tombstone(self, key: str) -> str | None:
        """The key a delete of ``key`` bumps, or the one a listing of the
        range ``key`` (ending in ``/``) depends on: one per table's rows
        (``v/t/<table>``) and one per indexed value (``v/i/<table>/<column>/<value>``),
        so a delete is seen by the listings it could change and by no other."""
        if not key.startswith(self.db.prefix + "/"):
            return None
        rest = key[len(self.db.prefix) + 1:]
        if not rest.startswith(("t/", "i/")) or rest.count("/") < 2:
            return None
        return f"{self.db.prefix}/v/{rest.rsplit('/', 1)[0]}"

    def raw_range(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every (key, value) under ``prefix``, by key (through this transaction's writes).

        The commit checks that no key of the range changed or appeared since
        (one range compare) and that nothing of the table was deleted (its
        tombstone key, bumped by every delete): a compare per key would pass
        etcd's limit of 128 a transaction on any table of size."""
        tomb = self._tombstone(prefix)
        if tomb is not None and tomb not in self._read:   # from the store, even after a delete of ours
            kvs = self._range(tomb)
            self._read[tomb] = int(kvs[0]["mod_revision"]) if kvs else 0
        got = {}
        for kv in self._range(prefix, _end(prefix)):
            k = _unb64(kv["key"]).decode()
            got[k] = _unb64(kv.get("value"))
        self._ranges.append(prefix)
        for k, v in self._writes.items():
            if k.startswith(prefix):
                if v is None:
                    got.pop(k, None)
                else:
                    got[k] = v
        return sorted(got.items())

    def raw_put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        if self.readonly:
            raise StateError("a write inside a read-only transaction")
        if lease is not None:
            self._lease_writes[key] = (value, lease)
        self._writes[key] = value

    def raw_delete(self, key: str) -> None:
        if self.readonly:
            raise StateError("a write inside a read-only transaction")
        self._writes[key] = None
        tomb = self._tombstone(key)
        if tomb is not None:   # a transaction that listed the table sees this as a change
            self._writes[tomb] = uuid.uuid4().hex.encode()

    # -- the Tx interface -----------------------------------------------------------------

    def _key(self, name: str, key: str) -> str:
        t = table(name)
        if not isinstance(key, str) or not key:
            raise KeyError(f"{t.name}: the key {key!r} is not a non-empty string")
        return f"{self.db.prefix}/t/{t.name}/{quote(key, safe='')}"

    def _index(self, name: str, column: str, value: Any) -> str:
        """The prefix of the index entries of rows of ``name`` whose ``column`` is ``value``."""
        return f"{self.db.prefix}/i/{name}/{column}/{quote(json.dumps(value), safe='')}/"

    def get(self, name: str, key: str) -> dict[str, Any] | None:
        v = self.raw_get(self._key(name, key))
        return None if v is None else table(name).row(json.loads(v))

    def rows(self, name: str, **equal: Any) -> list[dict[str, Any]]:
        t = table(name)
        for c in equal:
            if c not in t.columns:
                raise KeyError(f"{t.name} has no column {c!r}")
        by = [c for c in equal if c in t.indexes]
        if by:   # the indexes: the transaction depends on the matching rows, not the whole table
            keys: set[str] | None = None
            for c in by:
                these = {unquote(k.rsplit("/", 1)[1]) for k, _ in self.raw_range(self._index(t.name, c, equal[c]))}
                keys = these if keys is None else keys & these
            found = [r for r in (self.get(name, k) for k in sorted(keys or ())) if r is not None]
        else:
            found = [t.row(json.loads(v)) for _, v in self.raw_range(f"{self.db.prefix}/t/{t.name}/")]
        return sorted((r for r in found if all(r[c] == want for c, want in equal.items())), key=lambda r: r[t.key])

    def _write(self, name: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        """Replace row ``old`` by ``new`` (either None), index entries with it."""
        t = table(name)
        row = new if new is not None else old
        assert row is not None
        key = row[t.key]
        for c in t.indexes:
            was = None if old is None else old[c]
            now = None if new is None else new[c]
            if old is not None and (new is None or was != now):
                self.raw_delete(self._index(t.name, c, was) + quote(key, safe=""))
            if new is not None and (old is None or was != now):
                self.raw_put(self._index(t.name, c, now) + quote(key, safe=""), b"")
        if new is None:
            self.raw_delete(self._key(name, key))
        else:
            self.raw_put(self._key(name, key), json.dumps(new).encode())

    def insert(self, name: str, row: Mapping[str, Any]) -> None:
        t = table(name)
        full = t.row(row)
        if self.get(name, full[t.key]) is not None:
            raise Exists(f"{t.name} {full[t.key]!r} exists")
        self._write(name, None, full)

    def put(self, name: str, row: Mapping[str, Any]) -> None:
        t = table(name)
        full = t.row(row)
        old = self.get(name, full[t.key]) if t.indexes else None
        if old is None and not t.indexes:   # no index to keep: a blind write, which never conflicts
            self.raw_put(self._key(name, full[t.key]), json.dumps(full).encode())
            return
        self._write(name, old, full)

    def update(self, name: str, key: str, **values: Any) -> bool:
        t = table(name)
        for c in values:
            if c not in t.columns or c == t.key:
                raise KeyError(f"{t.name} has no column {c!r} to update")
        row = self.get(name, key)
        if row is None:
            return False
        self._write(name, row, {**row, **values})
        return True

    def delete(self, name: str, key: str) -> bool:
        row = self.get(name, key)
        if row is None:
            return False
        self._write(name, row, None)
        return True

    def audit(self, row: dict[str, Any]) -> None:
        if len(self._audits) >= _AUDIT_N:
            raise StateError(f"more than {_AUDIT_N} audit rows in one transaction")
        self._audits.append(row)

    # -- commit ---------------------------------------------------------------------------

    def commit(self) -> int | None:
        """Write everything in one etcd Txn; the revision it made (None: nothing to write).
        StoreConflict when something read has changed since."""
        if self.readonly or (not self._writes and not self._audits):
            return None
        compare = []
        for k, rev in self._read.items():
            compare.append({"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": rev})
        if self.rev is not None:
            for p in set(self._ranges):   # nothing created or changed in a listed table since the snapshot
                compare.append({"key": _b64(p), "range_end": _b64(_end(p)), "target": "MOD", "result": "LESS",
                                "mod_revision": self.rev + 1})
        success = []
        for k, v in self._writes.items():
            if v is None:
                success.append({"request_delete_range": {"key": _b64(k)}})
            else:
                put: dict[str, Any] = {"key": _b64(k), "value": _b64(v)}
                if k in self._lease_writes:
                    put["lease"] = self._lease_writes[k][1]
                success.append({"request_put": put})
        stamp = time.time_ns()
        for n, row in enumerate(self._audits):
            key = f"{self.db.prefix}/audit/{stamp:020d}-{uuid.uuid4().hex[:8]}-{n:03d}"
            success.append({"request_put": {"key": _b64(key), "value": _b64(json.dumps(row))}})
        r = self.db.members.call("kv/txn", {"compare": compare, "success": success})
        if not r.get("succeeded"):
            raise StoreConflict("another controller changed what this change read: nothing was written; "
                                "read again and retry")
        return int(r["header"]["revision"])


class EtcdDB:
    """The controller store on an etcd cluster (the API of
    :class:`~patronus.controller.db.ControllerDB` that the controller uses).

    ``local``: the replica's own SQLite file for raw telemetry. ``clock``
    gives audit timestamps.
    """

    kind = "etcd"

    def __init__(self, url: str, *, local: str | os.PathLike[str], ca: str | None = None, cert: str | None = None,
                 key: str | None = None, user: str | None = None, password: str | None = None,
                 timeout: float = TIMEOUT_S, clock: Callable[[], float] = time.time) -> None:
        endpoints, self.prefix = parse_url(url)
        self.url = url
        self.clock = clock
        self.members = _Members(endpoints, ca=ca, cert=cert, key=key, user=user, password=password,
                                timeout=timeout)
        self._tls = threading.local()
        self.local = ControllerDB(local)
        try:
            self._migrate()
        except BaseException:
            self.local.close()
            raise

    def __repr__(self) -> str:
        return f"EtcdDB({self.url!r})"

    def __enter__(self) -> EtcdDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.local.close()

    # -- schema ---------------------------------------------------------------------------

    def _migrate(self) -> None:
        key = f"{self.prefix}/schema"
        while True:
            t = EtcdTx(self)
            raw = t.raw_get(key)
            current = 0 if raw is None else json.loads(raw).get("version")
            if isinstance(current, bool) or not isinstance(current, int) or current < 0:
                raise StateError(f"{self.url}: {key} is damaged ({raw!r})")
            if current > SCHEMA_VERSION:
                raise SchemaVersionError(f"{self.url} has controller store version {current}, this patronus "
                                         f"reads up to {SCHEMA_VERSION}: upgrade patronus to use it")
            if current == SCHEMA_VERSION:
                return
            for i in range(current, SCHEMA_VERSION):
                MIGRATIONS[i](self, t)
            t.raw_put(key, json.dumps({"version": SCHEMA_VERSION}).encode())
            try:
                t.commit()
                return
            except StoreConflict:   # another replica migrated at the same time: look again
                continue

    @property
    def version(self) -> int:
        with self.reading() as t:
            raw = t.raw_get(f"{self.prefix}/schema")
        return 0 if raw is None else int(json.loads(raw)["version"])

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[EtcdTx]:
        """A read-write transaction, committed when the block ends (nothing
        on an exception); a nested call joins the outer one."""
        outer = getattr(self._tls, "tx", None)
        if outer is not None:
            if outer.readonly:
                raise StateError("a read-write transaction inside a read-only one")
            yield outer
            return
        t = EtcdTx(self)
        self._tls.tx = t
        try:
            yield t
        finally:
            self._tls.tx = None
        t.commit()

    @contextlib.contextmanager
    def reading(self) -> Iterator[EtcdTx]:
        """A read-only transaction: one revision for every read; without
        quorum, one member's copy (marked stale, :func:`stale`)."""
        outer = getattr(self._tls, "tx", None)
        if outer is not None:
            yield outer
            return
        t = EtcdTx(self, readonly=True)
        self._tls.tx = t
        try:
            yield t
        finally:
            self._tls.tx = None

    def current(self) -> EtcdTx | None:
        """The transaction this thread is inside, if any."""
        return getattr(self._tls, "tx", None)

    # -- audit ----------------------------------------------------------------------------

    def audit(self, actor: str, action: str, target: str, before: Any = None, after: Any = None,
              remote: str | None = None, ok: bool = True) -> None:
        """Append one audit row (in the current transaction when inside one)."""
        row = _row_of(self.clock(), actor, action, target, before, after, remote, ok)
        with self.transaction() as t:
            t.audit(row)

    def audit_log(self, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        """Audit rows, newest first (as ``ControllerDB.audit_log``; ids are
        ``create_revision * 1000 + n``)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ConfigError("limit", limit, "is not an integer in 1..1000")
        if before_id is not None and (isinstance(before_id, bool) or not isinstance(before_id, int)):
            raise ConfigError("before_id", before_id, "is not an integer")
        p = f"{self.prefix}/audit/"
        body: dict[str, Any] = {"key": _b64(p), "range_end": _b64(_end(p)), "sort_order": "DESCEND",
                                "sort_target": "CREATE", "limit": limit + _AUDIT_N}
        if before_id is not None:
            if before_id <= _AUDIT_N:
                return []
            body["max_create_revision"] = (before_id - 1) // _AUDIT_N
        with self.reading() as t:
            kvs = t._range(p, _end(p), **{k: v for k, v in body.items() if k not in ("key", "range_end")})
        rows = []
        for kv in kvs:
            k = _unb64(kv["key"]).decode()
            rid = int(kv["create_revision"]) * _AUDIT_N + int(k.rsplit("-", 1)[1])
            if before_id is not None and rid >= before_id:
                continue
            d = json.loads(_unb64(kv.get("value")))
            rows.append({"id": rid, **d})
        rows.sort(key=lambda r: r["id"], reverse=True)
        out = []
        for d in rows[:limit]:
            for k in ("before", "after"):
                d[k] = None if d[k] is None else json.loads(d[k])
            d["ok"] = bool(d["ok"])
            out.append(d)
        return out

    # -- the mesh (one document) -------------------------------------------------------------

    @property
    def mesh_key(self) -> str:
        return f"{self.prefix}/mesh"

    def load_mesh(self, newer_than: int = 0) -> tuple[dict[str, Any] | None, int]:
        """(the mesh as stored, its mod revision); (None, rev) when it has not
        changed since ``newer_than`` (a cheap check) or when there is none (rev 0)."""
        with self.reading() as t:
            extra = {"min_mod_revision": newer_than + 1} if newer_than else {}
            kvs = t._range(self.mesh_key, **extra)
            if not kvs:
                return None, newer_than
            return json.loads(_unb64(kvs[0].get("value"))), int(kvs[0]["mod_revision"])

    def put_event(self, t: EtcdTx, event: dict[str, Any]) -> None:
        """Add a change event to transaction ``t`` (every replica's watch publishes it)."""
        key = f"{self.prefix}/events/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        t.raw_put(key, json.dumps(event, default=str).encode())

    def prune_events(self, older_than_s: float) -> None:
        """Delete change events older than ``older_than_s`` (one DeleteRange)."""
        p = f"{self.prefix}/events/"
        cut = f"{p}{int((time.time() - older_than_s) * 1e9):020d}"
        self.members.call("kv/deleterange", {"key": _b64(p), "range_end": _b64(cut)})

    # -- watching -------------------------------------------------------------------------

    def watch(self, on_event: Callable[[str, bytes | None, int], None], *, start_revision: int,
              stop: threading.Event, on_reset: Callable[[], None] | None = None) -> threading.Thread:
        """Call ``on_event(key, value or None for a delete, mod_revision)`` for
        every change under the prefix from ``start_revision`` on, in a thread,
        until ``stop`` is set; a broken stream resumes on another member from
        the next revision; a compacted start calls ``on_reset`` and goes on
        from now."""
        def loop() -> None:
            nxt = start_revision
            while not stop.is_set():
                try:
                    p = self.prefix + "/"
                    resp, _ = self.members.stream({"create_request": {
                        "key": _b64(p), "range_end": _b64(_end(p)), "start_revision": nxt,
                        "progress_notify": True}})
                except StoreUnavailable:
                    stop.wait(0.2)
                    continue
                try:
                    for line in resp.iter_lines(chunk_size=None):
                        if stop.is_set():
                            break
                        if not line.strip():
                            continue
                        msg = json.loads(line)
                        res = msg.get("result") or {}
                        if "error" in msg:
                            raise ConnectionError(str(msg["error"])[:200])
                        if res.get("compact_revision"):
                            log.warning("etcd watch: revision %d compacted; resynchronising", nxt)
                            if on_reset is not None:
                                on_reset()
                            nxt = int(res["compact_revision"])
                            raise ConnectionError("compacted")
                        if res.get("canceled"):
                            raise ConnectionError("watch canceled")
                        for ev in res.get("events", []):
                            kv = ev["kv"]
                            k = _unb64(kv["key"]).decode()
                            rev = int(kv["mod_revision"])
                            v = None if ev.get("type") == "DELETE" else _unb64(kv.get("value"))
                            try:
                                on_event(k, v, rev)
                            except Exception:
                                log.exception("etcd watch: a listener failed on %s", k)
                            nxt = rev + 1
                        hdr = res.get("header") or {}
                        if not res.get("events") and hdr.get("revision"):
                            nxt = max(nxt, int(hdr["revision"]) + 1) if res.get("created") is None else nxt
                except Exception as e:   # the member went away, a reset: resume elsewhere
                    if not stop.is_set():
                        log.info("etcd watch: %s; resuming from revision %d", _short(e), nxt)
                        stop.wait(0.1)
                finally:
                    with contextlib.suppress(Exception):
                        resp.close()

        th = threading.Thread(target=loop, name="patronus-etcd-watch", daemon=True)
        th.start()
        return th

    def revision(self) -> int:
        """The cluster's current revision."""
        p = self.prefix + "/"
        r = self.members.call("kv/range", {"key": _b64(p), "range_end": _b64(_end(p)), "count_only": True})
        return int(r["header"]["revision"])

    # -- leases ---------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> int:
        r = self.members.call("lease/grant", {"TTL": int(ttl_s)})
        return int(r["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew a lease; its remaining TTL (<= 0: it has expired)."""
        r = self.members.call("lease/keepalive", {"ID": lease})
        return int((r.get("result") or {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        with contextlib.suppress(Exception):
            self.members.call("kv/lease/revoke", {"ID": lease})

    def leadership(self, name: str, ident: str, ttl_s: int = 5) -> Leadership:
        return Leadership(self, name, ident, ttl_s)


class Leadership:
    """A role (``name``) at most one replica holds at a time: the holder's
    key ``leader/<name>`` lives on its lease (``ttl_s``), renewed every
    third of it; when the holder dies the lease expires and another replica
    takes the role as soon as its watch sees the key go: within ``ttl_s`` of
    the holder's last renewal (a poll every quarter of it if a watch event is lost).

    ``is_leader`` is this replica's belief, true only while its last
    renewal is younger than the TTL (so two replicas never both act for
    longer than the clock drift allows).
    """

    def __init__(self, db: EtcdDB, name: str, ident: str, ttl_s: int = 5) -> None:
        if not 1 <= ttl_s <= 3600:
            raise ConfigError("ttl_s", ttl_s, "is not 1..3600 seconds")
        self.db, self.name, self.ident, self.ttl_s = db, name, ident, ttl_s
        self.key = f"{db.prefix}/leader/{name}"
        self._lease: int | None = None
        self._renewed = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()   # the holder's key went (a watch saw it): try now
        self._thread: threading.Thread | None = None
        self.changes = 0   # times this replica took the role
        self.on_change: Callable[[bool], None] | None = None

    @property
    def is_leader(self) -> bool:
        return self._lease is not None and time.monotonic() - self._renewed < self.ttl_s

    def holder(self) -> str | None:
        """The identity of the replica holding the role now (None: nobody)."""
        with self.db.reading() as t:
            v = t.raw_get(self.key)
        return None if v is None else v.decode()

    def start(self) -> Leadership:
        self._thread = threading.Thread(target=self._run, name=f"patronus-leader-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Give the role up now (its lease revoked) and stop trying."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.ttl_s + TIMEOUT_S * 2)
        if self._lease is not None:
            self.db.revoke(self._lease)
            self._lost()

    def _lost(self) -> None:
        was = self._lease is not None
        self._lease = None
        if was:
            log.warning("leader: %s is no longer %s", self.ident, self.name)
            if self.on_change is not None:
                self.on_change(False)

    def _try(self) -> None:
        sent = time.monotonic()   # the lease counts from when etcd took the grant: no later than this
        lease = self.db.grant(self.ttl_s)
        k = _b64(self.key)
        r = self.db.members.call("kv/txn", {
            "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
            "success": [{"request_put": {"key": k, "value": _b64(self.ident), "lease": lease}}]})
        if r.get("succeeded"):
            self._lease, self._renewed = lease, sent
            self.changes += 1
            log.warning("leader: %s is now %s", self.ident, self.name)
            if self.on_change is not None:
                self.on_change(True)
        else:
            self.db.revoke(lease)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._lease is None:
                    self._try()
                else:
                    sent = time.monotonic()
                    if self.db.keepalive(self._lease) > 0:
                        self._renewed = sent
                    else:
                        self._lost()
                        continue
            except Exception as e:   # etcd away: the role lapses with the TTL
                log.info("leader %s: %s", self.name, _short(e))
                if self._lease is not None and not self.is_leader:
                    self._lost()
            self._wake.wait(self.ttl_s / 3 if self._lease is not None else self.ttl_s / 4)
            self._wake.clear()

    def on_watch(self, key: str, value: bytes | None, rev: int) -> None:
        """A change the replica's watch saw: the role's key deleted (its
        holder's lease ran out, or it gave the role up) wakes this replica
        to take it at once, not at its next poll."""
        if key == self.key and value is None and self._lease is None:
            self._wake.set()
