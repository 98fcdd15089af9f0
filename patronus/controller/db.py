"""The controller's SQLite store: users, refresh tokens, API keys, revoked
access tokens and the append-only audit log.

WAL mode, foreign keys on, a ``schema_version`` table with append-only
migrations (as :mod:`patronus.store`). The file is created with mode 0600
(it holds password hashes); an existing file readable by others is
tightened to 0600 when opened.

One connection, shared by every thread that uses this object (FastAPI runs
plain endpoints in a thread pool): every statement and every
:meth:`ControllerDB.transaction` holds a re-entrant lock, so a transaction
is never interleaved with another thread's statements.

>>> import tempfile, os
>>> f = os.path.join(tempfile.mkdtemp(), "ctl.db")
>>> with ControllerDB(f) as db:
...     db.audit("alice", "site.create", "br1", after={"name": "br1"}, remote="10.0.0.9")
...     [(r["actor"], r["action"], r["target"], r["after"], r["ok"]) for r in db.audit_log()]
[('alice', 'site.create', 'br1', {'name': 'br1'}, True)]
>>> oct(os.stat(f).st_mode & 0o777)
'0o600'
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import ConfigError, SchemaVersionError, StateError, quote
from ..store import connect
from .tables import Exists, StoreUnavailable, table

__all__ = ["ControllerDB", "SqliteTx", "SCHEMA_VERSION", "MIGRATIONS", "REDACTED", "redact"]

# Each entry migrates from version i to i + 1. Append only; never edit a
# shipped migration. Statements are split on ';', so none may appear in a comment.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
        pw_hash TEXT NOT NULL,               -- Argon2id, PHC string
        totp_secret TEXT,                    -- AES-GCM sealed (never the plain secret), NULL when none
        totp_enabled INTEGER NOT NULL DEFAULT 0,
        totp_last_step INTEGER,              -- last accepted TOTP time step (replay protection)
        recovery TEXT NOT NULL DEFAULT '[]', -- JSON list of Argon2id hashes of unused recovery codes
        token_gen INTEGER NOT NULL DEFAULT 0, -- bumped to kill every access token of the user
        created REAL NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE refresh_tokens (
        id TEXT PRIMARY KEY,
        family TEXT NOT NULL,
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        token_hash TEXT NOT NULL UNIQUE,     -- sha256 hex of the opaque token
        issued REAL NOT NULL,
        expires REAL NOT NULL,
        used_at REAL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
    CREATE INDEX refresh_tokens_user ON refresh_tokens(user);
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,                -- 'pnk_<id>', safe to show
        hash TEXT NOT NULL,                  -- sha256 hex of the 256-bit random secret
        role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
        created_by TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL,
        last_used REAL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE revoked_jti (
        jti TEXT PRIMARY KEY,
        expires REAL NOT NULL                -- the token's exp: the row may go after it
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        before TEXT,                         -- JSON, secrets redacted
        after TEXT,                          -- JSON, secrets redacted
        remote TEXT,
        ok INTEGER NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END
    """,
    # 2: a mesh change between its two commits (ControllerDB.prepare_change): the
    # audit row it will append, and the versions of the mesh before and after it
    """
    CREATE TABLE pending_change (
        id INTEGER PRIMARY KEY CHECK (id = 1),   -- changes are serialised: at most one
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        before TEXT,
        after TEXT,
        remote TEXT,
        mesh_before TEXT NOT NULL,
        mesh_after TEXT NOT NULL
    )
    """,
    # 3: the agent channel's tables (created by the agent store itself before: IF NOT EXISTS);
    # agent_telemetry is raw telemetry, a replica's own (never in a shared store)
    """
    CREATE TABLE IF NOT EXISTS agent_tokens (
        id TEXT PRIMARY KEY, site TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created_by TEXT NOT NULL,
        created REAL NOT NULL, expires REAL NOT NULL, used REAL, used_by TEXT, revoked INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE IF NOT EXISTS agent_credentials (
        id TEXT PRIMARY KEY, site TEXT NOT NULL, hash TEXT NOT NULL, token_id TEXT, public_key TEXT,
        signing_key TEXT, hostname TEXT, interval_s REAL NOT NULL, created REAL NOT NULL, last_seen REAL,
        last_remote TEXT, revoked INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX IF NOT EXISTS agent_credentials_site ON agent_credentials(site);
    CREATE TABLE IF NOT EXISTS agent_versions (
        site TEXT PRIMARY KEY, version INTEGER NOT NULL, digest TEXT NOT NULL, parts TEXT NOT NULL,
        prev TEXT, updated REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS agent_parts (digest TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS agent_telemetry (
        id INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, received REAL NOT NULL, kind TEXT NOT NULL,
        ts REAL NOT NULL, path TEXT, data TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS agent_telemetry_site ON agent_telemetry(site, kind, ts);
    CREATE TABLE IF NOT EXISTS agent_announcements (
        site TEXT PRIMARY KEY, body TEXT NOT NULL, wg_public_key TEXT NOT NULL, ts REAL NOT NULL,
        received REAL NOT NULL, credential TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS agent_nonces (nonce TEXT PRIMARY KEY, ts REAL NOT NULL)
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Keys whose values never reach the audit log, at any depth of before/after.
_SECRET_KEYS = frozenset({
    "password", "pw_hash", "secret", "totp_secret", "totp", "code", "recovery", "recovery_codes",
    "token", "access", "refresh", "refresh_token", "access_token", "hash", "token_hash", "key",
    "api_key", "authorization",
})
REDACTED = "<redacted>"

_DAMAGE = (sqlite3.Error, ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError)


def redact(value: Any, _depth: int = 0) -> Any:
    """``value`` with the value of every secret-named key replaced, at any
    depth (what :meth:`ControllerDB.audit` stores).

    >>> redact({"name": "alice", "password": "hunter2hunter2", "x": [{"token": "t"}]})
    {'name': 'alice', 'password': '<redacted>', 'x': [{'token': '<redacted>'}]}
    """
    if _depth > 32:
        return REDACTED
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and k.lower() in _SECRET_KEYS else redact(v, _depth + 1))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, _depth + 1) for v in value]
    return value


def _open_0600(path: str) -> None:
    """Create ``path`` with mode 0600 unless it exists (never through a
    symlink); tighten an existing file readable by others to 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        os.close(fd)
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise StateError(f"cannot create the controller store {path!r}: {e}") from e
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{path!r} is a symlink; the controller store must be a regular file")
    if st.st_mode & 0o077:
        os.chmod(path, 0o600)


class SqliteTx:
    """A :class:`patronus.controller.tables.Tx` on the controller database's
    connection, inside ``BEGIN IMMEDIATE`` (so serialisable by the write
    lock). ``execute`` and ``executemany`` reach the connection itself: SQL
    for what is SQLite's alone (migrations, raw telemetry)."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self._con.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        return self._con.executemany(sql, rows)

    def get(self, name: str, key: str) -> dict[str, Any] | None:
        t = table(name)
        row = self._con.execute(f"SELECT * FROM {t.name} WHERE {t.key} = ?", (key,)).fetchone()
        return None if row is None else dict(row)

    def rows(self, name: str, **equal: Any) -> list[dict[str, Any]]:
        t = table(name)
        for c in equal:
            if c not in t.columns:
                raise KeyError(f"{t.name} has no column {c!r}")
        where = " AND ".join(f"{c} IS ?" for c in equal)
        sql = f"SELECT * FROM {t.name}" + (f" WHERE {where}" if where else "") + f" ORDER BY {t.key}"
        return [dict(r) for r in self._con.execute(sql, tuple(equal.values()))]

    def insert(self, name: str, row: Any) -> None:
        t = table(name)
        full = t.row(row)
        try:
            self._con.execute(f"INSERT INTO {t.name} ({', '.join(full)}) VALUES ({', '.join('?' * len(full))})",
                              tuple(full.values()))
        except sqlite3.IntegrityError as e:
            if self.get(name, full[t.key]) is not None:
                raise Exists(f"{t.name} {full[t.key]!r} exists") from None
            raise ConfigError(f"{t.name}", full[t.key], f"breaks a constraint: {e}") from e

    def put(self, name: str, row: Any) -> None:
        t = table(name)
        full = t.row(row)
        self._con.execute(f"INSERT OR REPLACE INTO {t.name} ({', '.join(full)}) "
                          f"VALUES ({', '.join('?' * len(full))})", tuple(full.values()))

    def update(self, name: str, key: str, **values: Any) -> bool:
        t = table(name)
        for c in values:
            if c not in t.columns or c == t.key:
                raise KeyError(f"{t.name} has no column {c!r} to update")
        if not values:
            return self.get(name, key) is not None
        sets = ", ".join(f"{c} = ?" for c in values)
        return self._con.execute(f"UPDATE {t.name} SET {sets} WHERE {t.key} = ?",
                                 (*values.values(), key)).rowcount > 0

    def delete(self, name: str, key: str) -> bool:
        t = table(name)
        return self._con.execute(f"DELETE FROM {t.name} WHERE {t.key} = ?", (key,)).rowcount > 0


class ControllerDB:
    """An open controller store; use as a context manager.

    ``create=False`` refuses a missing file. ``clock`` gives the audit
    timestamps (wall-clock seconds), injectable for tests.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = os.fspath(path)
        self.clock = clock
        if not create and not os.path.exists(self.path):
            raise StateError(f"no controller store at {self.path!r}")
        _open_0600(self.path)
        self._lock = threading.RLock()
        self._depth = 0   # nesting of transaction(): only the outermost begins and commits
        self._db = connect(self.path, "controller store", check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._migrate()
        except StateError:
            self._db.close()
            raise
        except _DAMAGE as e:
            self._db.close()
            raise StateError(f"{self.path!r} is not a usable controller store: {e}") from e

    def __enter__(self) -> ControllerDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"ControllerDB({self.path!r})"

    # -- schema -----------------------------------------------------------------

    def _migrate(self) -> None:
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            current = 0 if row is None else row[0]
            if isinstance(current, bool) or not isinstance(current, int) or current < 0:
                raise StateError(f"{self.path!r} is damaged (schema_version): {quote(current)} is not a version")
            if current > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path!r} has controller schema version {current}, this patronus reads up to "
                    f"{SCHEMA_VERSION}: upgrade patronus to open it")
            for i in range(current, SCHEMA_VERSION):
                # a trigger body holds ';' inside BEGIN ... END: keep those together
                for stmt in _statements(MIGRATIONS[i]):
                    db.execute(stmt)
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            else:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @property
    def version(self) -> int:
        """The schema version of the file."""
        row = self.query("SELECT version FROM schema_version")
        return int(row[0]["version"])

    # -- access -----------------------------------------------------------------

    kind = "sqlite"

    @property
    def local(self) -> ControllerDB:
        """Where this replica keeps what is its own (raw agent telemetry): this database itself."""
        return self

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SqliteTx]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception),
        holding this object's lock throughout; yields a :class:`SqliteTx`. A
        nested call joins the outer transaction (the outermost commits).

        >>> import tempfile, os
        >>> db = ControllerDB(os.path.join(tempfile.mkdtemp(), "c.db"))
        >>> with db.transaction() as c:
        ...     _ = c.execute("INSERT INTO revoked_jti VALUES ('j1', 1.0)")
        >>> [r["jti"] for r in db.query("SELECT jti FROM revoked_jti")]
        ['j1']
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield SqliteTx(self._db)
                finally:
                    self._depth -= 1
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"{self.path!r}: cannot begin a transaction: {e}") from e
            except sqlite3.Error as e:
                raise StateError(f"{self.path!r}: cannot begin a transaction: {e}") from e
            self._depth = 1
            try:
                yield SqliteTx(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
            finally:
                self._depth = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[SqliteTx]:
        """A transaction that only reads (on etcd it may answer from one member,
        marked stale, when the cluster has no quorum); here, :meth:`transaction`."""
        with self.transaction() as t:
            yield t

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Every row of one read statement (under the lock; inside the
        current transaction when called from one)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        """One write statement in its own transaction (or the current one);
        the number of rows it changed."""
        with self.transaction() as db:
            return db.execute(sql, params).rowcount

    # -- audit ------------------------------------------------------------------

    def _row(self, actor: str, action: str, target: str, before: Any, after: Any, remote: str | None,
             ok: bool) -> tuple[Any, ...]:
        return tuple(_row_of(self.clock(), actor, action, target, before, after, remote, ok).values())

    def audit(self, actor: str, action: str, target: str, before: Any = None, after: Any = None,
              remote: str | None = None, ok: bool = True) -> None:
        """Append one audit row. ``before``/``after`` are stored as JSON with
        every secret-named key redacted (:func:`redact`); values JSON cannot
        hold are stored as their ``str``. Inside a transaction the row is
        part of it (a rolled-back change leaves no row)."""
        row = self._row(actor, action, target, before, after, remote, ok)
        with self.transaction() as db:
            db.execute("INSERT INTO audit (ts, actor, action, target, before, after, remote, ok) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    # -- a change of the state file, committed in two files -------------------------

    def prepare_change(self, actor: str, action: str, target: str, before: Any, after: Any,
                       remote: str | None, mesh_before: str, mesh_after: str) -> None:
        """Record (committed) a mesh change about to be saved to the state
        file: the audit row it will become and the mesh's versions before and
        after it. :meth:`finish_change` then appends the row (or a refusal);
        after a crash the state file says which (``Service`` settles it when
        it starts). StateError while another change is pending."""
        row = self._row(actor, action, target, before, after, remote, True)
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM pending_change").fetchone():
                raise StateError(f"{self.path!r}: another change is pending")
            db.execute("INSERT INTO pending_change (id, ts, actor, action, target, before, after, remote, "
                       "mesh_before, mesh_after) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (*row[:7], mesh_before, mesh_after))

    def pending_change(self) -> dict[str, Any] | None:
        """The change :meth:`prepare_change` recorded and nothing finished yet, or None."""
        rows = self.query("SELECT * FROM pending_change")
        return dict(rows[0]) if rows else None

    def finish_change(self, applied: bool, error: str | None = None) -> None:
        """End the pending change, in one transaction: append its audit row
        when ``applied``, else the row of a refusal (ok false, ``error``)."""
        with self.transaction() as db:
            if applied:
                db.execute("INSERT INTO audit (ts, actor, action, target, before, after, remote, ok) "
                           "SELECT ts, actor, action, target, before, after, remote, 1 FROM pending_change")
            else:
                db.execute("INSERT INTO audit (ts, actor, action, target, before, after, remote, ok) "
                           "SELECT ts, actor, action, target, NULL, ?, remote, 0 FROM pending_change",
                           (_json({"error": error or "not applied"}),))
            db.execute("DELETE FROM pending_change")

    def audit_log(self, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        """Audit rows, newest first: at most ``limit`` (1..1000) of them, with
        ids below ``before_id`` when given (the next page: the last id seen).
        Each is ``{id, ts, actor, action, target, before, after, remote, ok}``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ConfigError("limit", limit, "is not an integer in 1..1000")
        if before_id is not None and (isinstance(before_id, bool) or not isinstance(before_id, int)):
            raise ConfigError("before_id", before_id, "is not an integer")
        sql = "SELECT id, ts, actor, action, target, before, after, remote, ok FROM audit"
        params: tuple[Any, ...] = ()
        if before_id is not None:
            sql += " WHERE id < ?"
            params = (before_id,)
        rows = self.query(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        out = []
        for r in rows:
            d = dict(r)
            for k in ("before", "after"):
                try:
                    d[k] = None if d[k] is None else json.loads(d[k])
                except (ValueError, TypeError, RecursionError) as e:
                    raise StateError(f"{self.path!r} is damaged (audit {d['id']}.{k}): {e}") from e
            d["ok"] = bool(d["ok"])
            out.append(d)
        return out


def _row_of(ts: float, actor: str, action: str, target: str, before: Any, after: Any, remote: str | None,
            ok: bool) -> dict[str, Any]:
    """One audit row (ts, actor, action, target, before, after, remote, ok), bounded and redacted;
    ConfigError for a name that is not a string."""
    for field, v in (("actor", actor), ("action", action), ("target", target)):
        if not isinstance(v, str):
            raise ConfigError(f"audit.{field}", v, "is not a string")
    return {"ts": ts, "actor": actor[:200], "action": action[:100], "target": target[:200],
            "before": _json(before), "after": _json(after), "remote": None if remote is None else str(remote)[:200],
            "ok": int(bool(ok))}


def _json(value: Any) -> str | None:
    """JSON text of a redacted audit value; None stays NULL."""
    if value is None:
        return None
    try:
        return json.dumps(redact(value), sort_keys=True, default=str, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        # NaN, a cycle, keys JSON cannot hold: the text form, still redacted
        return json.dumps(str(redact(value)))


def _statements(script: str) -> list[str]:
    """The statements of a migration: split on ';' except inside a
    ``BEGIN ... END`` trigger body."""
    out: list[str] = []
    buf = ""
    for part in script.split(";"):
        buf = f"{buf};{part}" if buf else part
        opens = len([w for w in buf.upper().split() if w == "BEGIN"])
        ends = len([w for w in buf.upper().split() if w == "END"])
        if opens <= ends:
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
