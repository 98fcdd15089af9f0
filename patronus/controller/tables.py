"""The controller store's interface: tables of rows, changed in transactions,
whatever engine holds them.

Two engines implement it: SQLite (:class:`patronus.controller.db.ControllerDB`,
one machine, the default) and etcd (:class:`patronus.controller.etcd.EtcdDB`,
several controller replicas). Code above this layer (auth, the agent
channel, the service) names tables and keys, never SQL, so it runs on
either; ``tests/test_store_conformance.py`` runs one test body on both.

A transaction (:class:`Tx`) reads and writes rows of the tables in
:data:`TABLES`. Its guarantees, on both engines:

- **all or nothing**: an exception inside ``with db.transaction() as t:``
  leaves no write behind;
- **serialisable**: SQLite holds the write lock for the whole transaction;
  etcd commits only if no row the transaction read (nor any row of a
  table it listed) has changed since it read it, otherwise the commit
  raises :class:`StoreConflict` (HTTP 409) and writes nothing. A
  transaction that only writes never conflicts.

A row is a ``dict`` of the table's columns (:class:`Table`); a column
missing from an inserted row takes its default.

>>> import tempfile, os
>>> from patronus.controller.db import ControllerDB
>>> with ControllerDB(os.path.join(tempfile.mkdtemp(), "c.db")) as db:
...     with db.transaction() as t:
...         t.insert("revoked_jti", {"jti": "j1", "expires": 5.0})
...         _ = t.update("revoked_jti", "j1", expires=9.0)
...     with db.transaction() as t:
...         [r["expires"] for r in t.rows("revoked_jti")], t.get("revoked_jti", "nope")
([9.0], None)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from .problems import Conflict, Unavailable

__all__ = ["Table", "TABLES", "Tx", "Exists", "StoreConflict", "StoreUnavailable", "full_row", "table"]


@attrs.frozen
class Table:
    """A table: its name, the column that is its key, every column with its
    default, and the columns ``rows(table, column=value)`` looks up by (an
    engine without a query planner keeps an index of each, so a lookup
    reads, and a transaction depends on, the matching rows alone)."""

    name: str
    key: str
    columns: Mapping[str, Any]
    indexes: tuple[str, ...] = ()

    def row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """``row`` completed with the defaults; KeyError naming an unknown column or a missing key."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.name} has no column {sorted(unknown)[0]!r}")
        if row.get(self.key) is None:
            raise KeyError(f"{self.name} row without its key {self.key!r}")
        return {c: row.get(c, d) for c, d in self.columns.items()}


_REQUIRED = None   # a column whose value every insert gives (no default in the schema)

TABLES: dict[str, Table] = {t.name: t for t in (
    Table("users", "name", {"name": _REQUIRED, "role": _REQUIRED, "pw_hash": _REQUIRED, "totp_secret": None,
                            "totp_enabled": 0, "totp_last_step": None, "recovery": "[]", "token_gen": 0,
                            "created": _REQUIRED, "disabled": 0}, ("role",)),
    Table("refresh_tokens", "id", {"id": _REQUIRED, "family": _REQUIRED, "user": _REQUIRED,
                                   "token_hash": _REQUIRED, "issued": _REQUIRED, "expires": _REQUIRED,
                                   "used_at": None, "revoked": 0}, ("token_hash", "family", "user", "used_at")),
    Table("api_keys", "id", {"id": _REQUIRED, "name": _REQUIRED, "prefix": _REQUIRED, "hash": _REQUIRED,
                             "role": _REQUIRED, "created_by": _REQUIRED, "created": _REQUIRED, "expires": None,
                             "last_used": None, "revoked": 0}),
    Table("revoked_jti", "jti", {"jti": _REQUIRED, "expires": _REQUIRED}),
    Table("agent_tokens", "id", {"id": _REQUIRED, "site": _REQUIRED, "hash": _REQUIRED, "created_by": _REQUIRED,
                                 "created": _REQUIRED, "expires": _REQUIRED, "used": None, "used_by": None,
                                 "revoked": 0}, ("hash",)),
    Table("agent_credentials", "id", {"id": _REQUIRED, "site": _REQUIRED, "hash": _REQUIRED, "token_id": None,
                                      "public_key": None, "signing_key": None, "hostname": None,
                                      "interval_s": _REQUIRED, "created": _REQUIRED, "last_seen": None,
                                      "last_remote": None, "revoked": 0}),
    Table("agent_versions", "site", {"site": _REQUIRED, "version": _REQUIRED, "digest": _REQUIRED,
                                     "parts": _REQUIRED, "prev": None, "updated": _REQUIRED}),
    Table("agent_parts", "digest", {"digest": _REQUIRED, "body": _REQUIRED}),
    Table("agent_announcements", "site", {"site": _REQUIRED, "body": _REQUIRED, "wg_public_key": _REQUIRED,
                                          "ts": _REQUIRED, "received": _REQUIRED, "credential": _REQUIRED},
          ("credential",)),
    Table("agent_nonces", "nonce", {"nonce": _REQUIRED, "ts": _REQUIRED}),
)}


def table(name: str) -> Table:
    """The :class:`Table` called ``name``; KeyError naming it otherwise."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"no table {name!r} in the controller store") from None


def full_row(name: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` of table ``name`` completed with its defaults (what a read returns)."""
    return table(name).row(row)


class Exists(Conflict):
    """An insert whose key is taken (409)."""

    title = "Exists"


class StoreConflict(Conflict):
    """A transaction lost to a concurrent one that changed what it read; nothing was written (409: read
    again and retry)."""

    title = "Concurrent Change"


class StoreUnavailable(Unavailable):
    """The store cannot take the operation now (etcd without quorum, a database locked); 503, nothing written."""


@runtime_checkable
class Tx(Protocol):
    """One transaction's view of the tables (see the module's guarantees)."""

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        """The row of ``table`` with that key, or None."""

    def rows(self, table: str, **equal: Any) -> list[dict[str, Any]]:
        """Every row of ``table`` whose columns equal the given values, by key."""

    def insert(self, table: str, row: Mapping[str, Any]) -> None:
        """Add a row; :class:`Exists` when its key is taken."""

    def put(self, table: str, row: Mapping[str, Any]) -> None:
        """Add or replace the row with that key."""

    def update(self, table: str, key: str, **values: Any) -> bool:
        """Set columns of one row; False when there is no such row."""

    def delete(self, table: str, key: str) -> bool:
        """Remove one row; False when there was none."""
