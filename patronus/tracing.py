"""OpenTelemetry traces of controller requests, agent reconciliations and
failover decisions: off by default, and then free (one module-level test, no
OpenTelemetry import).

On with the standard variables: ``OTEL_TRACES_EXPORTER=otlp`` (OTLP over
HTTP/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, with ``OTEL_EXPORTER_OTLP_HEADERS``)
or ``console``; ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name
the process; ``OTEL_BSP_*`` tune the batching; ``OTEL_SDK_DISABLED=true``
keeps it off. The controller and the agent call :func:`setup` at start and
:func:`shutdown` at exit (the last spans are flushed).

Spans: ``HTTP <method> <route>`` for every controller request (route
template, method, status), ``agent.apply`` for every desired state an agent
applies (site, version), ``failover.<reason>`` for every failover decision
(policy, remote site, from and to path, reason, detail).

>>> enabled()
False
>>> with span("nothing", reason="off"):   # a no-op while off
...     pass
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["setup", "span", "enabled", "shutdown", "EXPORTERS"]

EXPORTERS = ("otlp", "console", "none")
log = logging.getLogger(__name__)
_tracer: Any = None
_provider: Any = None


def enabled() -> bool:
    return _tracer is not None


def setup(service_name: str, *, exporter: Any = None) -> bool:
    """Start tracing if the environment asks for it (or ``exporter``, a span
    exporter object, is given: tests); True when on. A value the SDK does
    not know, or a missing SDK, is said once and leaves tracing off."""
    global _tracer, _provider
    if _tracer is not None:
        return True
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter is None and (kind in ("", "none") or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"):
        return False
    if exporter is None and kind not in EXPORTERS:
        log.warning("OTEL_TRACES_EXPORTER=%s is not one of %s: tracing stays off", kind, ", ".join(EXPORTERS))
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER=%s but opentelemetry-sdk is not installed (pip install "
                    "'patronus[tracing]'): tracing stays off", kind)
        return False
    how = kind if exporter is None else "custom"
    if exporter is None:
        if kind == "console":
            exporter = ConsoleSpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning("OTEL_TRACES_EXPORTER=otlp but opentelemetry-exporter-otlp-proto-http is not installed "
                            "(pip install 'patronus[tracing]'): tracing stays off")
                return False
            exporter = OTLPSpanExporter()
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the default name is ours
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracer = _provider.get_tracer("patronus")
    log.info("traces exported (%s) as service %s", how, resource.attributes.get("service.name"))
    return True


@contextlib.contextmanager
def span(name: str, *, root: bool = False, **attributes: Any) -> Iterator[Any]:
    """A span around the block (None attributes are left out); nothing while
    off. ``root``: a trace of its own, whatever span the caller's context
    holds (a failover decision set off by a datagram is no child of the
    reconciliation whose span was current when its socket was set up)."""
    if _tracer is None:
        yield None
        return
    attrs = {f"patronus.{k}" if "." not in k else k: v for k, v in attributes.items() if v is not None}
    context = None
    if root:
        from opentelemetry.context import Context

        context = Context()
    with _tracer.start_as_current_span(name, context=context, attributes=attrs) as s:
        yield s


def shutdown() -> None:
    """Flush the spans not yet sent and stop (idempotent)."""
    global _tracer, _provider
    if _provider is not None:
        try:
            _provider.shutdown()
        finally:
            _provider, _tracer = None, None
