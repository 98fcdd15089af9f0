"""Reconciling ``Site`` and ``Policy`` resources against the controller:
plain functions (methods of :class:`Reconciler`) that the kopf handlers of
:mod:`patronus.operator.run` call with the keyword arguments kopf passes
(``spec``, ``meta``, ``status``, ``name``, ``namespace``, ``patch``,
``logger``, ``retry``, ...), so a test drives them with a resource body and
a ``kopf.Patch()`` and no Kubernetes API.

- :meth:`Reconciler.apply` (create, update, resume): an idempotent upsert.
  The resource is the source of truth: the controller's object of the same
  name is created, or replaced when it differs (``Adopted`` when the
  resource had never been synced and the controller had the object
  already), or left alone when it matches.
- :meth:`Reconciler.delete`: remove it (already gone is success); a 409,
  such as a site a policy still needs, is retried with a condition saying why.
- :meth:`Reconciler.refresh` (a kopf timer): the controller's live state
  into the status, and drift corrected (an object changed or removed on the
  controller behind the resource's back is put back) once the resource's
  current generation was synced.

Status written (merge patches through kopf's ``patch.status``)::

    observedGeneration   int     the metadata.generation the conditions are about (apply, delete)
    conditions           list    Ready, Synced, Degraded: type, status ("True", "False", "Unknown"),
                                 reason (CamelCase), message, lastTransitionTime (RFC 3339, changed only
                                 when the status changes), observedGeneration
    # Site (refresh)
    state                str     Active, Degraded, Inactive or Revoked (the site's best agent, the
                                 controller's rule), Pending (no agent enrolled), Absent (the controller
                                 has no such site)
    uplinks              int     uplinks of the controller's copy of the site
    paths                int     paths of the mesh that touch the site
    pathsUp              int     of those, the ones whose last BFD/failover report says up
    # Policy (refresh)
    currentPath          str     the path its traffic uses; when its (site, remote site) pairs use
                                 different paths, the most used one and "(+N more)"; absent (null)
                                 while no agent reported a route
    routes               list    {site, remoteSite, path} per pair ("" as path: no usable path), at most
                                 MAX_ROUTES, sorted
    routesOmitted        int     routes left out of the list beyond MAX_ROUTES

Errors become conditions and kopf's retry decisions (:func:`classify`):

==========================================  =====================  ==========  =====================
what the controller did                     reason                 Degraded    kopf
==========================================  =====================  ==========  =====================
422 (or another 4xx refusal), a bad spec    Invalid                True        PermanentError
503, 5xx, connection error, timeout         ControllerUnavailable  False       TemporaryError, backoff
409 / 412 (name or priority taken, in use)  Conflict               False       TemporaryError, backoff
429                                         RateLimited            False       TemporaryError, Retry-After
401 / 403                                   Unauthorized/Forbidden True        TemporaryError, 5 min
==========================================  =====================  ==========  =====================

Conditions after a success: Ready True ``Reconciled``; Synced True
``Created``, ``Updated``, ``Adopted`` or ``UpToDate``; Degraded False
``NoErrors``. After a failure: Ready and Synced False with the reason
above; Degraded True with it (Invalid, Unauthorized, Forbidden) or False
``Transient``. The operator stopping mid-way writes no condition.

The backoff is :data:`BACKOFF_START_S` doubling with kopf's ``retry`` count
up to :data:`BACKOFF_MAX_S`. Handlers return None (kopf would store a
result in the status). kopf is imported only to raise its errors, lazily,
and the error types can be injected (:class:`ErrorTypes`).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx

from .. import client as pc
from ..errors import ConfigError, PatronusError
from ..model import Policy, Site
from . import KINDS
from .pool import ControllerPool, LiveState, OperatorStopping, Route

__all__ = [
    "Reconciler", "ErrorTypes", "Failure", "classify", "backoff", "set_conditions", "condition_types",
    "site_status", "policy_status", "summarize_routes", "CONDITION_TYPES", "BACKOFF_START_S", "BACKOFF_MAX_S",
    "AUTH_DELAY_S", "CONFLICT_MAX_S", "MAX_ROUTES", "MAX_MESSAGE", "ERROR_TYPES", "Observer",
]

log = logging.getLogger("patronus.operator")

CONDITION_TYPES = ("Ready", "Synced", "Degraded")
BACKOFF_START_S = 5.0
BACKOFF_MAX_S = 300.0
CONFLICT_MAX_S = 60.0     # a conflict (a policy still using a site) clears when the other object moves
AUTH_DELAY_S = 300.0      # a refused API key or role is a person's to fix: try again now and then
MAX_ROUTES = 1000
MAX_MESSAGE = 1024        # characters of a condition message

#: the values of the ``type`` label of ``patronus_operator_errors_total`` (anything else is "Other")
ERROR_TYPES = frozenset({
    "InvalidInput", "ConfigError", "Unauthorized", "TotpRequired", "Forbidden", "NotFound", "Conflict",
    "PreconditionFailed", "RateLimited", "Unavailable", "ControllerError", "ConnectError", "ConnectTimeout",
    "ReadTimeout", "WriteTimeout", "PoolTimeout", "ReadError", "WriteError", "RemoteProtocolError",
    "TransportError", "OperatorStopping",
})

#: ``observe(kind, operation, result, error, seconds)``: operation apply|delete|refresh,
#: result success|temporary_error|permanent_error, error the exception (None on success)
Observer = Callable[[str, str, str, "BaseException | None", float], None]

_MODELS: dict[str, Any] = {"Site": Site, "Policy": Policy}


# -- conditions -----------------------------------------------------------------------------------


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with seconds (what Kubernetes writes)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_conditions(old: Any, new: Mapping[str, tuple[str, str, str]], *, generation: int | None,
                   now: str) -> list[dict[str, Any]]:
    """The conditions list after setting ``new`` (type -> (status, reason,
    message)) over ``old`` (the status's list as it is, whatever it holds):
    exactly one condition per type of :data:`CONDITION_TYPES`, in that
    order. ``lastTransitionTime`` is the old one when the type's status is
    unchanged, else ``now``. A type missing from ``new`` keeps its old
    condition, or is ``Unknown`` if it had none.

    >>> c = set_conditions([], {"Ready": ("True", "Reconciled", "ok")}, generation=1, now="2025-01-01T00:00:00Z")
    >>> [(x["type"], x["status"], x["lastTransitionTime"]) for x in c]   # doctest: +NORMALIZE_WHITESPACE
    [('Ready', 'True', '2025-01-01T00:00:00Z'), ('Synced', 'Unknown', '2025-01-01T00:00:00Z'),
     ('Degraded', 'Unknown', '2025-01-01T00:00:00Z')]
    >>> c2 = set_conditions(c, {"Ready": ("True", "Reconciled", "still ok")}, generation=2, now="2025-01-02T00:00:00Z")
    >>> c2[0]["lastTransitionTime"], c2[0]["message"], c2[0]["observedGeneration"]
    ('2025-01-01T00:00:00Z', 'still ok', 2)
    """
    before: dict[str, dict[str, Any]] = {}
    for c in old if isinstance(old, list) else ():
        if isinstance(c, Mapping) and c.get("type") in CONDITION_TYPES and c["type"] not in before:
            before[c["type"]] = dict(c)
    out = []
    for t in CONDITION_TYPES:
        prev = before.get(t)
        if t in new:
            status, reason, message = new[t]
        elif prev is not None and prev.get("status") in ("True", "False", "Unknown"):
            status, reason, message = prev["status"], str(prev.get("reason") or "Unknown"), str(prev.get("message") or "")
        else:
            status, reason, message = "Unknown", "Unknown", ""
        kept = (prev is not None and prev.get("status") == status and isinstance(prev.get("lastTransitionTime"), str)
                and prev["lastTransitionTime"])
        c: dict[str, Any] = {"type": t, "status": status, "reason": reason, "message": _bounded(message),
                             "lastTransitionTime": prev["lastTransitionTime"] if kept else now}
        if generation is not None:
            c["observedGeneration"] = generation
        out.append(c)
    return out


def condition_types(conditions: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """type -> condition (the first of each type)."""
    out: dict[str, Mapping[str, Any]] = {}
    for c in conditions:
        if isinstance(c, Mapping) and isinstance(c.get("type"), str):
            out.setdefault(c["type"], c)
    return out


# -- errors ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorTypes:
    """How a handler tells kopf to retry (``temporary(message, delay=s)``) or
    to stop trying (``permanent(message)``)."""

    temporary: Callable[..., Exception]
    permanent: Callable[[str], Exception]


def kopf_errors() -> ErrorTypes:
    """kopf's ``TemporaryError`` and ``PermanentError`` (kopf imported here, on first use)."""
    import kopf

    return ErrorTypes(kopf.TemporaryError, kopf.PermanentError)


@dataclass(frozen=True)
class Failure:
    """What an error means for the resource: the condition ``reason`` and
    ``message``, whether it is ``permanent`` (not retried until the spec
    changes), whether the resource is ``degraded`` (a person must act), and
    the ``delay`` in seconds before kopf tries again."""

    reason: str
    message: str
    permanent: bool
    degraded: bool
    delay: float


def backoff(retry: int, cap: float = BACKOFF_MAX_S) -> float:
    """Seconds before retry number ``retry + 1``: 5, 10, 20, ... up to ``cap``.

    >>> [backoff(r) for r in range(8)]
    [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    """
    r = max(0, min(int(retry or 0), 32))
    return float(min(BACKOFF_START_S * 2 ** r, cap))


def classify(exc: BaseException, retry: int = 0, *, url: str | None = None) -> Failure:
    """The :class:`Failure` an exception of a reconciliation is (``url``: the
    controller's, named in the messages about reaching it).

    >>> f = classify(pc.InvalidInput("Site.subnets: ['10.0.0.1/8'] has host bits set", field="Site.subnets"))
    >>> f.reason, f.permanent, f.degraded, f.message
    ('Invalid', True, True, "Site.subnets: ['10.0.0.1/8'] has host bits set")
    >>> f = classify(pc.Unavailable("the store is unavailable"), retry=2)
    >>> f.reason, f.permanent, f.delay
    ('ControllerUnavailable', False, 20.0)
    """
    where = f" at {url}" if url else ""
    d = backoff(retry)
    if isinstance(exc, OperatorStopping):
        return Failure("OperatorStopping", str(exc), False, False, BACKOFF_START_S)
    if isinstance(exc, pc.InvalidInput):
        return Failure("Invalid", exc.detail, True, True, 0.0)
    if isinstance(exc, pc.Unauthorized):
        return Failure("Unauthorized", f"the controller{where} refused the API key: {exc.detail}", False, True,
                       AUTH_DELAY_S)
    if isinstance(exc, pc.Forbidden):
        return Failure("Forbidden", f"the API key may not do this on the controller{where}: {exc.detail} "
                       "(it needs the operator role)", False, True, AUTH_DELAY_S)
    if isinstance(exc, (pc.Conflict, pc.PreconditionFailed, pc.NotFound)):
        return Failure("Conflict", f"the controller{where} refused: {exc.detail}", False, False,
                       backoff(retry, CONFLICT_MAX_S))
    if isinstance(exc, pc.RateLimited):
        wait = exc.retry_after if exc.retry_after is not None and exc.retry_after > 0 else d
        return Failure("RateLimited", f"the controller{where} is rate limiting: {exc.detail}", False, False,
                       float(min(max(wait, 1.0), BACKOFF_MAX_S)))
    if isinstance(exc, pc.Unavailable) or (isinstance(exc, pc.ControllerError) and exc.status >= 500):
        return Failure("ControllerUnavailable", f"the controller{where} is unavailable ({exc.status}): {exc.detail}",
                       False, False, d)
    if isinstance(exc, pc.ControllerError):   # another 4xx: the request is refused as it is
        return Failure("Invalid", f"the controller refused it ({exc.status}): {exc.detail}", True, True, 0.0)
    if isinstance(exc, ConfigError):          # the resource itself (checked before sending)
        return Failure("Invalid", str(exc), True, True, 0.0)
    if isinstance(exc, httpx.TimeoutException):
        return Failure("ControllerUnavailable", f"the controller{where} did not answer in time "
                       f"({type(exc).__name__})", False, False, d)
    if isinstance(exc, httpx.TransportError):
        return Failure("ControllerUnavailable", f"cannot reach the controller{where}: {type(exc).__name__}: "
                       f"{_bounded(str(exc), 300)}", False, False, d)
    return Failure("Error", f"{type(exc).__name__}: {_bounded(str(exc), 300)}", False, False, d)


def error_type(exc: BaseException) -> str:
    """The ``type`` label of an error (a bounded set: :data:`ERROR_TYPES` or ``Other``)."""
    name = type(exc).__name__
    if name in ERROR_TYPES:
        return name
    if isinstance(exc, httpx.TransportError):
        return "TransportError"
    if isinstance(exc, pc.ControllerError):
        return "ControllerError"
    return "Other"


# -- live state into the status ---------------------------------------------------------------------


def site_status(name: str, sites: Mapping[str, Mapping[str, Any]], agents: Mapping[str, str],
                paths: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A site's live status fields from the controller's sites, best agent
    status per site and paths.

    >>> site_status("hq", {"hq": {"uplinks": [{}, {}]}}, {}, [
    ...     {"sites": ["br", "hq"], "state": {"status": "up"}}, {"sites": ["br", "hq"], "state": None}])
    {'state': 'Pending', 'uplinks': 2, 'paths': 2, 'pathsUp': 1}
    """
    site = sites.get(name)
    if site is None:
        return {"state": "Absent", "uplinks": 0, "paths": 0, "pathsUp": 0}
    mine = [p for p in paths if name in (p.get("sites") or ())]
    up = sum(1 for p in mine if isinstance(p.get("state"), Mapping) and p["state"].get("status") == "up")
    return {"state": agents.get(name, "Pending"), "uplinks": len(site.get("uplinks") or ()), "paths": len(mine),
            "pathsUp": up}


def summarize_routes(routes: list[Route]) -> str | None:
    """One string for a policy's routes: the path when every pair uses the
    same one, else the most used (first in route order on a tie) and how
    many other paths there are; None without routes.

    >>> summarize_routes([{"site": "a", "remoteSite": "b", "path": "a.x~b.y"},
    ...                   {"site": "b", "remoteSite": "a", "path": "a.x~b.y"}])
    'a.x~b.y'
    >>> summarize_routes([{"site": "a", "remoteSite": "b", "path": "a.x~b.y"},
    ...                   {"site": "a", "remoteSite": "c", "path": "a.x~c.y"},
    ...                   {"site": "c", "remoteSite": "a", "path": ""}])
    'a.x~b.y (+2 more)'
    """
    if not routes:
        return None
    counts = collections.Counter(r["path"] or "none" for r in routes)
    top = max(counts, key=lambda p: (counts[p], -list(counts).index(p)))
    return top if len(counts) == 1 else f"{top} (+{len(counts) - 1} more)"


def policy_status(name: str, policies: Mapping[str, Any], routes: Mapping[str, list[Route]]) -> dict[str, Any]:
    """A policy's live status fields: ``currentPath``, ``routes`` (at most
    :data:`MAX_ROUTES`) and ``routesOmitted``.

    >>> policy_status("voip", {"voip": {}}, {})
    {'currentPath': None, 'routes': [], 'routesOmitted': 0}
    """
    mine = list(routes.get(name, ())) if name in policies else []
    return {"currentPath": summarize_routes(mine), "routes": mine[:MAX_ROUTES],
            "routesOmitted": max(0, len(mine) - MAX_ROUTES)}


# -- the reconciler ------------------------------------------------------------------------------------


class Reconciler:
    """The reconcile logic over a :class:`~patronus.operator.pool.ControllerPool`.

    Every method takes the resource kind (``"Site"`` or ``"Policy"``) and
    kopf's keyword arguments, writes the status through ``patch`` and
    returns None, or raises ``errors.temporary`` / ``errors.permanent``
    (kopf's, by default). Calls for one object are serialised (a timer and
    an update handler of the same object never interleave). For example
    (tests/test_operator.py runs this against a real controller)::

        rec = Reconciler(ControllerPool("https://127.0.0.1:8443", api_key=key, verify="tls.crt"))
        patch = kopf.Patch()
        rec.apply("Site", spec={"subnets": ["10.1.0.0/24"], "uplinks": [{"name": "isp1", "address": "192.0.2.1"}]},
                  meta={"name": "hq", "generation": 1}, status={}, name="hq", namespace="default", patch=patch,
                  retry=0, reason="create")
        patch.status["conditions"][1]["reason"]     # 'Created'
    """

    def __init__(self, pool: ControllerPool, *, errors: ErrorTypes | None = None, live_ttl_s: float = 5.0,
                 observe: Observer | None = None, clock: Callable[[], str] = now_rfc3339) -> None:
        self.pool = pool
        self.live = LiveState(pool, ttl_s=live_ttl_s)
        self._errors = errors
        self.observe = observe
        self.clock = clock
        self._locks: dict[tuple[str, str | None, str], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._tokens = itertools.count()
        self._busy_since: dict[int, float] = {}
        self._busy_lock = threading.Lock()

    @property
    def errors(self) -> ErrorTypes:
        if self._errors is None:
            self._errors = kopf_errors()
        return self._errors

    # -- bookkeeping -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _object(self, kind: str, namespace: str | None, name: str) -> Iterator[None]:
        key = (kind, namespace, name)
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        token = next(self._tokens)
        with self._busy_lock:
            self._busy_since[token] = time.monotonic()
        try:
            with lock:
                yield
        finally:
            with self._busy_lock:
                self._busy_since.pop(token, None)

    def forget(self, kind: str, namespace: str | None, name: str) -> None:
        """Drop the per-object lock of a deleted object."""
        with self._locks_lock:
            self._locks.pop((kind, namespace, name), None)

    def longest_running(self) -> float:
        """Seconds the oldest reconciliation in progress has been running (0 when none)."""
        with self._busy_lock:
            starts = list(self._busy_since.values())
        return max((time.monotonic() - s for s in starts), default=0.0)

    def in_progress(self) -> int:
        """Reconciliations running now."""
        with self._busy_lock:
            return len(self._busy_since)

    def _observe(self, kind: str, op: str, result: str, error: BaseException | None, t0: float) -> None:
        if self.observe is not None:
            try:
                self.observe(kind, op, result, error, time.monotonic() - t0)
            except Exception:   # metrics must never break a reconciliation
                log.exception("the metrics observer failed")

    @staticmethod
    def _kind(kind: str) -> Any:
        if kind not in _MODELS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        return _MODELS[kind]

    def _write(self, patch: Any, status: Any, generation: int | None,
               new: Mapping[str, tuple[str, str, str]]) -> None:
        old = status.get("conditions") if isinstance(status, Mapping) else None
        patch.status["observedGeneration"] = generation
        patch.status["conditions"] = set_conditions(old, new, generation=generation, now=self.clock())

    def _failed(self, kind: str, op: str, exc: BaseException, *, patch: Any, status: Any, generation: int | None,
                retry: int, logger: Any, t0: float, doing: str) -> NoReturn:
        f = classify(exc, retry, url=self.pool.url)
        if isinstance(exc, OperatorStopping):   # not the resource's fault: no condition, the next run goes on
            self._observe(kind, op, "temporary_error", exc, t0)
            raise self.errors.temporary(f.message, delay=f.delay) from exc
        if f.permanent:
            msg = f.message
        else:
            msg = f"{f.message}; retrying in {f.delay:g} s"
        self._write(patch, status, generation, {
            "Ready": ("False", f.reason, f"{doing} failed: {msg}"),
            "Synced": ("False", f.reason, msg),
            "Degraded": ("True", f.reason, msg) if f.degraded else ("False", "Transient", msg),
        })
        log.debug("%s %s: %s", kind, doing, msg)   # kopf logs it (and posts it as an event): "Handler ... failed"
        self._observe(kind, op, "permanent_error" if f.permanent else "temporary_error", exc, t0)
        if f.permanent:
            raise self.errors.permanent(msg) from exc
        raise self.errors.temporary(msg, delay=f.delay) from exc

    # -- the handlers ---------------------------------------------------------------------------

    def apply(self, kind: str, *, spec: Any, meta: Mapping[str, Any], status: Any, name: str,
              namespace: str | None = None, patch: Any, logger: Any = None, retry: int = 0,
              reason: str | None = None, drift: bool = False, **_: Any) -> None:
        """Create, update or resume: make the controller's object equal the
        spec (see the module's docstring). ``reason``: kopf's cause
        (``create`` marks the first sync: an object the controller has
        already is then *adopted*). ``drift``: called by :meth:`refresh` to
        put back an object changed on the controller."""
        cause = reason
        t0 = time.monotonic()
        model = self._kind(kind)
        generation = meta.get("generation")
        what = f"{kind.lower()} {name!r}"
        with self._object(kind, namespace, name):
            try:
                body = _body(kind, name, spec)
                done = self.pool.call(lambda c: _upsert(c, kind, model, body))
            except Exception as e:
                self._failed(kind, "apply", e, patch=patch, status=status, generation=generation, retry=retry,
                             logger=logger, t0=t0, doing=f"syncing {what}")
            # the first sync of this resource: kopf's create cause, or a status that was never written
            first = cause == "create" or not isinstance(status, Mapping) or "observedGeneration" not in status
            if done == "created":
                reason, msg = "Created", f"created {what} on the controller"
            elif first and done == "replaced":
                reason, msg = "Adopted", (f"adopted {what}, which the controller had already: replaced it with "
                                          "this resource's spec")
            elif first:
                reason, msg = "Adopted", f"adopted {what}, which the controller had already (equal to the spec)"
            elif done == "replaced":
                reason, msg = "Updated", f"replaced {what} on the controller with this spec"
            else:
                reason, msg = "UpToDate", f"{what} on the controller matches the spec"
            if drift:
                msg = f"drift corrected: {msg}"
            self._write(patch, status, generation, {
                "Ready": ("True", "Reconciled", msg),
                "Synced": ("True", reason, msg),
                "Degraded": ("False", "NoErrors", "the last reconciliation succeeded"),
            })
            self.live.invalidate()
            if logger is not None and done != "unchanged":
                logger.info("%s", msg)
        self._observe(kind, "apply", "success", None, t0)
        return None

    def delete(self, kind: str, *, meta: Mapping[str, Any], status: Any, name: str, namespace: str | None = None,
               patch: Any, logger: Any = None, retry: int = 0, **_: Any) -> None:
        """Remove the controller's object (already gone: success). A 409 (a
        site a policy still needs) is a TemporaryError with the controller's
        reason in the conditions; kopf keeps the finalizer until it succeeds."""
        t0 = time.monotonic()
        self._kind(kind)
        generation = meta.get("generation")
        with self._object(kind, namespace, name):
            try:
                _segment_ok(name)
                self.pool.call(lambda c: _remove(c, kind, name))
            except pc.NotFound:
                pass
            except Exception as e:
                self._failed(kind, "delete", e, patch=patch, status=status, generation=generation, retry=retry,
                             logger=logger, t0=t0, doing=f"removing {kind.lower()} {name!r}")
            self.live.invalidate()
        self.forget(kind, namespace, name)
        if logger is not None:
            logger.info("removed %s %r from the controller", kind.lower(), name)
        self._observe(kind, "delete", "success", None, t0)
        return None

    def refresh(self, kind: str, *, spec: Any, meta: Mapping[str, Any], status: Any, name: str,
                namespace: str | None = None, patch: Any, logger: Any = None, **kw: Any) -> None:
        """The controller's live state into the status (the fields of the
        module's docstring); an error reading it leaves the status as it was
        (the readiness probe and ``patronus_operator_controller_up`` tell).
        When the resource's generation is synced but the controller's
        object differs or is gone, :meth:`apply` puts it back."""
        t0 = time.monotonic()
        model = self._kind(kind)
        generation = meta.get("generation")
        conds = condition_types(status.get("conditions") or () if isinstance(status, Mapping) else ())
        synced = conds.get("Synced")
        settled = (synced is not None and synced.get("status") == "True" and generation is not None
                   and status.get("observedGeneration") == generation)
        try:
            objects = self.live.sites() if kind == "Site" else self.live.policies()
            if settled and _differs(model, name, spec, objects.get(name)):
                self.apply(kind, spec=spec, meta=meta, status=status, name=name, namespace=namespace, patch=patch,
                           logger=logger, retry=kw.get("retry", 0), drift=True)
                objects = self.live.sites() if kind == "Site" else self.live.policies()
            if kind == "Site":
                fields = site_status(name, objects, self.live.agents(), self.live.paths())
            else:
                fields = policy_status(name, objects, self.live.routes())
        except Exception as e:
            if not isinstance(e, (PatronusError, httpx.HTTPError)):
                raise   # kopf's errors from apply (already observed), and bugs
            log.debug("%s %r: live state not refreshed: %s", kind, name, classify(e, url=self.pool.url).message)
            self._observe(kind, "refresh", "temporary_error", e, t0)
            return None
        for k, v in fields.items():
            if not isinstance(status, Mapping) or status.get(k) != v:
                patch.status[k] = v
        self._observe(kind, "refresh", "success", None, t0)
        return None


# -- controller calls ------------------------------------------------------------------------------------


def _segment_ok(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 253:
        raise ConfigError("metadata.name", name, "is not a name")


def _body(kind: str, name: str, spec: Any) -> dict[str, Any]:
    """The controller's body: ``{"name": metadata.name, **spec}``."""
    _segment_ok(name)
    if not isinstance(spec, Mapping):
        raise ConfigError("spec", spec, f"is not a mapping (a {kind}'s fields, as the model names them)")
    if "name" in spec:
        raise ConfigError("spec.name", spec["name"], "must be left out: the name is metadata.name")
    return {"name": name, **{k: _plain(v) for k, v in spec.items()}}


def _plain(v: Any) -> Any:
    """kopf's views (mappings, sequences) as plain JSON values."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _normal(model: Any, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The body as the model writes it (defaults filled in), or None when the
    model refuses it (then the controller says why)."""
    try:
        return dict(model.from_dict(dict(body)).to_dict())
    except Exception:
        return None


def _differs(model: Any, name: str, spec: Any, current: Mapping[str, Any] | None) -> bool:
    if current is None:
        return True
    try:
        want = _normal(model, _body(model.__name__, name, spec))
    except ConfigError:
        return False
    return want is not None and want != dict(current)


def _upsert(c: Any, kind: str, model: Any, body: dict[str, Any]) -> str:
    """created | replaced | unchanged. GET first (its ETag guards the PUT);
    a POST that finds the name taken meanwhile reads and replaces instead;
    a PUT refused because the object changed since the GET (412) reads again."""
    get, add, replace = ((c.site, c.add_site, c.replace_site) if kind == "Site"
                         else (c.policy, c.add_policy, c.replace_policy))
    name = body["name"]
    want = _normal(model, body)
    for attempt in range(3):
        try:
            current = get(name)
        except pc.NotFound:
            try:
                add(body)
                return "created"
            except pc.Conflict as conflict:   # the name taken meanwhile, or (a policy) its priority in use
                try:
                    current = get(name)
                except pc.NotFound:
                    raise conflict from None
        if want is not None and current.to_dict() == want:
            return "unchanged"
        try:
            replace(body)
            return "replaced"
        except pc.PreconditionFailed:
            if attempt == 2:
                raise
        except pc.NotFound:   # removed between the GET and the PUT: create it on the next round
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _remove(c: Any, kind: str, name: str) -> None:
    (c.remove_site if kind == "Site" else c.remove_policy)(name, if_match="*")
