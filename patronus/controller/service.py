"""The controller's service layer: every operation on sites and policies.

REST (``patronus.controller.app``) is a thin layer over it, and so will
every other front end be. A change is made on a copy of the mesh, which the
model validates (``ConfigError`` naming the field), saved in one
transaction of the patronus state file, written to the audit log with its
before and after, and published as an event to every listener of
``Service.changes``.

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
import copy
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from .._fanout import Fanout
from ..errors import ConfigError, StateError
from ..mesh import Mesh
from ..model import Policy, Site
from ..store import Store
from .problems import Conflict, NotFound, PreconditionFailed, Unavailable

__all__ = ["Service", "Resource", "etag_of"]

DEFAULT_MESH = "default"


def etag_of(data: Any) -> str:
    """A strong ETag for a JSON-able value: the quoted SHA-256 of its canonical JSON.

    >>> etag_of({"b": 1, "a": [1, 2]}) == etag_of({"a": [1, 2], "b": 1})
    True
    """
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:40] + '"'


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
    def of(cls, obj: Site | Policy) -> Resource:
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
        self._lock = threading.Lock()
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        with self._store() as st:
            try:
                st.load_mesh()
            except StateError:
                if self._has_mesh():
                    raise
                st.save_mesh(Mesh(DEFAULT_MESH))

    # -- plumbing --------------------------------------------------------------

    def _store(self) -> Store:
        return Store(self.state)

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

    def _publish(self, event: dict[str, Any]) -> None:
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self.changes.publish, event)
            return
        self.changes.publish(event)

    def mesh(self) -> Mesh:
        """The current mesh, as stored."""
        with self._store() as st:
            return st.load_mesh()

    def ready(self) -> None:
        """Raise :class:`Unavailable` unless the state file and the controller database answer."""
        try:
            with Store(self.state, create=False) as st:
                st.version  # noqa: B018 - the read is the check
            self.db.audit_log(limit=1)
        except Exception as e:  # any failure means not ready; the message says which
            raise Unavailable(f"store not reachable: {type(e).__name__}: {e}") from e

    def _change(self, *, actor: str, remote: str | None, action: str, target: str,
                edit: Callable[[Mesh], tuple[Mesh, Any, Any]]) -> None:
        """Load, apply ``edit`` (mesh -> (new mesh, before, after)), save and audit
        in one step, publish. A refused change is audited with ok=False."""
        with self._lock:
            try:
                with self._store() as st:
                    mesh = st.load_mesh()
                    new, before, after = edit(mesh)
                    with self.db.transaction():
                        self.db.audit(actor, action, target, before=before, after=after, remote=remote)
                        st.save_mesh(new)
            except (ConfigError, Conflict, NotFound, PreconditionFailed) as e:
                self.db.audit(actor, action, target, after={"error": str(e)}, remote=remote, ok=False)
                raise
            self._seq += 1
            seq = self._seq
        self._publish({"seq": seq, "ts": time.time(), "type": action, "target": target,
                       "before": before, "after": after,
                       "etag": None if after is None else etag_of(after)})

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

    @staticmethod
    def _check(if_match: str | None, obj: Site | Policy, what: str) -> None:
        tag = Resource.of(obj).etag
        if not _matches(if_match, tag):
            raise PreconditionFailed(f"{what} has changed: its version is {tag}, If-Match names {if_match}")

    # -- read-only views -----------------------------------------------------------

    def paths(self) -> list[dict[str, Any]]:
        """Every path of the full mesh: id, index, the two sites and their uplinks."""
        return [{"id": p.id, "index": p.index, "sites": [p.local_site, p.remote_site],
                 "uplinks": [p.local_uplink, p.remote_uplink]} for p in self.mesh().paths()]

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

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest failover events of the state file, oldest first."""
        with self._store() as st:
            rows = st.events()
        return rows[-limit:] if limit else []
