"""Durable state in SQLite (standard library): the mesh, and the records
other layers write (path metrics, failover events, flow snapshots).

WAL mode, foreign keys on, one transaction per save, a schema version table
with forward migrations. A save is atomic: a crash in the middle leaves the
previous state loadable, because the old rows are only replaced inside the
same transaction that writes the new ones.

Every read (``load_mesh``, ``events``, ``path_metrics``, ``flow_snapshots``)
of a damaged or hostile file (truncated, not SQLite, rows of the wrong type,
invalid JSON or UTF-8) raises :class:`StateError` naming the file and what
was wrong, never a sqlite3, JSON or Unicode error.

Timestamps (``ts``) are wall-clock seconds (``time.time()``). The records
grow without bound unless pruned: ``Store.prune()`` deletes rows older than
``RETENTION_S`` (7 days of path metrics and flow snapshots, 30 days of
failover events) and keeps at most ``MAX_ROWS`` rows of each table.

``save_mesh(mesh, path)`` and ``load_mesh(path)`` open the file for one
call (``patronus.save_mesh`` / ``patronus.load_mesh`` are the same
functions); ``Store`` keeps it open for the records.

>>> import tempfile, os
>>> from patronus import Mesh
>>> f = os.path.join(tempfile.mkdtemp(), "state.db")
>>> save_mesh(Mesh("acme"), f); load_mesh(f).name
'acme'
>>> with Store(f) as st: st.load_mesh() == load_mesh(f)
True
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from . import _validate as v
from .errors import ConfigError, SchemaVersionError, StateError, quote
from .mesh import Mesh
from .model import Path as MeshPath

__all__ = ["Store", "save_mesh", "load_mesh", "SCHEMA_VERSION", "RETENTION_S", "MAX_ROWS", "flow_records"]

# Each entry migrates from version i to i + 1. Append only; never edit a
# shipped migration. Statements are split on ';', so none may appear in a comment.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE mesh (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        name TEXT NOT NULL,
        failover TEXT NOT NULL,          -- JSON of Failover.to_dict()
        saved_at REAL NOT NULL
    );
    CREATE TABLE profiles (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL UNIQUE,
        body TEXT NOT NULL               -- JSON of AppProfile.to_dict()
    );
    CREATE TABLE sites (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL UNIQUE
    );
    CREATE TABLE site_subnets (
        site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        cidr TEXT NOT NULL,
        PRIMARY KEY (site, position)
    );
    CREATE TABLE uplinks (
        site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        position INTEGER NOT NULL,
        address TEXT NOT NULL,
        mtu INTEGER NOT NULL,
        port INTEGER,
        nat INTEGER NOT NULL,
        bandwidth_mbps REAL,
        cost INTEGER NOT NULL,
        PRIMARY KEY (site, name)
    );
    CREATE TABLE paths (
        id TEXT PRIMARY KEY,
        idx INTEGER NOT NULL UNIQUE,
        local_site TEXT NOT NULL,
        local_uplink TEXT NOT NULL,
        remote_site TEXT NOT NULL,
        remote_uplink TEXT NOT NULL,
        FOREIGN KEY (local_site, local_uplink) REFERENCES uplinks(site, name) ON DELETE CASCADE,
        FOREIGN KEY (remote_site, remote_uplink) REFERENCES uplinks(site, name) ON DELETE CASCADE
    );
    CREATE TABLE policies (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL UNIQUE,
        priority INTEGER NOT NULL UNIQUE,
        app TEXT NOT NULL,
        src TEXT, dst TEXT,
        sport_lo INTEGER, sport_hi INTEGER,
        dport_lo INTEGER, dport_hi INTEGER,
        proto INTEGER, dscp INTEGER,
        qos_dscp INTEGER, qos_rate_kbps INTEGER,
        prefer TEXT NOT NULL,            -- JSON list of uplink names
        action TEXT NOT NULL
    );
    -- Filled by later layers: a mesh save never touches them.
    CREATE TABLE path_metrics (
        ts REAL NOT NULL,
        path TEXT NOT NULL,
        rtt_ms REAL, jitter_ms REAL, loss_pct REAL, mos REAL, mtu INTEGER, bandwidth_mbps REAL
    );
    CREATE INDEX path_metrics_path_ts ON path_metrics(path, ts);
    CREATE TABLE failover_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        policy TEXT,
        from_path TEXT, to_path TEXT,
        reason TEXT NOT NULL,
        detail TEXT
    );
    CREATE TABLE flow_snapshots (
        ts REAL NOT NULL,
        site TEXT,
        src TEXT NOT NULL, dst TEXT NOT NULL,
        sport INTEGER NOT NULL, dport INTEGER NOT NULL, proto INTEGER NOT NULL,
        packets INTEGER NOT NULL, bytes INTEGER NOT NULL,
        first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL,
        policy TEXT, path INTEGER, tcp_flags INTEGER NOT NULL
    );
    """,
    # 2: the peer-discovery registry (patronus.wireguard.discovery)
    """
    CREATE TABLE enroll_tokens (
        token_hash BLOB PRIMARY KEY,
        site TEXT NOT NULL,
        expires REAL NOT NULL,
        used REAL
    );
    CREATE TABLE site_keys (
        site TEXT NOT NULL,
        public_key BLOB NOT NULL UNIQUE,
        enrolled REAL NOT NULL
    );
    CREATE TABLE announcements (
        site TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        ts REAL NOT NULL,
        received REAL NOT NULL
    );
    CREATE TABLE seen_nonces (
        nonce BLOB PRIMARY KEY,
        ts REAL NOT NULL
    );
    """,
    # 3: several port ranges and protocols per policy. sports/dports are the
    # string form ('5060-5061,10000-20000'), protos the numbers ('6,17'),
    # NULL for any. The lo/hi and proto columns stay filled when there is one
    # range or one protocol, NULL otherwise.
    """
    ALTER TABLE policies ADD COLUMN sports TEXT;
    ALTER TABLE policies ADD COLUMN dports TEXT;
    ALTER TABLE policies ADD COLUMN protos TEXT
    """,
    # 4: a move's destination site (a class has a path per remote site)
    """
    ALTER TABLE failover_events ADD COLUMN site TEXT
    """,
    # 5: a policy's packets copied onto a second path (QoS.duplicate), 0 or 1
    """
    ALTER TABLE policies ADD COLUMN qos_duplicate INTEGER NOT NULL DEFAULT 0
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_CONFIG_TABLES = ("paths", "uplinks", "site_subnets", "sites", "policies", "profiles", "mesh")

# Retention of the records (Store.prune): age in seconds, and a row cap per table.
RETENTION_S: dict[str, float] = {
    "path_metrics": 7 * 86400.0,
    "flow_snapshots": 7 * 86400.0,
    "failover_events": 30 * 86400.0,
}
MAX_ROWS: dict[str, int] = {
    "path_metrics": 1_000_000,
    "flow_snapshots": 1_000_000,
    "failover_events": 100_000,
}

# What a damaged or hostile file can make a read raise (turned into StateError).
_DAMAGE = (sqlite3.Error, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
           OverflowError)


def connect(path: str, what: str, **kw: Any) -> sqlite3.Connection:
    """A SQLite connection the way every patronus store uses one: autocommit
    (transactions are explicit BEGIN ... COMMIT), foreign keys, WAL; a file
    that is not SQLite is a StateError naming ``what``."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=10.0, **kw)
    except sqlite3.Error as e:
        raise StateError(f"{path!r} is not a usable {what}: {e}") from e
    try:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
    except _DAMAGE as e:  # a damaged file fails here in many ways
        db.close()
        raise StateError(f"{path!r} is not a usable {what}: {e}") from e
    return db

_NUM = (int, float)
_INT = (int,)
_TEXT = (str,)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_TEXT = (str, type(None))
# Column types of the records, checked on read.
_RECORD_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "failover_events": {"id": _INT, "ts": _NUM, "policy": _OPT_TEXT, "site": _OPT_TEXT, "from_path": _OPT_TEXT,
                        "to_path": _OPT_TEXT, "reason": _TEXT, "detail": _OPT_TEXT},
    "path_metrics": {"ts": _NUM, "path": _TEXT, "rtt_ms": _OPT_NUM, "jitter_ms": _OPT_NUM, "loss_pct": _OPT_NUM,
                     "mos": _OPT_NUM, "mtu": _OPT_INT, "bandwidth_mbps": _OPT_NUM},
    "flow_snapshots": {"ts": _NUM, "site": _OPT_TEXT, "src": _TEXT, "dst": _TEXT, "sport": _INT, "dport": _INT,
                       "proto": _INT, "packets": _INT, "bytes": _INT, "first_ns": _INT, "last_ns": _INT,
                       "policy": _OPT_TEXT, "path": _OPT_INT, "tcp_flags": _INT},
    "mesh": {"saved_at": _NUM},   # when the mesh was last saved: what tells a reader it changed
}


def flow_records(flows: Any, policy_names: list[str]) -> list[dict[str, Any]]:
    """``abi.FLOW_DTYPE`` rows as plain records: addresses as text, the policy
    by name (None when out of range), the path index (None for no path).

    >>> flow_records([], [])
    []
    """
    import ipaddress

    from .abi import NO_PATH  # here, not at the top: abi loads numpy, the rest of the store does not need it

    out = []
    for r in flows:
        conv = (lambda b: str(ipaddress.IPv4Address(bytes(b)[:4]))) if int(r["family"]) == 4 else \
            (lambda b: str(ipaddress.IPv6Address(bytes(b))))
        pol, path = int(r["policy"]), int(r["path"])
        out.append({"src": conv(r["src"]), "dst": conv(r["dst"]), "sport": int(r["sport"]), "dport": int(r["dport"]),
                    "proto": int(r["proto"]), "packets": int(r["packets"]), "bytes": int(r["bytes"]),
                    "first_ns": int(r["first_ns"]), "last_ns": int(r["last_ns"]),
                    "policy": policy_names[pol] if 0 <= pol < len(policy_names) else None,
                    "path": None if path == NO_PATH else path, "tcp_flags": int(r["tcp_flags"])})
    return out


class Store:
    """An open state file. Use as a context manager.

    ``create=False`` refuses to create a missing file (as ``load_mesh`` does).
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = os.fspath(path)
        if not create and not os.path.exists(self.path):
            raise StateError(f"no state file at {self.path!r}")
        self._db = connect(self.path, "patronus state file")
        try:
            self._migrate()
        except StateError:
            self._db.close()
            raise
        except _DAMAGE as e:
            self._db.close()
            raise StateError(f"{self.path!r} is not a usable patronus state file: {e}") from e

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @property
    def version(self) -> int:
        try:
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
        except _DAMAGE as e:
            raise self._damaged("schema_version", e) from e
        return self._schema_version(row)

    def _damaged(self, what: str, e: BaseException) -> StateError:
        msg = str(e)
        if len(msg) > 300:   # sqlite quotes the undecodable text in full
            msg = f"{msg[:300]}... ({len(msg)} characters)"
        return StateError(f"{self.path!r} is damaged ({what}): {type(e).__name__}: {msg}")

    def _schema_version(self, row: Any) -> int:
        if row is None:
            raise StateError(f"{self.path!r} is damaged (schema_version): no version row")
        if isinstance(row[0], bool) or not isinstance(row[0], int) or not 0 <= row[0] <= 1 << 30:
            raise StateError(f"{self.path!r} is damaged (schema_version): version {quote(row[0])} "
                             "is not a schema version")
        return int(row[0])

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            current = 0 if row is None else self._schema_version(row)
            if current > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path!r} has schema version {current}, this patronus reads up to "
                    f"{SCHEMA_VERSION}: upgrade patronus to open it"
                )
            for i in range(current, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            else:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    # -- mesh ----------------------------------------------------------------

    def _topology(self) -> list[tuple[str, tuple[str, ...]]]:
        """The stored sites in order, each with its uplink names in order."""
        ups: dict[str, list[str]] = {}
        for site, name in self._db.execute("SELECT site, name FROM uplinks ORDER BY site, position"):
            ups.setdefault(site, []).append(name)
        return [(n, tuple(ups.get(n, ()))) for (n,) in self._db.execute("SELECT name FROM sites ORDER BY position")]

    def save_mesh(self, mesh: Mesh) -> None:
        """Replace the stored mesh with ``mesh`` in one transaction. The path
        rows are rewritten only when the topology (sites in order, their
        uplink names) changed: a policy change on a 1,000-site mesh does not
        rewrite its 499,500 paths."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            old = self._topology() if db.execute("SELECT 1 FROM mesh").fetchone() is not None else []
            new = [(x.name, tuple(u.name for u in x.uplinks)) for x in mesh.sites]
            same = bool(old) and old == new
            # sites appended (the others as they were): their paths are appended too
            grown = bool(old) and len(new) > len(old) and new[:len(old)] == old
            for t in _CONFIG_TABLES:
                if not ((same or grown) and t in ("paths", "uplinks", "sites")):   # the paths hang on the uplinks
                    db.execute(f"DELETE FROM {t}")
            db.execute(
                "INSERT INTO mesh VALUES (1, ?, ?, ?)",
                (mesh.name, json.dumps(mesh.failover.to_dict()), time.time()),
            )
            for i, prof in enumerate(mesh.to_dict()["profiles"]):
                db.execute("INSERT INTO profiles VALUES (?, ?, ?)", (prof["name"], i, json.dumps(prof)))
            for i, s in enumerate(mesh.sites):
                kept = same or (grown and i < len(old))
                if not kept:
                    db.execute("INSERT INTO sites VALUES (?, ?)", (s.name, i))
                db.executemany(
                    "INSERT INTO site_subnets VALUES (?, ?, ?)",
                    [(s.name, j, c) for j, c in enumerate(s.subnets)],
                )
                if kept:   # the same rows: their values may have changed
                    db.executemany(
                        "UPDATE uplinks SET address = ?, mtu = ?, port = ?, nat = ?, bandwidth_mbps = ?, cost = ? "
                        "WHERE site = ? AND name = ?",
                        [(u.address, u.mtu, u.port, int(u.nat), u.bandwidth_mbps, u.cost, s.name, u.name)
                         for u in s.uplinks],
                    )
                    continue
                db.executemany(
                    "INSERT INTO uplinks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (s.name, u.name, j, u.address, u.mtu, u.port, int(u.nat), u.bandwidth_mbps, u.cost)
                        for j, u in enumerate(s.uplinks)
                    ],
                )
            if not same:
                db.executemany(
                    "INSERT INTO paths VALUES (?, ?, ?, ?, ?, ?)",
                    [(p.id, p.index, p.local_site, p.local_uplink, p.remote_site, p.remote_uplink)
                     for p in (_appended_paths(mesh, len(old)) if grown else mesh.paths())],
                )
            for i, p in enumerate(mesh.policies):
                m = p.match
                # one range or one protocol: also in the simple columns, for SQL users
                sp = m.src_ports[0] if m.src_ports and len(m.src_ports) == 1 else (None, None)
                dp = m.dst_ports[0] if m.dst_ports and len(m.dst_ports) == 1 else (None, None)
                db.execute(
                    "INSERT INTO policies (name, position, priority, app, src, dst, sport_lo, sport_hi, "
                    "dport_lo, dport_hi, proto, dscp, qos_dscp, qos_rate_kbps, prefer, action, sports, dports, "
                    "protos, qos_duplicate) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (p.name, i, p.priority, p.app, m.src, m.dst, sp[0], sp[1], dp[0], dp[1],
                     m.proto if isinstance(m.proto, int) else None, m.dscp,
                     p.qos.dscp, p.qos.rate_kbps, json.dumps(list(p.prefer)), p.action,
                     m.src_ports_text, m.dst_ports_text, ",".join(map(str, m.protos)) or None, int(p.qos.duplicate)),
                )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def load_mesh(self) -> Mesh:
        """The stored mesh, validated as if it were built by hand; StateError
        naming the file and the fault when it is missing, damaged or invalid."""
        db = self._db
        where = "mesh"
        try:
            db.execute("BEGIN")  # one snapshot for every read
            try:
                row = db.execute("SELECT name, failover FROM mesh").fetchone()
                if row is None:
                    raise StateError(f"{self.path!r} holds no saved mesh")
                d: dict[str, Any] = {"name": row[0], "failover": self._json(row[1], "mesh.failover"),
                                     "sites": [], "policies": []}
                where = "profiles"
                d["profiles"] = [self._json(b, "profiles.body")
                                 for (b,) in db.execute("SELECT body FROM profiles ORDER BY position")]
                where = "sites"
                for (name,) in db.execute("SELECT name FROM sites ORDER BY position").fetchall():
                    where = "site_subnets"
                    subnets = [c for (c,) in db.execute(
                        "SELECT cidr FROM site_subnets WHERE site = ? ORDER BY position", (name,))]
                    where = "uplinks"
                    uplinks = [
                        {"name": u[0], "address": u[1], "mtu": u[2], "port": u[3], "nat": bool(u[4]),
                         "bandwidth_mbps": u[5], "cost": u[6]}
                        for u in db.execute(
                            "SELECT name, address, mtu, port, nat, bandwidth_mbps, cost FROM uplinks "
                            "WHERE site = ? ORDER BY position", (name,))
                    ]
                    d["sites"].append({"name": name, "subnets": subnets, "uplinks": uplinks})
                where = "policies"
                for r in db.execute(
                    "SELECT name, priority, app, src, dst, sport_lo, sport_hi, dport_lo, dport_hi, proto, dscp, "
                    "qos_dscp, qos_rate_kbps, prefer, action, sports, dports, protos, qos_duplicate FROM policies "
                    "ORDER BY position"
                ):
                    # the text columns (schema 3) when set, else the columns of rows written before them
                    d["policies"].append({
                        "name": r[0], "priority": r[1], "app": r[2],
                        "match": {"src": r[3], "dst": r[4],
                                  "src_ports": r[15] if r[15] is not None else None if r[5] is None else (r[5], r[6]),
                                  "dst_ports": r[16] if r[16] is not None else None if r[7] is None else (r[7], r[8]),
                                  "proto": r[17] if r[17] is not None else r[9], "dscp": r[10]},
                        # 0/1 as stored; anything else reaches the model as is and is refused by name
                        "qos": {"dscp": r[11], "rate_kbps": r[12], "duplicate": {0: False, 1: True}.get(r[18], r[18])},
                        "prefer": self._json(r[13], "policies.prefer"), "action": r[14],
                    })
                db.execute("COMMIT")
            finally:
                self._rollback()
        except StateError:
            raise
        except _DAMAGE as e:
            raise self._damaged(where, e) from e
        try:
            return Mesh.from_dict(d)
        except ConfigError as e:
            raise StateError(f"{self.path!r} holds an invalid mesh: {e}") from e
        except _DAMAGE as e:
            raise StateError(f"{self.path!r} holds an invalid mesh: {type(e).__name__}: {e}") from e

    def _json(self, text: Any, where: str) -> Any:
        """A JSON column: StateError naming it when it is not JSON text."""
        if not isinstance(text, str):
            raise StateError(f"{self.path!r} is damaged ({where}): {quote(text)} is not JSON text")
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise StateError(f"{self.path!r} is damaged ({where}): invalid JSON: {e}") from e

    def records(self, table: str, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows of a record table (path_metrics, failover_events,
        flow_snapshots) read by a SELECT ``query`` with ``params``, as dicts,
        every column checked to be of the type it is written with (a damaged
        file is a StateError, never a wrong value)."""
        if not query.lstrip().upper().startswith("SELECT"):
            raise ConfigError("Store.records", query[:40], "is not a SELECT: records are read-only here")
        types = _RECORD_TYPES[table]
        try:
            cur = self._db.execute(query, params)
            cols = [c[0] for c in cur.description]
            rows = [dict(zip(cols, r)) for r in cur]
        except _DAMAGE as e:
            raise self._damaged(table, e) from e
        for row in rows:
            for col, val in row.items():
                ok = types.get(col)
                if ok is not None and (isinstance(val, bool) or not isinstance(val, ok)):
                    raise StateError(f"{self.path!r} is damaged ({table}.{col}): {quote(val)} is not "
                                     f"{'a number' if ok[0] is int and float in ok else ok[0].__name__}")
        return rows

    # -- records (path metrics, failover events, flow snapshots) ---------------

    def add_event(self, reason: str, *, policy: str | None = None, from_path: str | None = None,
                  to_path: str | None = None, detail: str | None = None, ts: float | None = None,
                  site: str | None = None) -> None:
        """Append one failover event (its own transaction)."""
        self._db.execute(
            "INSERT INTO failover_events (ts, policy, site, from_path, to_path, reason, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time() if ts is None else ts, policy, site, from_path, to_path, reason, detail),
        )

    def add_path_metrics(self, ts: float, rows: list[tuple[str, Any, Any, Any, Any, Any, Any]]) -> None:
        """Append one measurement per path: (path, rtt_ms, jitter_ms, loss_pct,
        mos, mtu, bandwidth_mbps); NaN is stored as NULL."""
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and v != v else v

        self._db.executemany("INSERT INTO path_metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             [(ts, *[clean(v) for v in r]) for r in rows])

    def path_metrics(self, path: str | None = None) -> list[dict[str, Any]]:
        """The stored measurements (of one path), oldest first."""
        q = "SELECT ts, path, rtt_ms, jitter_ms, loss_pct, mos, mtu, bandwidth_mbps FROM path_metrics"
        return self.records("path_metrics", q + (" WHERE path = ? ORDER BY ts" if path else " ORDER BY ts"),
                             (path,) if path else ())

    def add_flow_snapshot(self, ts: float, site: str, flows: Any, policy_names: list[str]) -> int:
        """Append the flow records of one snapshot (``abi.FLOW_DTYPE`` rows)."""
        return self.add_flow_records(ts, site, flow_records(flows, policy_names))

    def add_flow_records(self, ts: float, site: str, records: list[dict[str, Any]]) -> int:
        """Append flow records as :func:`flow_records` makes them (``path``
        an index into ``Mesh.paths()`` or None)."""
        self._db.executemany(
            "INSERT INTO flow_snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(ts, site, r["src"], r["dst"], r["sport"], r["dport"], r["proto"], r["packets"], r["bytes"],
              r["first_ns"], r["last_ns"], r["policy"], r["path"], r["tcp_flags"]) for r in records])
        return len(records)

    def flow_snapshots(self) -> list[dict[str, Any]]:
        """The stored flow records, oldest first."""
        return self.records("flow_snapshots", "SELECT * FROM flow_snapshots ORDER BY ts")

    def events(self) -> list[dict[str, Any]]:
        """All failover events, oldest first; ``ts`` is wall-clock time."""
        return self.records(
            "failover_events",
            "SELECT id, ts, policy, site, from_path, to_path, reason, detail FROM failover_events ORDER BY id")

    # -- retention -------------------------------------------------------------

    def prune(self, older_than_s: float | None = None, *, max_rows: int | None = None,
              now: float | None = None) -> dict[str, int]:
        """Delete old records, in one transaction; returns the rows deleted per table.

        Deletes the rows of ``path_metrics``, ``flow_snapshots`` and
        ``failover_events`` older than ``older_than_s`` seconds before ``now``
        (default ``time.time()``); without ``older_than_s``, each table's
        ``RETENTION_S`` (7 days of metrics and snapshots, 30 days of events).
        Then each table keeps at most ``max_rows`` rows, the newest written
        (default ``MAX_ROWS``: 1,000,000 metrics, 1,000,000 flow records,
        100,000 events). The mesh and the discovery tables are never touched.
        """
        if older_than_s is not None:
            older_than_s = v.number("Store.prune.older_than_s", older_than_s, 0)
        if max_rows is not None:
            max_rows = v.integer("Store.prune.max_rows", max_rows, 0, 2**62)
        now = time.time() if now is None else v.number("Store.prune.now", now, -math.inf)
        out: dict[str, int] = {}
        db = self._db
        table = "the records"
        try:
            db.execute("BEGIN IMMEDIATE")
            for table, keep_s in RETENTION_S.items():
                age = keep_s if older_than_s is None else older_than_s
                cap = MAX_ROWS[table] if max_rows is None else max_rows
                n = db.execute(f"DELETE FROM {table} WHERE ts < ?", (now - age,)).rowcount
                # the cap keeps the newest written (the highest rowids); no sort of the table
                n += db.execute(
                    f"DELETE FROM {table} WHERE rowid <= "
                    f"(SELECT rowid FROM {table} ORDER BY rowid DESC LIMIT 1 OFFSET ?)", (cap,)).rowcount
                out[table] = n
            db.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback()
            raise StateError(f"{self.path!r}: pruning {table} failed: {type(e).__name__}: {e}") from e
        except BaseException:
            self._rollback()
            raise
        return out


def _appended_paths(mesh: Mesh, kept: int) -> Iterator[Any]:
    """The paths of the sites after the first ``kept`` (Mesh.paths order:
    block j holds the pairs (i < j, j), so they follow the kept ones)."""
    sites = mesh.sites
    idx = sum(len(sites[j].uplinks) * sum(len(x.uplinks) for x in sites[:j]) for j in range(kept))
    for j in range(kept, len(sites)):
        sj = sites[j]
        for si in sites[:j]:
            for ui in si.uplinks:
                for uj in sj.uplinks:
                    yield MeshPath(idx, si.name, ui.name, sj.name, uj.name)
                    idx += 1


def save_mesh(mesh: Mesh, path: str | os.PathLike[str]) -> None:
    """Write ``mesh`` into the state file at ``path`` (created when missing)
    in one transaction, replacing the mesh stored there; the records and the
    discovery registry stay.

    >>> import tempfile, os
    >>> from patronus import Mesh
    >>> f = os.path.join(tempfile.mkdtemp(), "state.db")
    >>> save_mesh(Mesh("acme"), f)
    """
    with Store(path) as st:
        st.save_mesh(mesh)


def load_mesh(path: str | os.PathLike[str]) -> Mesh:
    """The mesh of the state file at ``path``, as ``save_mesh`` wrote it;
    StateError when the file is missing, holds no mesh, or is damaged.

    >>> import tempfile, os
    >>> from patronus import Mesh
    >>> f = os.path.join(tempfile.mkdtemp(), "state.db")
    >>> mesh = Mesh("acme"); save_mesh(mesh, f)
    >>> load_mesh(f) == mesh
    True
    """
    with Store(path, create=False) as st:
        return st.load_mesh()
