"""A real controller for tests: ``patronus controller run`` in a subprocess,
serving HTTPS on a free loopback port, stopped (SIGTERM, then SIGKILL) even
when the test fails.

    with running_controller(tmp_path / "ctl") as ctl:
        with ctl.client() as c:
            c.get("/healthz")
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from patronus.controller import server

_LISTENING = re.compile(r"listening on (https://\S+)")
_RUN = "import sys; from patronus.cli import main; sys.exit(main(sys.argv[1:]))"


class Controller:
    """A controller subprocess over a fresh state directory (``init`` first)."""

    def __init__(self, state_dir: Path, *, netns: str | None = None, listen: str = "127.0.0.1:0",
                 url: str | None = None, args: list[str] | None = None, store: str | None = None) -> None:
        """``netns``: run inside that network namespace, listening on
        ``listen``; ``url``: how this process reaches it (default: the
        address it prints). A state directory made already is reused
        (``store``: an etcd URL to make it for)."""
        self.state_dir = Path(state_dir)
        self.netns, self.listen, self.fixed_url = netns, listen, url
        self.args = list(args or ["--log-level", "warning"])   # more options of `controller run`
        made = (self.state_dir / "signing.key").exists()
        self.info = {} if made else server.init(self.state_dir, server.StoreConfig(store))
        self.admin_password: str = self.info.get("admin_password", "")
        self.cert: str = self.info.get("cert", str(self.state_dir / "tls.crt"))
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self.returncode: int | None = None
        self.log = self.state_dir.parent / f"{self.state_dir.name}.log"

    def start(self, timeout: float = 30.0) -> Controller:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-c", _RUN, "controller", "run", "--state", str(self.state_dir),
             "--listen", self.listen, *self.args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            while True:
                line = lines.get(timeout=timeout)
                if line is None:
                    raise RuntimeError(f"the controller exited before listening: {self.log.read_text()[-2000:]}")
                m = _LISTENING.search(line)
                if m:
                    self.url = self.fixed_url or m.group(1)
                    return self
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not stop. The exit status."""
        p = self.proc
        if p is None:
            return self.returncode
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.returncode = p.returncode
        self.proc = None
        if p.stdout:
            p.stdout.close()
        self._log.close()
        return self.returncode

    def stacks(self, timeout: float = 5.0) -> str:
        """Every thread's stack in the running controller (SIGUSR1 makes it
        write them to its log): what a test that timed out on it shows."""
        p = self.proc
        if p is None or p.poll() is not None:
            return "(the controller is not running)"
        start = self.log.stat().st_size
        p.send_signal(signal.SIGUSR1)   # threads
        p.send_signal(signal.SIGUSR2)   # asyncio tasks and worker-thread tokens
        end = time.monotonic() + timeout
        text = ""
        while time.monotonic() < end:
            with open(self.log, errors="replace") as f:
                f.seek(start)
                text = f.read()
            if "most recent call first" in text and "-- end of tasks" in text:
                break
            time.sleep(0.1)
        # and its sockets: what it has not read, what it has not sent, how many descriptors it holds
        fds = len(os.listdir(f"/proc/{p.pid}/fd"))
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        ss = subprocess.run([*wrap, "ss", "-tnpie"], capture_output=True, text=True, timeout=10).stdout
        port = f":{self.url.rsplit(':', 1)[-1].strip('/')}" if self.url else "-"
        mine = "\n".join(line for line in ss.splitlines() if f"pid={p.pid}," in line or port in line)
        text += f"\n{fds} open descriptors; TCP sockets of it and to it:\n{mine}\n"
        (self.log.parent / f"{self.log.stem}.stacks.txt").write_text(text)   # kept with the test's files
        return text[-20000:]

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kw.setdefault("timeout", 20.0)
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), headers=headers, **kw)

    def ssl_context(self) -> ssl.SSLContext:
        """TLS trusting the controller's certificate (its name checked unless
        it is reached at an address the certificate does not name)."""
        ctx = ssl.create_default_context(cafile=self.cert)
        if self.fixed_url:   # the certificate itself is the trust
            ctx.check_hostname = False
        return ctx

    def login(self, name: str, password: str, **extra: Any) -> dict[str, Any]:
        with self.client() as c:
            r = c.post("/api/v1/auth/login", json={"name": name, "password": password, **extra})
            r.raise_for_status()
            return r.json()


@contextlib.contextmanager
def running_controller(state_dir: Path) -> Iterator[Controller]:
    ctl = Controller(state_dir)
    ctl.start()
    try:
        yield ctl
    finally:
        ctl.stop()


class Replicas:
    """Controller replicas on one store (etcd): ``ctls`` and an admin token for each (``tokens``)."""

    def __init__(self) -> None:
        self.ctls: list[Controller] = []
        self.tokens: dict[int, str] = {}

    def alive(self) -> list[int]:
        return [i for i, c in enumerate(self.ctls) if c.proc is not None and c.proc.poll() is None]

    def client(self, i: int) -> httpx.Client:
        return self.ctls[i].client(self.tokens[i])

    def leader(self) -> int | None:
        """The replica whose /readyz says it holds the role (None: nobody, or more than one)."""
        holders = []
        for i in self.alive():
            try:
                with self.ctls[i].client() as c:
                    r = c.get("/readyz", timeout=5)
                if r.status_code == 200 and r.json().get("leader"):
                    holders.append(i)
            except httpx.HTTPError:
                pass
        return holders[0] if len(holders) == 1 else None
