"""``patronus operator``: the kopf operator for ``Site`` and ``Policy``
resources (``sdwan.patronus.dev/v1``), run inside this process's own asyncio
loop next to its metrics and health servers (:mod:`patronus.operator.health`).

What kopf is told (and so what it needs from the Kubernetes API):

- handlers per kind: ``on.resume`` / ``on.create`` / ``on.update`` (spec
  changes) -> :meth:`Reconciler.apply`; ``on.delete`` ->
  :meth:`Reconciler.delete` (kopf adds the finalizer :data:`FINALIZER`
  first, so nothing is orphaned on the controller); a timer every
  :data:`REFRESH_INTERVAL_S` -> :meth:`Reconciler.refresh`;
- standalone (no peering objects), no cluster scanning (the resources are
  found at start through API discovery; no CRD or namespace list/watch; a
  run that finds neither kind while the API answers is started again after
  :data:`RESCAN_S`, so CRDs installed after the operator are picked up),
  handler progress and the last-handled spec in annotations under
  ``sdwan.patronus.dev/`` (the status holds only the operator's fields);
- Kubernetes events: a Normal one per change made on the controller
  (reason Created, Updated, Adopted, Removed) and kopf's own Warning/Error
  ones for failures (``Handler 'apply' failed temporarily: <why>``);
- namespaces: ``--namespace NS`` (repeatable; default ``$POD_NAMESPACE``,
  else ``default``) or ``--all-namespaces``.

So the Kubernetes API verbs it uses are: ``list``, ``watch``, ``patch`` on
``sites`` and ``policies`` (group ``sdwan.patronus.dev``), ``patch`` on
``sites/status`` and ``policies/status``, ``create`` on ``events`` (core
group), in the namespaces it watches (a ClusterRole with
``--all-namespaces``); and API discovery (``/api``, ``/apis``), which every
authenticated account may read.

Kubernetes credentials (a kopf login handler): ``--kubeconfig PATH``; else
the pod's service account; else ``$KUBECONFIG`` or ``~/.kube/config``.
Every request kopf makes goes through a session traced here, so
``/readyz`` and ``patronus_operator_kubernetes_up`` say whether the API
answers. When kopf stops on an error (the API unreachable for about a
minute of kopf's own retries, no credentials), it is started again after
5 s, doubling to :data:`KOPF_RESTART_MAX_S`; the process, its metrics and
its probes live on.

The controller: ``--controller URL[,URL...]`` (replicas, failed over on
connection errors and 503), the API key from ``--api-key-file PATH`` or
``$PATRONUS_API_KEY`` (never logged), ``--ca PATH`` (the controller's
certificate, pinned, or a CA bundle). It is checked every
:data:`CONTROLLER_CHECK_S` seconds.

SIGTERM or SIGINT: no new request to the controller is started, kopf is
told to stop (no new events are taken; a worker gets 2 s to finish the
reconciliation it holds and write its status; a handler thread already
talking to the controller always finishes that request, at most
:data:`CONTROLLER_TIMEOUT_S`), kopf is cancelled if it has not stopped after
:data:`SHUTDOWN_S` s (its requests to an unreachable Kubernetes API sleep
between retries), the servers close, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf

from .. import logfmt
from ..errors import ConfigError, PatronusError
from . import ANNOTATION_PREFIX, GROUP, KINDS, VERSION, Kind
from .health import Health, Metrics, serve
from .pool import ControllerPool, OperatorStopping, tls_context
from .reconcile import Reconciler, classify

__all__ = ["main", "Options", "build_registry", "kopf_settings", "REFRESH_INTERVAL_S", "CONTROLLER_CHECK_S",
           "SHUTDOWN_S", "FINALIZER", "KOPF_RESTART_MAX_S"]

log = logging.getLogger("patronus.operator")

REFRESH_INTERVAL_S = 15.0     # the status timer of every resource
CONTROLLER_CHECK_S = 10.0     # the controller check behind /readyz and controller_up
CONTROLLER_TIMEOUT_S = 5.0    # per request to the controller
SHUTDOWN_S = 3.0              # what kopf (its workers: 2 s to finish) and the checks get to stop after SIGTERM
KOPF_RESTART_MIN_S = 5.0
KOPF_RESTART_MAX_S = 60.0
RESCAN_S = 60.0               # kopf watching neither kind this long (the API answering): run it again
FINALIZER = f"{GROUP}/finalizer"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
MAX_KEY_FILE = 4096
_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")   # an RFC 1123 label


# -- options ----------------------------------------------------------------------------------------


@dataclass
class Options:
    """The checked options of ``patronus operator`` (:meth:`from_args`)."""

    controller: str
    api_key: str = field(repr=False)
    ca: str | None = None
    kubeconfig: str | None = None
    namespaces: list[str] = field(default_factory=list)
    clusterwide: bool = False
    listen: str = "0.0.0.0"
    metrics_port: int = 8080
    health_port: int = 8081
    log_format: str = "text"

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> Options:
        """From the parsed command line; :class:`ConfigError` naming the option that is wrong."""
        env = os.environ if environ is None else environ
        if not args.controller:
            raise ConfigError("--controller", None, "is required (https://host:port, several separated by commas)")
        key = _api_key(args.api_key_file, env)
        if args.all_namespaces and args.namespace:
            raise ConfigError("--namespace", args.namespace, "and --all-namespaces exclude each other")
        namespaces = list(args.namespace or ([] if args.all_namespaces else [env.get("POD_NAMESPACE") or "default"]))
        for ns in namespaces:
            if not _NAMESPACE.fullmatch(ns):
                raise ConfigError("--namespace", ns, "is not a Kubernetes namespace name")
        for opt, port in (("--metrics-port", args.metrics_port), ("--health-port", args.health_port)):
            if not 0 <= port <= 65535:
                raise ConfigError(opt, port, "is not a TCP port (0..65535; 0: any free port)")
        if args.metrics_port == args.health_port and args.metrics_port != 0:
            raise ConfigError("--health-port", args.health_port, "is the same as --metrics-port")
        if args.kubeconfig is not None and not os.path.isfile(args.kubeconfig):
            raise ConfigError("--kubeconfig", args.kubeconfig, "is not a file")
        if args.ca is not None and not os.path.isfile(args.ca):
            raise ConfigError("--ca", args.ca, "is not a file")
        if not args.listen_address or len(args.listen_address) > 253:
            raise ConfigError("--listen-address", args.listen_address, "is not an address")
        return cls(controller=args.controller, api_key=key, ca=args.ca, kubeconfig=args.kubeconfig,
                   namespaces=namespaces, clusterwide=bool(args.all_namespaces), listen=args.listen_address,
                   metrics_port=args.metrics_port, health_port=args.health_port, log_format=args.log_format)


def _api_key(path: str | None, env: Any) -> str:
    """The controller API key: the file's first line, else ``$PATRONUS_API_KEY``.
    The file may be any regular file (a mounted Secret is owned by root and
    world-readable inside the pod); it is read up to :data:`MAX_KEY_FILE` bytes."""
    if path is not None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ConfigError("--api-key-file", path, f"cannot be read: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError("--api-key-file", path, "is not a regular file")
            raw = f.read(MAX_KEY_FILE + 1)
        if len(raw) > MAX_KEY_FILE:
            raise ConfigError("--api-key-file", path, f"is larger than {MAX_KEY_FILE} bytes: not an API key")
        lines = raw.decode("utf-8", "replace").strip().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError("--api-key-file", path, "is empty")
        return key
    key = (env.get("PATRONUS_API_KEY") or "").strip()
    if not key:
        raise ConfigError("--api-key-file", None, "is missing: give the controller API key in a file "
                                                  "(--api-key-file PATH) or in $PATRONUS_API_KEY")
    return key


# -- kopf -----------------------------------------------------------------------------------------------


def kopf_settings() -> kopf.OperatorSettings:
    """kopf's settings for this operator (one object per kopf run)."""
    s = kopf.OperatorSettings()
    s.peering.standalone = True
    s.peering.mandatory = False
    s.scanning.disabled = True                    # no CRD or namespace list/watch: least privilege
    s.persistence.finalizer = FINALIZER
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX)
    # Kubernetes events: every warning and error logged about an object (kopf's "Handler 'apply' failed
    # temporarily: <why>"), and a Normal event per change made (_register); not kopf's "succeeded" lines
    # (the status timer's would be one event per object every 15 s)
    s.posting.enabled = True
    s.posting.loggers = True
    s.posting.level = logging.WARNING
    s.execution.max_workers = 8                   # handlers (blocking controller calls) at once
    s.networking.request_timeout = 60.0
    s.networking.connect_timeout = 10.0
    s.watching.connect_timeout = 10.0
    s.watching.server_timeout = 600.0
    s.queueing.exit_timeout = 2.0
    # kopf's own guard SIGKILLs the process some time after kopf stopped on an error (not on its stop flag):
    # here kopf stopping on an error is retried, and the process's own shutdown has its own bound
    s.process.ultimate_exiting_timeout = None
    return s


def _tracing(health: Health) -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def on_end(session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
        health.k8s_answer(params.method, params.url, params.response.status)

    async def on_exception(session: Any, ctx: Any, params: aiohttp.TraceRequestExceptionParams) -> None:
        health.k8s_failed(params.url, params.exception)

    trace.on_request_end.append(on_end)
    trace.on_request_exception.append(on_exception)
    return trace


def make_login(health: Health, kubeconfig: str | None) -> Callable[..., Any]:
    """The kopf login handler: credentials from ``kubeconfig`` (a path), the
    service account, or ``$KUBECONFIG`` / ``~/.kube/config``, in a session
    whose every request is reported to ``health``."""
    trace = _tracing(health)

    async def login(**kw: Any) -> Any:
        try:
            if kubeconfig is None and os.path.exists(SERVICE_ACCOUNT_TOKEN):
                info = kopf.login_with_service_account(**kw)
            else:   # --kubeconfig is in $KUBECONFIG (main put it there)
                info = kopf.login_with_kubeconfig(**kw)
        except Exception as e:
            health.logged_in(f"login failed: {type(e).__name__}: {str(e)[:300]}")
            raise
        if info is None:
            health.logged_in("no credentials: no --kubeconfig, no service account token "
                             f"({SERVICE_ACCOUNT_TOKEN}), no $KUBECONFIG or ~/.kube/config")
            return None
        health.logged_in(None)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
            headers=info.as_http_headers(), proxy=info.proxy_url, trust_env=info.trust_env,
            trace_configs=[trace])
        return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                                   priority=info.priority, expiration=info.expiration, aiohttp_session=session)

    return login


def build_registry(reconciler: Reconciler, metrics: Metrics | None = None,
                   login: Callable[..., Any] | None = None) -> kopf.OperatorRegistry:
    """A kopf registry with the handlers of both kinds (and ``login``)."""
    reg = kopf.OperatorRegistry()
    if login is not None:
        kopf.on.login(registry=reg, id="patronus-login")(login)
    for kind in KINDS.values():
        _register(reg, reconciler, metrics, kind)
    return reg


def _register(reg: kopf.OperatorRegistry, rec: Reconciler, metrics: Metrics | None, kind: Kind) -> None:
    managed: set[tuple[str | None, str]] = set()

    def count() -> None:
        if metrics is not None:
            metrics.managed.labels(kind.kind).set(len(managed))

    def changed(kw: dict[str, Any]) -> None:
        """A Normal event when the controller's object was created, replaced or adopted."""
        conds = kw["patch"].get("status", {}).get("conditions") or []
        synced = next((c for c in conds if c.get("type") == "Synced"), None)
        if synced is not None and synced["status"] == "True" and synced["reason"] != "UpToDate":
            kopf.event(kw["body"], type="Normal", reason=synced["reason"], message=synced["message"])

    def apply(**kw: Any) -> None:
        managed.add((kw.get("namespace"), kw["name"]))
        count()
        rec.apply(kind.kind, **kw)
        changed(kw)

    def delete(**kw: Any) -> None:
        rec.delete(kind.kind, **kw)
        managed.discard((kw.get("namespace"), kw["name"]))
        count()
        kopf.event(kw["body"], type="Normal", reason="Removed",
                   message=f"removed {kind.singular} {kw['name']!r} from the controller")

    def refresh(**kw: Any) -> None:
        managed.add((kw.get("namespace"), kw["name"]))
        count()
        rec.refresh(kind.kind, **kw)
        changed(kw)   # drift corrected

    sel = (GROUP, VERSION, kind.plural)
    kopf.on.resume(*sel, registry=reg, id="apply")(apply)
    kopf.on.create(*sel, registry=reg, id="apply")(apply)
    kopf.on.update(*sel, registry=reg, id="apply", field="spec")(apply)
    kopf.on.delete(*sel, registry=reg, id="delete")(delete)
    kopf.timer(*sel, registry=reg, id="refresh", interval=REFRESH_INTERVAL_S, initial_delay=2.0)(refresh)


# -- the process -------------------------------------------------------------------------------------------


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _check_controller(pool: ControllerPool, health: Health, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.to_thread(pool.check)
            if health.controller is not None:
                log.info("controller %s answers", pool.url)
            health.controller_checked(None)
        except OperatorStopping:
            return
        except Exception as e:
            msg = classify(e, url=pool.url).message
            if health.controller != msg:
                log.warning("controller check: %s", msg)
            health.controller_checked(msg)
        await _sleep_unless(stop, CONTROLLER_CHECK_S)


class _Supervisor:
    """Runs kopf (spawn_tasks + run_tasks, so that this process's own signal
    handlers stay in place) again and again until ``stop`` is set."""

    def __init__(self, opts: Options, registry: kopf.OperatorRegistry, health: Health, stop: asyncio.Event,
                 install_signals: Callable[[], None]) -> None:
        self.opts, self.registry, self.health, self.stop = opts, registry, health, stop
        self.install_signals = install_signals
        self.settings: kopf.OperatorSettings | None = None
        self.rescan = False

    async def _watchdog(self, run_stop: asyncio.Event) -> None:
        """Stop this kopf run when the process stops, or when the API answers but kopf watches neither
        kind after :data:`RESCAN_S` (the CRDs were installed after it looked: scanning is off, so only a
        new run finds them)."""
        t0 = time.monotonic()
        while not run_stop.is_set():
            if self.stop.is_set():
                break
            h = self.health
            absent = [p for p in h.watched if p not in h.watching]
            if (absent and h.kopf is None and h.login is None and h.k8s_error is None
                    and time.monotonic() - t0 > RESCAN_S):
                log.warning("kopf watches no %s after %g s (are the CRDs installed?): starting it again to "
                            "look for them", ", ".join(absent), RESCAN_S)
                self.rescan = True
                break
            await _sleep_unless(self.stop, 1.0)
        run_stop.set()

    async def run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            started = time.monotonic()
            error: BaseException | None = None
            self.settings = kopf_settings()
            self.rescan = False
            run_stop = asyncio.Event()
            watchdog = asyncio.create_task(self._watchdog(run_stop), name="kopf watchdog")
            try:
                existing = asyncio.all_tasks()
                tasks = await kopf.spawn_tasks(
                    registry=self.registry, settings=self.settings, standalone=True, memo=kopf.Memo(),
                    clusterwide=self.opts.clusterwide, namespaces=self.opts.namespaces, stop_flag=run_stop)
                self.install_signals()   # kopf put its own on SIGINT/SIGTERM: ours again
                self.health.kopf_running(None)
                await kopf.run_tasks(tasks, ignored=existing)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                error = e
            finally:
                watchdog.cancel()
                self.settings.execution.executor.shutdown(wait=False, cancel_futures=True)
            if self.stop.is_set():
                break
            if self.rescan:
                failures = 0
            else:
                failures = 1 if time.monotonic() - started > 10 * KOPF_RESTART_MAX_S else failures + 1
            delay = min(KOPF_RESTART_MIN_S * 2 ** min(max(failures - 1, 0), 16), KOPF_RESTART_MAX_S)
            why = ("no resource to watch" if self.rescan else
                   f"{type(error).__name__}: {str(error)[:300]}" if error is not None else "it stopped")
            self.health.kopf_running(f"restarting in {delay:g} s after: {why}")
            log.warning("kopf stopped (%s); starting it again in %g s", why, delay)
            await _sleep_unless(self.stop, delay)
        self.health.kopf_running("stopped")


async def run(opts: Options) -> int:
    """The operator until SIGTERM or SIGINT; the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    verify: Any = tls_context(opts.ca) if opts.ca else True
    pool = ControllerPool(opts.controller, api_key=opts.api_key, verify=verify, timeout=CONTROLLER_TIMEOUT_S)
    metrics = Metrics()
    rec = Reconciler(pool, observe=metrics.observe)
    health = Health(metrics, watched=[k.plural for k in KINDS.values()], busy_for=rec.longest_running)

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: stopping (no new work; what runs finishes)", sig.name)
        pool.stopping.set()
        stop.set()

    def install_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

    install_signals()
    try:
        runners, ports = await serve(health, metrics, host=opts.listen, metrics_port=opts.metrics_port,
                                     health_port=opts.health_port)
    except OSError as e:
        log.error("cannot listen on %s: %s", opts.listen, e)
        pool.close()
        return 2
    host = f"[{opts.listen}]" if ":" in opts.listen else opts.listen
    log.info("patronus operator: metrics on http://%s:%d/metrics, health on http://%s:%d (/livez /readyz /healthz); "
             "controller %s; %s", host, ports["metrics"], host, ports["health"], ", ".join(pool.urls),
             "all namespaces" if opts.clusterwide else "namespaces " + ", ".join(opts.namespaces))
    sup = _Supervisor(opts, build_registry(rec, metrics, make_login(health, opts.kubeconfig)), health, stop,
                      install_signals)
    checker = asyncio.create_task(_check_controller(pool, health, stop), name="controller check")
    supervisor = asyncio.create_task(sup.run(), name="kopf supervisor")
    health.tasks = {"kopf supervisor": supervisor, "controller check": checker}
    try:
        await stop.wait()
    finally:
        pool.stopping.set()
        stop.set()
        # the full budget when there may be work to finish; kopf with no Kubernetes API has none (it only
        # sleeps between retries of requests nobody answers)
        working = rec.in_progress() > 0 or (health.kopf is None and health.k8s_error is None)
        budget = SHUTDOWN_S if working else 0.5
        _, pending = await asyncio.wait({supervisor, checker}, timeout=budget)
        for t in pending:
            t.cancel()
        if pending:
            log.info("stopping: %s did not stop in %g s: cancelled", ", ".join(t.get_name() for t in pending),
                     budget)
            await asyncio.wait(pending, timeout=1.0)
        for r in runners:
            await r.cleanup()
        pool.close()
    log.info("stopped")
    return 0


class _ObjectPrefix(logging.Filter):
    """kopf's per-object lines ("Handler 'apply' succeeded.") prefixed with the object: [Site default/hq]."""

    def filter(self, record: logging.LogRecord) -> bool:
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and ref.get("name") and isinstance(record.msg, str) \
                and not getattr(record, "patronus_prefixed", False):
            where = f"{ref['namespace']}/{ref['name']}" if ref.get("namespace") else str(ref["name"])
            record.msg = f"[{ref.get('kind') or 'object'} {where}] {record.msg}"
            record.patronus_prefixed = True
        return True


def main(args: argparse.Namespace) -> int:
    """``patronus operator`` with the parsed options (patronus.cli): 0 after
    SIGTERM/SIGINT, 2 on a bad option."""
    try:
        opts = Options.from_args(args)
    except PatronusError as e:
        print(f"patronus operator: {e}", file=sys.stderr)
        return 2
    root = logfmt.configure(opts.log_format, level=logging.INFO)
    root.handlers[-1].addFilter(_ObjectPrefix())
    for noisy in ("aiohttp.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if opts.kubeconfig is not None:
        os.environ["KUBECONFIG"] = os.path.abspath(opts.kubeconfig)   # what kopf's kubeconfig login reads
    try:
        return asyncio.run(run(opts))
    except PatronusError as e:
        print(f"patronus operator: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
