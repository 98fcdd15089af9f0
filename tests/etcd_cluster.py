"""A real etcd cluster for tests: N members of Debian's etcd-server on
loopback (free ports, data in a temporary directory), members killed and
brought back on demand, every process stopped even when the test fails.

    with EtcdCluster(tmp_path, 3) as etcd:
        db = EtcdDB(etcd.url, local=tmp_path / "t.db")
        etcd.kill(0)        # SIGKILL one member
        etcd.start(0)       # and back, with its data
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def missing() -> str | None:
    """Why no cluster can start here (None: it can)."""
    if not os.path.exists(ETCD):
        return "etcd is not installed (apt-get install etcd-server)"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class EtcdCluster:
    """``n`` etcd members on 127.0.0.1; ``url`` is the ``etcd://`` store URL naming them all."""

    def __init__(self, base: Path, n: int = 3, *, prefix: str = "", host: str = "127.0.0.1",
                 netns: str | None = None, tls: bool = False) -> None:
        """``netns``: run the members inside that network namespace, on
        ``host`` (an address of it this process reaches too). ``tls``:
        clients must speak TLS and present a certificate of the cluster's
        own CA (``ca``, ``client_cert``, ``client_key``: files made here)."""
        self.base = Path(base) / f"etcd-{uuid.uuid4().hex[:6]}"
        self.n = n
        self.host, self.netns, self.tls = host, netns, tls
        if tls:
            self.base.mkdir(parents=True, exist_ok=True)
            self.ca, self.server_cert, self.server_key, self.client_cert, self.client_key = _pki(self.base, host)
        ports = _free_ports(2 * n)
        self.client_ports, self.peer_ports = ports[:n], ports[n:]
        self.token = f"pn-{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.prefix = prefix
        self.logs = [self.base / f"m{i}.log" for i in range(n)]

    @property
    def url(self) -> str:
        scheme = "etcds" if self.tls else "etcd"
        return f"{scheme}://" + ",".join(f"{self.host}:{p}" for p in self.client_ports) + self.prefix

    def member_url(self, i: int) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_ports[i]}"

    def _args(self, i: int) -> list[str]:
        cluster = ",".join(f"m{j}=http://{self.host}:{self.peer_ports[j]}" for j in range(self.n))
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*wrap, ETCD, "--name", f"m{i}", "--data-dir", str(self.base / f"m{i}"),
                "--listen-client-urls", self.member_url(i), "--advertise-client-urls", self.member_url(i),
                "--listen-peer-urls", f"http://{self.host}:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_ports[i]}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.token, "--auto-compaction-mode", "periodic",
                "--auto-compaction-retention", "1h", "--logger", "zap", "--log-level", "warn",
                *(["--cert-file", str(self.server_cert), "--key-file", str(self.server_key),
                   "--trusted-ca-file", str(self.ca), "--client-cert-auth"] if self.tls else [])]

    def start(self, i: int | None = None, timeout: float = 60.0) -> EtcdCluster:
        """Start member ``i`` (every member when None) and wait until it is healthy."""
        self.base.mkdir(parents=True, exist_ok=True)
        which = range(self.n) if i is None else [i]
        for j in which:
            if self.procs[j] is not None and self.procs[j].poll() is None:
                continue
            log = open(self.logs[j], "ab")  # noqa: SIM115 - the process holds it
            self.procs[j] = subprocess.Popen(self._args(j), stdout=log, stderr=log, start_new_session=True)
            log.close()
        for j in which:
            self.wait_healthy(j, timeout)
        return self

    def health(self, i: int) -> dict[str, Any] | None:
        ctx = None
        if self.tls:
            import ssl

            ctx = ssl.create_default_context(cafile=str(self.ca))
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        try:
            with urllib.request.urlopen(f"{self.member_url(i)}/health", timeout=2, context=ctx) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against the cluster (as root once auth is on: ``--user``)."""
        eps = ",".join(self.member_url(i) for i in range(self.n))
        tls = ["--cacert", str(self.ca), "--cert", str(self.client_cert), "--key", str(self.client_key)] \
            if self.tls else []
        r = subprocess.run(["etcdctl", "--endpoints", eps, *tls, *args], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "ETCDCTL_API": "3"})
        if r.returncode:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def wait_healthy(self, i: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            p = self.procs[i]
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"etcd member m{i} exited {p.returncode}: {self.log_tail(i)}")
            h = self.health(i)
            if h and h.get("health") == "true":
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd member m{i} not healthy after {timeout:g} s: {self.log_tail(i)}")

    def log_tail(self, i: int, n: int = 2000) -> str:
        try:
            return self.logs[i].read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (its data stays; :meth:`start` brings it back)."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        self.procs[i] = None

    def stop(self) -> None:
        for i in range(self.n):
            self.kill(i)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pki(d: Path, host: str) -> tuple[Path, Path, Path, Path, Path]:
    """A CA, a server certificate for ``host`` and a client certificate, as PEM files in ``d``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path: Path, key: Any, cert: Any) -> tuple[Path, Path]:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(path.with_suffix(".key"), 0o600)
        return path.with_suffix(".crt"), path.with_suffix(".key")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test etcd CA")).issuer_name(name("test etcd CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_crt, _ = write(d / "ca", ca_key, ca)

    def leaf(cn: str, usage: Any, san: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        # the client's has no CommonName: with authentication on, etcd's JSON gateway refuses a client
        # certificate that has one (it would be taken for a user name; ours come from the password)
        subject = name(cn) if san else x509.Name([])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                             x509.DNSName("localhost")]), critical=False)
        return write(d / cn, key, b.sign(ca_key, hashes.SHA256()))

    # the server's certificate is also a client's: etcd's JSON gateway dials the member's gRPC with it
    server = leaf("server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], True)
    client = leaf("client", [ExtendedKeyUsageOID.CLIENT_AUTH], False)
    return ca_crt, server[0], server[1], client[0], client[1]
