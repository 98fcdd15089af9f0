"""OpenTelemetry traces: off (and not even imported) by default; on, a
failover decision is a span with its reason and paths, and a real
controller exports a span per request over OTLP/HTTP to a receiver here
(decoded with the OTLP protobuf definitions), flushed when it stops."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from typing import Any

import pytest

from patronus import tracing

from .controller_server import Controller
from .test_failover_engine import MPLS, RecordingPlane, make_mesh


def test_off_by_default_and_nothing_imported():
    # (FastAPI imports opentelemetry-api by itself when it is installed: the controller is left out of the
    # first count; the SDK, which is what costs, is never imported while off)
    code = ("import sys; from patronus import tracing; from patronus.failover import Engine; import patronus.agent; "
            "tracing.setup('x'); "
            "s = tracing.span('a', reason='b'); s.__enter__(); s.__exit__(None, None, None); "
            "otel = any(m.startswith('opentelemetry') for m in sys.modules); "
            "import patronus.controller.metrics; "
            "print(tracing.enabled(), otel, any(m.startswith('opentelemetry.sdk') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("pathlib").Path(__file__)
                                                                          .resolve().parents[1])})
    assert out.stdout.split() == ["False", "False", "False"], out


def test_an_unknown_exporter_leaves_it_off(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "carrier-pigeon")
    assert tracing.setup("x") is False and not tracing.enabled()
    assert "carrier-pigeon" in caplog.text


def test_a_failover_decision_is_a_span_with_its_reason():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from patronus.failover import Engine

    memory = InMemorySpanExporter()
    assert tracing.setup("test", exporter=memory)
    try:
        mesh = make_mesh(failback_hold_s=0, cooldown_s=0)
        engine = Engine(mesh, RecordingPlane(mesh.policy_table(), flow_capacity=64), local_site="hq")
        engine.start(0.0)
        with tracing.span("agent.apply"):   # a decision is a trace of its own, not a child of what is current
            engine.bfd(MPLS, up=False, now=1.0)
    finally:
        tracing.shutdown()
    spans = memory.get_finished_spans()
    down = [s for s in spans if s.name == "failover.bfd_down"]
    assert down and all(s.attributes["patronus.from_path"] == MPLS for s in down)
    assert {s.attributes["patronus.reason"] for s in down} == {"bfd_down"}
    assert all(s.parent is None for s in down)
    assert any(s.name == "failover.initial" for s in spans)
    assert not tracing.enabled()


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:   # noqa: N802 - the http.server API
        n = int(self.headers.get("Content-Length", "0"))
        _Receiver.bodies.append(self.rfile.read(n))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_controller_exports_a_span_per_request_over_otlp(tmp_path, monkeypatch):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Receiver.bodies = []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}/v1/traces")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ctl-under-test")
    try:
        ctl = Controller(tmp_path / "ctl").start()
        try:
            with ctl.client() as c:
                assert c.get("/healthz").status_code == 200
                assert c.post("/api/v1/auth/login", json={"name": "admin", "password": "wrong"}).status_code == 401
        finally:
            ctl.stop()   # SIGTERM: the last spans are flushed on the way out
    finally:
        srv.shutdown()
    spans, services = {}, set()
    for body in _Receiver.bodies:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans[s.name] = {a.key: (a.value.string_value or a.value.int_value) for a in s.attributes}
    assert services == {"ctl-under-test"}
    assert spans["HTTP GET /healthz"]["http.response.status_code"] == 200
    login = spans["HTTP POST /api/v1/auth/login"]
    assert login["http.route"] == "/api/v1/auth/login" and login["http.response.status_code"] == 401


@pytest.fixture(autouse=True)
def _tracing_off():
    yield
    tracing.shutdown()
