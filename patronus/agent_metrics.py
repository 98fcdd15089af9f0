"""Prometheus metrics of a running site agent: ``patronus agent --metrics-listen HOST:PORT``.

Read at each scrape from the agent itself (nothing is sampled in between):

- ``patronus_agent_info{site,backend,version}``, ``patronus_agent_ready``,
  ``patronus_agent_desired_state_applied_timestamp_seconds``, and with a
  controller ``patronus_agent_controller_connected`` and
  ``patronus_agent_telemetry_dropped_total``;
- the data plane's counters: ``patronus_dataplane_packets_total{policy}``
  and ``..._bytes_total{policy}`` (the default class as ``(default)``),
  ``patronus_dataplane_malformed_total{reason}``, ``patronus_dataplane_flows``,
  ``..._flow_capacity`` and the evictions and expiries;
- per path: ``patronus_path_rtt_seconds``, ``..._jitter_seconds``,
  ``..._loss_ratio``, ``..._mos`` (from the probes), ``patronus_path_bfd_up``,
  ``patronus_path_bfd_state{state}`` and ``patronus_path_bfd_downs_total``;
  ``patronus_path_sla_met{path,app}`` for every application a policy names;
- ``patronus_failover_moves_total`` and ``patronus_bfd_transitions_total``;
- ``patronus_agent_loop_stalls_total``: the event loop woke 100 ms or more late.

The endpoint serves ``GET /metrics`` only. On a loopback address it is
open (as node_exporter is); on any other address it needs a bearer token
(``--metrics-token-file``), compared in constant time.

>>> parse_listen("127.0.0.1:9464")
('127.0.0.1', 9464)
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import ConfigError

__all__ = ["AgentCollector", "MetricsServer", "parse_listen", "check_listen", "serve"]

_BFD_STATES = ("admindown", "down", "init", "up")
_DP_COUNTERS = {"evicted": "flows evicted from a full table", "expired_idle": "flows expired idle",
                "expired_active": "flows expired by the active timeout", "export_lost": "flow exports lost"}


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ConfigError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        p = int(port)
    except ValueError:
        raise ConfigError("--metrics-listen", text, "is not ADDRESS:PORT (an IP address and a port)") from None
    if not sep or not 0 <= p <= 65535:
        raise ConfigError("--metrics-listen", text, "is not ADDRESS:PORT (an IP address and a port)")
    return host, p


def check_listen(listen: str, token: str | None) -> tuple[str, int]:
    """(host, port) of a usable metrics address: ConfigError unless it parses,
    and unless it is loopback or a token authenticates the scrapes."""
    host, port = parse_listen(listen)
    if not ipaddress.ip_address(host).is_loopback and not token:
        raise ConfigError("--metrics-listen", listen, "is not a loopback address: give --metrics-token-file "
                                                     "too, so that scrapes are authenticated")
    return host, port


class AgentCollector:
    """A prometheus_client collector over a ``SiteAgent`` (module docstring)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        a = self.agent
        info = GaugeMetricFamily("patronus_agent_info", "the agent: its site, data plane and desired state version",
                                 labels=["site", "backend", "version"])
        info.add_metric([a.site, a.backend_name() or "", str(a.version or "")], 1)
        yield info
        status = a.status()
        yield GaugeMetricFamily("patronus_agent_ready", "1 when every tunnel is up with BFD running",
                                value=1 if status["ready"] else 0)
        if a.applied_at is not None:
            yield GaugeMetricFamily("patronus_agent_desired_state_applied_timestamp_seconds",
                                    "when the desired state in use was applied (Unix time)", value=a.applied_at)
        if a.controller is not None:
            yield GaugeMetricFamily("patronus_agent_controller_connected", "1 while the controller's channel is open",
                                    value=1 if a.connected else 0)
            yield CounterMetricFamily("patronus_agent_telemetry_dropped", "telemetry items dropped while the "
                                      "controller was away and the outbox full", value=a.telemetry_dropped)
        yield CounterMetricFamily("patronus_agent_loop_stalls", "times the agent's event loop woke 100 ms or more "
                                  "late (BFD peers may have declared sessions Down)", value=a.loop_stalls)
        dp = a.dp
        if dp is not None:
            c = dp.counters()
            pk = CounterMetricFamily("patronus_dataplane_packets", "packets by policy", labels=["policy"])
            by = CounterMetricFamily("patronus_dataplane_bytes", "bytes by policy", labels=["policy"])
            for name, v in [("(default)", c["default"]), *c["policies"].items()]:
                pk.add_metric([name], v["packets"])
                by.add_metric([name], v["bytes"])
            yield pk
            yield by
            mal = CounterMetricFamily("patronus_dataplane_malformed", "malformed frames by reason", labels=["reason"])
            for reason, n in c["malformed"].items():
                mal.add_metric([reason], n)
            yield mal
            yield GaugeMetricFamily("patronus_dataplane_flows", "live flow records", value=c["flows"])
            yield GaugeMetricFamily("patronus_dataplane_flow_capacity", "flow table slots", value=c["capacity"])
            for key, doc in _DP_COUNTERS.items():
                if key in c:
                    yield CounterMetricFamily(f"patronus_dataplane_{key}", doc, value=c[key])
        metrics = a.monitor.all_metrics() if getattr(a, "monitor", None) is not None else {}
        fams = {k: GaugeMetricFamily(f"patronus_path_{k}", doc, labels=["path"]) for k, doc in (
            ("rtt_seconds", "round-trip time of the path's probes"), ("jitter_seconds", "jitter of the path's probes"),
            ("loss_ratio", "probe loss (0-1)"), ("mos", "estimated MOS of a call on the path"))}
        for pid, m in sorted(metrics.items()):
            if not m.samples:
                continue
            for key, val in (("rtt_seconds", m.rtt_ms / 1000), ("jitter_seconds", m.jitter_ms / 1000),
                             ("loss_ratio", m.loss_pct / 100), ("mos", m.mos)):
                if val is not None and math.isfinite(val):
                    fams[key].add_metric([pid], val)
        yield from fams.values()
        # each path against the SLA of every application a policy names (the profile's thresholds)
        sla = GaugeMetricFamily("patronus_path_sla_met", "1 while the path's probes meet the SLA of the "
                                "application profile, 0 while they violate it", labels=["path", "app"])
        mesh = getattr(a, "mesh", None)
        if mesh is not None:
            profiles = mesh.profiles
            apps = sorted({p.app for p in mesh.policies if p.app and p.app in profiles})
            for pid, m in sorted(metrics.items()):
                if m.samples:
                    for app in apps:
                        met = profiles[app].violation(m.rtt_ms, m.jitter_ms, m.loss_pct) is None
                        sla.add_metric([pid, app], 1 if met else 0)
        yield sla
        up = GaugeMetricFamily("patronus_path_bfd_up", "1 while the path's BFD session is Up", labels=["path"])
        state = GaugeMetricFamily("patronus_path_bfd_state", "the path's BFD state (1 for the current one)",
                                  labels=["path", "state"])
        downs = CounterMetricFamily("patronus_path_bfd_downs", "times the path's BFD left Up", labels=["path"])
        for pid, p in sorted(status["paths"].items()):
            if p["bfd"] is None:
                continue
            bfd = str(p["bfd"]).replace("_", "")
            up.add_metric([pid], 1 if bfd == "up" else 0)
            for s in _BFD_STATES:
                state.add_metric([pid, s], 1 if s == bfd else 0)
            downs.add_metric([pid], p["downs"])
        yield up
        yield state
        yield downs
        yield CounterMetricFamily("patronus_failover_moves", "(class, site) routes written to the data plane",
                                  value=status["moves"])
        yield CounterMetricFamily("patronus_bfd_transitions", "BFD sessions that came Up or went Down",
                                  value=status["bfd_changes"])
        bgp = status.get("bgp")
        if bgp:
            sess = GaugeMetricFamily("patronus_bgp_session_up", "1 while the BGP session with the LAN router is "
                                     "established", labels=["neighbor"])
            for n, st in sorted(bgp["sessions"].items()):
                sess.add_metric([n], 1.0 if st == "up" else 0.0)
            yield sess
            yield GaugeMetricFamily("patronus_bgp_received_routes", "routes the LAN routers announce (all, "
                                    "before the filter)", value=bgp["received"])
            yield GaugeMetricFamily("patronus_bgp_accepted_prefixes", "learned prefixes the site announces",
                                    value=len(bgp["accepted"]))
            yield GaugeMetricFamily("patronus_bgp_advertised_prefixes", "remote sites' prefixes advertised to the "
                                    "LAN routers", value=len(bgp["advertised"]))
            ref = CounterMetricFamily("patronus_bgp_refused", "announcements refused, by reason", labels=["reason"])
            for r, n in sorted(bgp["refused"].items()):
                ref.add_metric([r], n)
            yield ref
            yield CounterMetricFamily("patronus_bgp_speaker_exits", "times the BGP speaker (ExaBGP) exited and "
                                      "was restarted", value=bgp["speaker"]["exits"])


class MetricsServer:
    """``GET /metrics`` on a thread of its own; ``close()`` stops it."""

    def __init__(self, agent: Any, listen: str, token: str | None = None) -> None:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        host, port = check_listen(listen, token)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AgentCollector(agent))   # type: ignore[arg-type]
        want = None if not token else f"Bearer {token}".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                if self.path.split("?", 1)[0] != "/metrics":
                    self._send(404, b"not found: only /metrics is served\n", "text/plain")
                    return
                if want is not None:
                    got = (self.headers.get("Authorization") or "").encode()
                    if not hmac.compare_digest(got, want):
                        self._send(401, b"unauthorized: Authorization: Bearer <token> required\n", "text/plain",
                                   {"WWW-Authenticate": 'Bearer realm="patronus-agent"'})
                        return
                try:
                    body = generate_latest(registry)
                except Exception as e:  # a half-stopped agent: say so, do not hang the scraper
                    self._send(503, f"agent metrics unavailable: {type(e).__name__}\n".encode(), "text/plain")
                    return
                self._send(200, body, CONTENT_TYPE_LATEST)

            def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:   # scrapes are not worth a log line each
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = 10 if ":" in host else 2   # AF_INET6 / AF_INET

        self.httpd = Server((host, port), Handler)
        self.address = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="agent-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def serve(agent: Any, listen: str, token: str | None = None) -> MetricsServer:
    """Start the agent's metrics endpoint (see the module docstring)."""
    return MetricsServer(agent, listen, token)
