"""Serving the controller: ``init`` makes a state directory, ``run`` serves
it over HTTPS (uvicorn, uvloop), ``ServerThread`` runs it inside a process
(tests, notebooks).

A state directory holds (every secret 0600, the directory 0700):

- ``controller.db``: users, tokens, API keys, the audit log (``ControllerDB``)
- ``state.db``: the patronus state file (the mesh; ``patronus.store``)
- ``signing.key``: the key that signs access tokens
- ``tls.crt`` / ``tls.key``: a self-signed certificate for 127.0.0.1, ::1 and localhost

``run`` stops on SIGTERM or SIGINT: it stops accepting, lets requests in
flight finish (at most 5 s) and returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import datetime
import faulthandler
import hashlib
import ipaddress
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from ..errors import ConfigError, StateError

__all__ = ["init", "run", "build_app", "files", "cert_fingerprint", "parse_listen", "ServerThread",
           "StateDirExists", "ADMIN"]

ADMIN = "admin"
GRACEFUL_S = 5


class StateDirExists(StateError):
    """``init`` refuses a state directory that exists and is not empty."""


def files(state_dir: str | os.PathLike[str]) -> dict[str, Path]:
    d = Path(state_dir)
    return {"db": d / "controller.db", "state": d / "state.db", "signing_key": d / "signing.key",
            "cert": d / "tls.crt", "key": d / "tls.key", "store": d / "store.json",
            "local": d / "replica.db"}


ETCD_PASSWORD_ENV = "PATRONUS_ETCD_PASSWORD"


@attrs.frozen
class StoreConfig:
    """Where the controller keeps its state: ``url`` None for SQLite in the
    state directory, or ``etcd://h1:2379,h2:2379[/prefix]`` (``etcds://``:
    TLS, checked against ``ca``; ``cert``/``key``: a client certificate;
    ``user``: etcd authentication, the password from the environment
    variable ``PATRONUS_ETCD_PASSWORD``, never from a file of ours)."""

    url: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.url is not None:
            from .etcd import parse_url

            parse_url(self.url)
            for name in ("ca", "cert", "key"):
                v = getattr(self, name)
                if v is not None and not os.path.isfile(v):
                    raise ConfigError(f"--etcd-{name}", v, "is not a readable file")
            if (self.cert is None) != (self.key is None):
                raise ConfigError("--etcd-cert", self.cert, "and --etcd-key go together")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> StoreConfig:
        """The store a state directory was made for (``store.json``; SQLite when absent)."""
        import json

        p = files(state_dir)["store"]
        if not p.exists():
            return cls()
        try:
            d = json.loads(p.read_text())
            return cls(**{k: d.get(k) for k in ("url", "ca", "cert", "key", "user")})
        except (ValueError, TypeError, AttributeError) as e:
            raise StateError(f"{str(p)!r} is damaged: {e}") from e

    def open(self, state_dir: str | os.PathLike[str], *, create: bool = False) -> Any:
        """The controller database: a ControllerDB, or an EtcdDB (with the replica's own file beside)."""
        from .db import ControllerDB

        f = files(state_dir)
        if self.url is None:
            return ControllerDB(f["db"], create=create)
        from .etcd import EtcdDB

        return EtcdDB(self.url, local=f["local"], ca=self.ca, cert=self.cert, key=self.key, user=self.user,
                      password=os.environ.get(ETCD_PASSWORD_ENV))


def cert_fingerprint(cert_path: str | os.PathLike[str]) -> str:
    """The SHA-256 of the certificate's DER form, hex with colons (what an agent pins)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)).upper()


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _self_signed(cert_path: Path, key_path: Path, *, days: int = 825) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "patronus controller")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_secret(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init(state_dir: str | os.PathLike[str], store: StoreConfig | None = None) -> dict[str, Any]:
    """Create a controller state directory: the controller database, the
    patronus state file (an empty mesh), a signing key, a self-signed TLS
    certificate and key, and the first admin (``admin``) with a random
    password, returned here and stored nowhere else in clear.

    Refuses (:class:`StateDirExists`) a directory that exists and is not empty.

    With an etcd ``store``, the directory keeps the signing key, the TLS
    certificate and the replica's own telemetry, and the admin is created
    in etcd unless it is there already (another replica was initialised
    first: ``admin_password`` is None). Every replica needs the same
    ``signing.key``, ``tls.crt`` and ``tls.key``: initialise one, copy its
    directory to the others.
    """
    from ..store import Store
    from .auth import Auth, Role, new_signing_key
    from .db import ControllerDB
    from .problems import Conflict
    from .service import Service

    d = Path(state_dir)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise StateDirExists(f"{str(d)!r} exists and is not empty: refusing to overwrite a controller state "
                             "(choose another directory, or remove this one)")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    f = files(d)
    store = store or StoreConfig()
    if store.url is not None:
        import json

        _write_secret(f["store"], json.dumps(store.to_dict(), indent=1).encode())
    _write_secret(f["state"], b"")
    with Store(f["state"]):
        pass
    password: str | None = secrets.token_urlsafe(18)
    db = store.open(d, create=True) if store.url is not None else ControllerDB(f["db"])
    with db:
        svc = Service(f["state"], db)
        key = new_signing_key(f["signing_key"])
        os.chmod(f["signing_key"], 0o600)
        auth = Auth(db, key)
        try:
            auth.create_user(ADMIN, password, Role.ADMIN, actor="init")
        except Conflict:   # a replica initialised before this one made it
            password = None
        svc.close()
    _self_signed(f["cert"], f["key"])
    return {"state_dir": str(d), "admin_user": ADMIN, "admin_password": password, "cert": str(f["cert"]),
            "key": str(f["key"]), "cert_sha256": cert_fingerprint(f["cert"]),
            "db": store.url if store.url is not None else str(f["db"]), "state": str(f["state"])}


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); port 0 picks a free one.

    >>> parse_listen("127.0.0.1:8443"), parse_listen("[::1]:0")
    (('127.0.0.1', 8443), ('::1', 0))
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("--listen", listen, "is not host:port (e.g. 127.0.0.1:8443, [::1]:8443)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


LEADER_TTL_S = 5   # the lease of the replica doing the singleton work (retention); it moves within this


def build_app(state_dir: str | os.PathLike[str], *, introspection: bool = True,
              store: StoreConfig | None = None, replica: str | None = None) -> Any:
    """The REST (and GraphQL) app over a state directory made by :func:`init`;
    ``introspection=False`` turns GraphQL introspection off. ``store``: where
    the state is (default: what the directory was made for, ``store.json``);
    on etcd the replica (named ``replica``, default host:pid) takes part in
    the election of the one doing the singleton work."""
    from .app import create_app
    from .auth import Auth, load_signing_key
    from .service import Service

    f = files(state_dir)
    store = store or StoreConfig.load(state_dir)
    needed = ("state", "signing_key", "cert", "key") + (("db",) if store.url is None else ())
    for k in needed:
        if not f[k].exists():
            raise StateError(f"{str(f[k])!r} is missing: is {str(state_dir)!r} a controller state directory "
                             "(patronus controller init --state DIR)?")
    db = store.open(state_dir)
    leader = None
    if store.url is not None:
        import socket

        replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        leader = db.leadership("housekeeping", replica, LEADER_TTL_S)
    return create_app(Service(f["state"], db), Auth(db, load_signing_key(f["signing_key"])),
                      graphql_introspection=introspection, leader=leader, replica=replica)


def _dump_tasks() -> None:
    """kill -USR2: every asyncio task's stack and the worker-thread tokens in
    use, to stderr (what a request that waits forever is waiting for)."""
    import anyio.to_thread

    out = sys.stderr
    limiter = anyio.to_thread.current_default_thread_limiter()
    print(f"worker threads: {limiter.borrowed_tokens} of {limiter.total_tokens} tokens borrowed, "
          f"{limiter.statistics().tasks_waiting} tasks waiting", file=out)
    for task in asyncio.all_tasks():
        print(f"-- {task!r}", file=out)
        task.print_stack(limit=12, file=out)
    print("-- end of tasks", file=out, flush=True)


def _server(state_dir: str | os.PathLike[str], listen: str, *, log_level: str = "info",
            on_ready: Callable[[str, int], None] | None = None, introspection: bool = True,
            log_format: str = "text", store: StoreConfig | None = None) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after shutting down (exit status -15);
            # a controller stopped by SIGTERM has done its job and exits 0
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if hasattr(signal, "SIGUSR2") and threading.current_thread() is threading.main_thread():
                asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _dump_tasks)
            if self.started and on_ready is not None:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                on_ready(host, port)

    host, port = parse_listen(listen)
    f = files(state_dir)
    config = uvicorn.Config(build_app(state_dir, introspection=introspection, store=store), host=host, port=port, ssl_certfile=str(f["cert"]),
                            ssl_keyfile=str(f["key"]), loop="uvloop", http="h11", lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_S, log_level=log_level, server_header=False,
                            proxy_headers=False, access_log=log_level == "debug",
                            **({"log_config": None} if log_format == "json" else {}))
    if log_format == "json":   # uvicorn's loggers propagate to the root's JSON handler
        from ..logfmt import configure

        configure("json", level=getattr(logging, log_level.upper(), logging.INFO))
    return Server(config)


def run(state_dir: str | os.PathLike[str], listen: str = "127.0.0.1:8443", *, log_level: str = "info",
        on_ready: Callable[[str, int], None] | None = None, introspection: bool = True,
        log_format: str = "text", store: StoreConfig | None = None) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean stop. ``on_ready(host, port)``
    is called once the socket listens (port 0 picks a free port). ``log_format``:
    ``text`` or ``json`` (:mod:`patronus.logfmt`)."""
    server = _server(state_dir, listen, log_level=log_level, on_ready=on_ready, introspection=introspection,
                     log_format=log_format, store=store)
    if hasattr(signal, "SIGUSR1"):   # kill -USR1: every thread's stack to stderr (a stuck controller, diagnosed live)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    from ..tracing import setup, shutdown

    setup("patronus-controller")   # OTEL_TRACES_EXPORTER=otlp|console turns it on
    try:
        server.run()
    finally:
        shutdown()
    return 0 if server.started else 1


class ServerThread:
    """The controller in a thread of this process (tests, notebooks).

    >>> # with ServerThread(state_dir) as srv: httpx.get(srv.url + "/healthz", verify=srv.cert)
    """

    def __init__(self, state_dir: str | os.PathLike[str], listen: str = "127.0.0.1:0",
                 log_level: str = "warning") -> None:
        self.state_dir = Path(state_dir)
        self.cert = str(files(state_dir)["cert"])
        self._ready = threading.Event()
        self.host = ""
        self.port = 0
        self._server = _server(state_dir, listen, log_level=log_level, on_ready=self._on_ready)
        self._thread = threading.Thread(target=self._server.run, name="patronus-controller", daemon=True)

    def _on_ready(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._ready.set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("the controller did not start listening")
        return self

    def stop(self, timeout: float = GRACEFUL_S + 5) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
