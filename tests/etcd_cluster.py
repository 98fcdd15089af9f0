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
                 netns: str | None = None) -> None:
        """``netns``: run the members inside that network namespace, on
        ``host`` (an address of it this process reaches too)."""
        self.base = Path(base) / f"etcd-{uuid.uuid4().hex[:6]}"
        self.n = n
        self.host, self.netns = host, netns
        ports = _free_ports(2 * n)
        self.client_ports, self.peer_ports = ports[:n], ports[n:]
        self.token = f"pn-{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.prefix = prefix
        self.logs = [self.base / f"m{i}.log" for i in range(n)]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"{self.host}:{p}" for p in self.client_ports) + self.prefix

    def member_url(self, i: int) -> str:
        return f"http://{self.host}:{self.client_ports[i]}"

    def _args(self, i: int) -> list[str]:
        cluster = ",".join(f"m{j}=http://{self.host}:{self.peer_ports[j]}" for j in range(self.n))
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*wrap, ETCD, "--name", f"m{i}", "--data-dir", str(self.base / f"m{i}"),
                "--listen-client-urls", self.member_url(i), "--advertise-client-urls", self.member_url(i),
                "--listen-peer-urls", f"http://{self.host}:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_ports[i]}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.token, "--auto-compaction-mode", "periodic",
                "--auto-compaction-retention", "1h", "--logger", "zap", "--log-level", "warn"]

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
        try:
            with urllib.request.urlopen(f"{self.member_url(i)}/health", timeout=2) as r:
                return json.loads(r.read())
        except Exception:
            return None

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
