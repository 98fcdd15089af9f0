"""The operator's Prometheus metrics and health endpoints, served by aiohttp
on the operator's own event loop.

Metrics (``GET /metrics`` on ``--metrics-port``, its own registry)::

    patronus_operator_reconciliations_total{kind,result}     apply and delete passes; result success,
                                                             temporary_error or permanent_error
    patronus_operator_reconcile_duration_seconds{kind}       histogram of those passes
    patronus_operator_errors_total{kind,type}                errors of any pass (status refreshes too),
                                                             type the exception's class name (bounded:
                                                             reconcile.ERROR_TYPES, else Other)
    patronus_operator_resources_managed{kind}                resources this process reconciles now
    patronus_operator_controller_up                          1 when the controller answered the last
                                                             check (GET /api/v1/auth/me with the API key)
    patronus_operator_kubernetes_up                          1 when the last request to the Kubernetes
                                                             API got an answer that was not an error

Health (``--health-port``), each a JSON body:

- ``/livez``: 200 while the event loop answers (the process is not wedged).
- ``/readyz``: 200 when the Kubernetes API login succeeded, its last
  request succeeded, kopf watches both kinds, and the controller answered
  its last check; else 503 with ``missing``, a list naming each missing
  piece (``"kubernetes API: cannot connect to ..."``, ``"controller: ..."``).
- ``/healthz``: 200 unless something in the process is broken: a
  supervising task (the kopf supervisor, the controller check) ended, or a
  reconciliation has run longer than :data:`STUCK_S` (a hung worker); else
  503 with ``broken``. An unreachable Kubernetes API or controller is
  *not* broken (the operator retries; see ``/readyz``).
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from . import KINDS

__all__ = ["Health", "Metrics", "serve", "STUCK_S"]

STUCK_S = 120.0   # a reconciliation running longer is hung (5 s per request, a handful of requests)

_HARMLESS = {404, 409, 410, 422}   # answers kopf expects now and then (a patch racing a deletion, a conflict)


class Metrics:
    """The operator's metric families in their own registry (nothing of the process's default one)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.reconciliations = Counter(
            "patronus_operator_reconciliations", "Reconciliation passes (apply, delete) by kind and result",
            ["kind", "result"], registry=r)
        self.duration = Histogram(
            "patronus_operator_reconcile_duration_seconds", "Duration of reconciliation passes (apply, delete)",
            ["kind"], registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
        self.errors = Counter(
            "patronus_operator_errors", "Errors of reconciliation passes and status refreshes, by exception type",
            ["kind", "type"], registry=r)
        self.managed = Gauge("patronus_operator_resources_managed", "Resources this operator reconciles",
                             ["kind"], registry=r)
        self.controller_up = Gauge("patronus_operator_controller_up",
                                   "1 when the controller answered the last check, else 0", registry=r)
        self.kubernetes_up = Gauge("patronus_operator_kubernetes_up",
                                   "1 when the last Kubernetes API request succeeded, else 0", registry=r)
        for kind in KINDS:
            for result in ("success", "temporary_error", "permanent_error"):
                self.reconciliations.labels(kind, result)
            self.duration.labels(kind)
            self.managed.labels(kind).set(0)

    def observe(self, kind: str, op: str, result: str, error: BaseException | None, seconds: float) -> None:
        """A :data:`patronus.operator.reconcile.Observer`."""
        from .reconcile import error_type

        if op in ("apply", "delete"):
            self.reconciliations.labels(kind, result).inc()
            self.duration.labels(kind).observe(seconds)
        if error is not None:
            self.errors.labels(kind, error_type(error)).inc()

    def text(self) -> tuple[bytes, str]:
        """The exposition (text format) and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Health:
    """What the probes report, written by the operator's parts on the event
    loop (and read there): the Kubernetes API (login, last request, watches),
    kopf's supervisor, the controller check, and the tasks that must live."""

    def __init__(self, metrics: Metrics | None = None, *, watched: Iterable[str] = (),
                 busy_for: Callable[[], float] = lambda: 0.0) -> None:
        self.metrics = metrics
        self.login: str | None = "not logged in yet"   # None: logged in; else why not
        self.k8s_error: str | None = None                # the last request's failure (None: it succeeded)
        self.watched = tuple(watched)                    # plurals that must be watched
        self.watching: set[str] = set()
        self.kopf: str | None = "starting"               # None: kopf runs; else why not
        self.controller: str | None = "not checked yet"  # None: the last check succeeded
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.busy_for = busy_for

    # -- the Kubernetes API ---------------------------------------------------------------------

    def logged_in(self, reason: str | None) -> None:
        """The login handler's outcome: None (credentials found) or why not."""
        self.login = reason
        if reason is not None:
            self._k8s(False)

    def _k8s(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.kubernetes_up.set(1 if up else 0)

    def k8s_answer(self, method: str, url: Any, status: int) -> None:
        """A response of the Kubernetes API (from the session's trace)."""
        if status < 400 or status in _HARMLESS:
            self.k8s_error = None
            self._k8s(True)
            plural = _watched_plural(url, self.watched) if status == 200 else None
            if plural is not None:
                self.watching.add(plural)
            return
        path = urllib.parse.urlsplit(str(url)).path
        what = {401: "credentials refused (401 Unauthorized)",
                403: f"forbidden (403) on {method} {path}: check the operator's RBAC"}.get(
            status, f"{method} {path} answered {status}")
        self.k8s_error = what
        self._k8s(False)

    def k8s_failed(self, url: Any, exc: BaseException) -> None:
        """A request to the Kubernetes API that got no answer."""
        parts = urllib.parse.urlsplit(str(url))
        where = f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(url)
        text = str(exc) or type(exc).__name__
        self.k8s_error = f"cannot reach {where}: {text[:300]}"   # not ready until a request succeeds again
        self._k8s(False)

    # -- kopf and the controller -------------------------------------------------------------------

    def kopf_running(self, reason: str | None) -> None:
        """None while kopf runs; else why it does not (restarting, stopped)."""
        self.kopf = reason
        if reason is not None:
            self.watching.clear()

    def controller_checked(self, error: str | None) -> None:
        self.controller = error
        if self.metrics is not None:
            self.metrics.controller_up.set(1 if error is None else 0)

    # -- the probes -------------------------------------------------------------------------------

    def missing(self) -> list[str]:
        """What keeps the operator from being ready (empty: ready)."""
        out = []
        if self.login is not None:
            out.append(f"kubernetes API: {self.login}")
        elif self.k8s_error is not None:
            out.append(f"kubernetes API: {self.k8s_error}")
        elif self.kopf is not None:
            out.append(f"kubernetes API: kopf is not running ({self.kopf})")
        else:
            absent = [p for p in self.watched if p not in self.watching]
            if absent:
                out.append(f"kubernetes API: not watching {', '.join(absent)} yet (are the CRDs installed, "
                           "may the operator list and watch them?)")
        if self.controller is not None:
            out.append(f"controller: {self.controller}")
        return out

    def broken(self) -> list[str]:
        """What is broken in the process (empty: healthy)."""
        out = []
        for name, task in self.tasks.items():
            if task.done():
                exc = None if task.cancelled() else task.exception()
                out.append(f"{name} ended" + (f": {type(exc).__name__}: {exc}" if exc else ""))
        busy = self.busy_for()
        if busy > STUCK_S:
            out.append(f"a reconciliation has been running for {busy:.0f} s (more than {STUCK_S:.0f} s)")
        return out


def _watched_plural(url: Any, plurals: Iterable[str]) -> str | None:
    """The plural a watch request is for (``.../<plural>?watch=true``), if one of ``plurals``."""
    parts = urllib.parse.urlsplit(str(url))
    if "true" not in urllib.parse.parse_qs(parts.query).get("watch", []):
        return None
    last = parts.path.rstrip("/").rsplit("/", 1)[-1]
    return last if last in plurals else None


def _json(status: int, body: dict[str, Any]) -> Any:
    from aiohttp import web

    return web.Response(status=status, text=json.dumps(body) + "\n", content_type="application/json")


async def serve(health: Health, metrics: Metrics, *, host: str, metrics_port: int, health_port: int,
                ) -> tuple[list[Any], dict[str, int]]:
    """Start the metrics and the health servers on the running loop; returns
    (runners to clean up, ``{"metrics": port, "health": port}`` as bound)."""
    from aiohttp import web

    async def metrics_view(request: web.Request) -> web.Response:
        body, ctype = metrics.text()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def livez(request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        missing = health.missing()
        return _json(503 if missing else 200, {"status": "not ready" if missing else "ready", "missing": missing})

    async def healthz(request: web.Request) -> web.Response:
        broken = health.broken()
        return _json(503 if broken else 200, {"status": "broken" if broken else "ok", "broken": broken})

    @web.middleware
    async def one_request_a_connection(request: web.Request, handler: Any) -> web.StreamResponse:
        # no keep-alive: an idle connection would be a task kopf's shutdown waits for (it waits for every
        # task started after it), and probes and scrapes come seconds apart anyway
        resp = await handler(request)
        resp.force_close()
        return resp

    apps = {"metrics": (metrics_port, [web.get("/metrics", metrics_view)]),
            "health": (health_port, [web.get("/livez", livez), web.get("/readyz", readyz),
                                     web.get("/healthz", healthz)])}
    runners: list[Any] = []
    ports: dict[str, int] = {}
    try:
        for name, (port, routes) in apps.items():
            app = web.Application(middlewares=[one_request_a_connection])
            app.add_routes(routes)
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, host, port)
            await site.start()
            ports[name] = int(runner.addresses[0][1])
    except BaseException:
        for r in runners:
            await r.cleanup()
        raise
    return runners, ports

