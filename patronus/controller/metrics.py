"""Prometheus metrics of the controller, served at ``GET /metrics``.

Every app has a :class:`ControllerMetrics` with a registry of its own (never
prometheus-client's global one: two apps in one process, as in the tests,
do not share or clash). :func:`install` adds the request middleware and the
route; ``create_app`` calls it, so ``/metrics`` is in the OpenAPI document and
in the RBAC matrix like every other route. It needs a bearer token (a viewer
API key is enough, action ``topology.read``): Prometheus scrapes it with
``authorization: {credentials_file: ...}``.

The series (all ``patronus_controller_*``):

- ``requests_total{route, method, status}``: requests answered, by route
  *template* (``/api/v1/sites/{name}``, never the raw path: a client cannot
  grow the label set; a path no route matches is ``<unmatched>``);
- ``request_duration_seconds{route}``: a latency histogram, by route template;
- ``auth_failures_total{reason}``: refused requests: ``forbidden``,
  ``rate_limited``, and each 401 by the message's slug (``token_expired``,
  ``bad_signature``, ``missing_bearer_token``, ...; at most
  :data:`MAX_REASONS` distinct, the rest ``other``);
- ``sites{status}``: sites of the mesh by agent status, computed on each
  scrape from the service (every status of :data:`SITE_STATUSES` is
  exported, 0 when none);
- ``connected_agents``: set by the agent channel with
  :meth:`ControllerMetrics.set_connected_agents` (or read on each scrape from
  the callback given to :meth:`ControllerMetrics.connected_agents_from`).

>>> m = ControllerMetrics()
>>> m.set_connected_agents(3)
>>> m.auth_failure(__import__("patronus.controller.auth", fromlist=["x"]).AuthError("token expired"))
>>> text = m.render().decode()
>>> "patronus_controller_connected_agents 3.0" in text
True
>>> 'patronus_controller_auth_failures_total{reason="token_expired"} 1.0' in text
True
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..tracing import span
from . import auth as _auth

__all__ = ["ControllerMetrics", "install", "metrics_of", "auth_reason", "SITE_STATUSES", "MAX_REASONS",
           "UNMATCHED", "METRICS_PATH", "ACTION"]

METRICS_PATH = "/metrics"
ACTION = "topology.read"   # who may scrape: every role (a viewer API key is the usual scraper)
UNMATCHED = "<unmatched>"
#: a site's status as the agent channel reports it; "pending" until its agent has connected
SITE_STATUSES = ("pending", "active", "degraded", "inactive")
MAX_REASONS = 64
#: request latency buckets, seconds (a REST call is ms; login is Argon2id, tens of ms)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_SLUG = re.compile(r"[^a-z0-9]+")


def auth_reason(exc: BaseException) -> str | None:
    """The ``reason`` label of a refused request, or None when ``exc`` is not
    an authentication or authorisation failure.

    >>> auth_reason(_auth.AuthError("missing bearer token (Authorization: Bearer ...)"))
    'missing_bearer_token'
    >>> auth_reason(_auth.AuthError("missing claim 'exp'")), auth_reason(_auth.Forbidden("role 'viewer' may not x"))
    ('missing_claim_exp', 'forbidden')
    >>> auth_reason(_auth.RateLimited(2.0)), auth_reason(_auth.NotFound("no user")) is None
    ('rate_limited', True)
    """
    if isinstance(exc, _auth.RateLimited):
        return "rate_limited"
    if isinstance(exc, _auth.Forbidden):
        return "forbidden"
    if isinstance(exc, _auth.AuthError):
        text = str(exc).split("(", 1)[0].split(":", 1)[0]
        return _SLUG.sub("_", text.lower()).strip("_")[:48] or "other"
    return None


class _Sites(Collector):
    """``patronus_controller_sites{status}``, computed from the service on each scrape."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return [GaugeMetricFamily("patronus_controller_sites", "Sites of the mesh by agent status")]

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily("patronus_controller_sites", "Sites of the mesh by agent status",
                              labels=["status"])
        counts = dict.fromkeys(SITE_STATUSES, 0)
        if self.service is not None:
            for status, n in self.service.site_status_counts().items():
                counts[status] = counts.get(status, 0) + n
        for status, n in counts.items():
            g.add_metric([status], float(n))
        yield g


class _GraphQLCache(Collector):
    """``patronus_controller_graphql_cache_{hits,misses,evictions,invalidations}_total{cache}``: the
    GraphQL cache's counters (``app.state.graphql.cache``), and the subscriptions open now and those
    dropped for falling behind, read on each scrape; nothing without GraphQL."""

    _HELP = {"hits": "reads the cache answered", "misses": "reads the cache could not answer",
             "evictions": "entries dropped as expired or to make room",
             "invalidations": "entries dropped by a change or telemetry event"}

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        cache = getattr(getattr(self.app.state, "graphql", None), "cache", None)
        if cache is None:
            return
        stats = cache.stats()
        for kind, text in self._HELP.items():
            c = CounterMetricFamily(f"patronus_controller_graphql_cache_{kind}", f"GraphQL cache: {text}",
                                    labels=["cache"])
            for area, s in sorted(stats.items()):
                c.add_metric([area], float(s[kind]))
            yield c
        bus = getattr(self.app.state.graphql, "bus", None)
        if bus is not None:
            from prometheus_client.core import GaugeMetricFamily

            yield GaugeMetricFamily("patronus_controller_graphql_subscriptions",
                                    "GraphQL subscriptions open now (each receiving the controller's events)",
                                    value=float(len(bus.subs)))
            yield CounterMetricFamily("patronus_controller_graphql_subscribers_dropped",
                                      "GraphQL subscribers closed for falling behind (4413)",
                                      value=float(bus.slow_dropped))


class ControllerMetrics:
    """The controller's metrics in a registry of their own (``registry``)."""

    def __init__(self, service: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("patronus_controller_requests", "HTTP requests answered, by route template, "
                                "method and status", ["route", "method", "status"], registry=r)
        self.latency = Histogram("patronus_controller_request_duration_seconds", "HTTP request latency "
                                 "(first byte in to last byte out), by route template", ["route"],
                                 buckets=BUCKETS, registry=r)
        self.auth_failures = Counter("patronus_controller_auth_failures", "Requests refused by authentication "
                                     "or authorisation, by reason", ["reason"], registry=r)
        self.connected_agents = Gauge("patronus_controller_connected_agents", "Site agents connected now",
                                      registry=r)
        self.in_flight = Gauge("patronus_controller_requests_in_flight", "HTTP requests being handled now",
                               registry=r)
        r.register(_Sites(service))
        self._reasons: set[str] = set()
        self._lock = threading.Lock()

    # -- hooks for the rest of the controller ------------------------------------------

    def leader_from(self, leader: Any) -> None:
        """``patronus_controller_leader{role}``: 1 while this replica holds the role (etcd replicas),
        and ``patronus_controller_leader_changes_total``: times it took it."""
        g = Gauge("patronus_controller_leader", "1 while this replica holds the role (replicas on etcd)",
                  ["role"], registry=self.registry)
        g.labels(leader.name).set_function(lambda: 1.0 if leader.is_leader else 0.0)
        c = Gauge("patronus_controller_leader_acquisitions", "Times this replica took the role", ["role"],
                  registry=self.registry)
        c.labels(leader.name).set_function(lambda: float(leader.changes))

    def set_connected_agents(self, n: int) -> None:
        """The number of agents connected now (the agent channel calls it on every connect and disconnect)."""
        self.connected_agents.set(n)

    def connected_agents_from(self, callback: Callable[[], float]) -> None:
        """Read the number of connected agents from ``callback()`` on every scrape instead."""
        self.connected_agents.set_function(callback)

    def auth_failure(self, exc: BaseException) -> None:
        """Count a refused request (no-op for an exception that is not an auth failure)."""
        reason = auth_reason(exc)
        if reason is None:
            return
        with self._lock:
            if reason not in self._reasons:
                if len(self._reasons) >= MAX_REASONS:
                    reason = "other"
                else:
                    self._reasons.add(reason)
        self.auth_failures.labels(reason).inc()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4) of every series."""
        return generate_latest(self.registry)


class _Middleware:
    """ASGI middleware: counts and times every HTTP request by route template.

    Outermost of the app's middleware, so a body refused with 413 before
    routing is counted too (its route is found here)."""

    def __init__(self, app: Any, metrics: ControllerMetrics, routes: Callable[[], list[Any]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _template(self, scope: dict[str, Any]) -> str:
        route = scope.get("route")
        if route is None:   # not routed (refused before routing): match it here
            from starlette.routing import Match

            for r in self.routes():
                try:
                    match, _ = r.matches(scope)
                except Exception:  # noqa: BLE001 - a route that cannot match this scope
                    continue
                if match is not Match.NONE:
                    route = r
                    break
        return getattr(route, "path", None) or UNMATCHED

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        method = scope.get("method", "GET")
        self.metrics.in_flight.inc()
        with span(f"HTTP {method}", **{"http.request.method": method}) as sp:
            try:
                await self.app(scope, receive, send_status)
            finally:
                self.metrics.in_flight.dec()
                route = self._template(scope)
                self.metrics.observe(route, method, status, time.perf_counter() - start)
                if sp is not None:   # tracing on (patronus.tracing)
                    sp.update_name(f"HTTP {method} {route}")
                    sp.set_attribute("http.route", route)
                    sp.set_attribute("http.response.status_code", status)


def metrics_of(app: Any) -> ControllerMetrics:
    """The :class:`ControllerMetrics` that :func:`install` put on ``app``."""
    return app.state.metrics


def install(app: Any, service: Any, *, dependencies: list[Any] | None = None) -> ControllerMetrics:
    """Add the request middleware and ``GET /metrics`` to a FastAPI ``app``;
    the metrics object is ``app.state.metrics``. ``dependencies`` guard the
    route (``create_app`` passes ``[Depends(require(ACTION))]``)."""
    m = ControllerMetrics(service)
    m.registry.register(_GraphQLCache(app))
    app.state.metrics = m

    @app.get(METRICS_PATH, dependencies=dependencies or [], tags=["metrics"],
             response_class=Response, responses={200: {"content": {CONTENT_TYPE_PLAIN_0_0_4: {}},
                                                       "description": "Prometheus text exposition format"}})
    def metrics() -> Response:
        return Response(m.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    app.add_middleware(_Middleware, metrics=m, routes=lambda: app.router.routes)
    return m
