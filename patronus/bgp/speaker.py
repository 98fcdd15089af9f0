"""The BGP speaker the edge drives: ExaBGP, in a subprocess.

The interface the edge needs (:class:`Speaker`) is small on purpose: start,
stop, send a command line, and be told of messages, of the API connection and
of the process ending. ExaBGP gets a configuration file written for the site
(0600, in a 0700 directory) and an API process, :mod:`patronus.bgp.relay`,
that connects back to a Unix socket of the agent. Commands are ExaBGP's
text API (``neighbor 10.1.0.2 announce route 10.2.0.0/24 next-hop self
community [65010:2]``); messages are its JSON (``encoder json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import PatronusError
from . import Bgp

log = logging.getLogger("patronus.bgp")

__all__ = ["Speaker", "ExaBgp", "SpeakerUnavailable", "exabgp_config"]

GRACEFUL_RESTART_S = 120   # RFC 4724 restart time we ask the routers to keep our routes for
MAX_LINE = 1 << 20   # bytes of one JSON message from the speaker; a longer one ends the connection


class SpeakerUnavailable(PatronusError):
    """The BGP speaker cannot run here (not installed, or it failed at start)."""


class Speaker(Protocol):
    """What :class:`patronus.bgp.edge.BgpEdge` needs of a BGP implementation."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def send(self, line: str) -> bool: ...

    @property
    def alive(self) -> bool: ...


def exabgp_config(bgp: Bgp, local: Mapping[str, str], router_id: str, relay: list[str],
                  routes: Mapping[str, str] | None = None) -> str:
    """ExaBGP's configuration: one API process (``relay``, the command that
    runs :mod:`patronus.bgp.relay`) and a neighbor block per router, both
    address families, the API told of state changes and parsed updates.
    ``routes`` (prefix -> community) are announced from the first update on:
    a restarted speaker's routes are in its first update, before its
    End-of-RIB (a router helping a graceful restart drops what is not).

    >>> from patronus.bgp import Neighbor
    >>> print(exabgp_config(Bgp(65010, [Neighbor("10.1.0.2", asn=65101)]), {"10.1.0.2": "10.1.0.1"},
    ...                     "10.1.0.1", ["python3", "-m", "patronus.bgp.relay", "/run/x.sock"]).splitlines()[1])
        run python3 -m patronus.bgp.relay /run/x.sock;
    """
    out = ["process patronus {", f"    run {' '.join(relay)};", "    encoder json;", "}"]
    for n in bgp.neighbors:
        fam = ipaddress.ip_address(n.address).version
        static = [f"        route {p} next-hop self {c};"
                  for p, c in sorted((routes or {}).items()) if ipaddress.ip_network(p).version == fam]
        out += [f"neighbor {n.address} {{",
                f"    router-id {router_id};",
                f"    local-address {local[n.address]};",
                f"    local-as {bgp.asn};",
                f"    peer-as {n.asn};",
                f"    hold-time {n.hold_time};",
                "    family { ipv4 unicast; ipv6 unicast; }",
                # the router keeps our routes while a dead speaker is restarted
                f"    capability {{ graceful-restart {GRACEFUL_RESTART_S}; }}",
                "    api {",
                "        processes [ patronus ];",
                "        receive { parsed; update; }",
                "        neighbor-changes;",
                "    }",
                *(["    static {", *static, "    }"] if static else []),
                "}"]
    return "\n".join(out) + "\n"


class ExaBgp:
    """ExaBGP for one site's edge. ``on_message(msg)`` gets every JSON
    message, ``on_connect()`` each time the API (re)connects (send the full
    state then), ``on_exit(returncode)`` when the process ends."""

    def __init__(self, bgp: Bgp, workdir: Path, *, local: Mapping[str, str], router_id: str,
                 on_message: Callable[[dict[str, Any]], None], on_connect: Callable[[], None],
                 on_exit: Callable[[int | None], None],
                 routes: Callable[[], Mapping[str, str]] | None = None) -> None:
        if importlib.util.find_spec("exabgp") is None:
            raise SpeakerUnavailable("BGP needs ExaBGP: pip install 'patronus[bgp]' (or pip install exabgp)")
        self.bgp, self.workdir = bgp, Path(workdir)
        self.local, self.router_id = dict(local), router_id
        self._on_message, self._on_connect, self._on_exit = on_message, on_connect, on_exit
        self._routes = routes or dict
        self._proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._waiter: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def sock(self) -> Path:
        return self.workdir / "api.sock"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        self._stopping = False
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.workdir)   # its config names a program ExaBGP runs as us: nobody else's directory
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise SpeakerUnavailable(f"{self.workdir} is not a directory of this user (a symlink or someone "
                                     "else's): the BGP speaker's configuration is not written there")
        os.chmod(self.workdir, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.sock), limit=MAX_LINE)
        os.chmod(self.sock, 0o600)
        conf = self.workdir / "exabgp.conf"
        # -P: the working directory is not put on sys.path (nothing there is imported as root)
        relay = [sys.executable, "-P", "-m", "patronus.bgp.relay", str(self.sock)]
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(exabgp_config(self.bgp, self.local, self.router_id, relay, self._routes()))
        env = dict(os.environ)
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        # api.respawn off: a relay that dies takes ExaBGP with it, and the edge restarts both
        env.update({"exabgp_daemon_user": user, "exabgp_daemon_drop": "false", "exabgp_daemon_daemonize": "false",
                    "exabgp_log_destination": "stdout", "exabgp_api_ack": "false", "exabgp_tcp_bind": "",
                    "exabgp_api_respawn": "false"})
        logf = open(self.workdir / "exabgp.log", "ab")   # noqa: SIM115 (the child holds it)
        try:
            self._proc = await asyncio.create_subprocess_exec(sys.executable, "-P", "-m", "exabgp", str(conf),
                                                              env=env, cwd=self.workdir,
                                                              stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                                                              stderr=asyncio.subprocess.STDOUT,
                                                              start_new_session=True)
        finally:
            logf.close()
        self._waiter = asyncio.create_task(self._wait())
        log.info("BGP speaker started: ExaBGP pid %d, %d neighbors", self._proc.pid, len(self.bgp.neighbors))

    async def _wait(self) -> None:
        assert self._proc is not None
        rc = await self._proc.wait()
        self._close_server()
        if not self._stopping:
            self._on_exit(rc)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:   # one API connection: a second one is not ours
            writer.close()
            return
        self._writer = writer
        try:
            self._on_connect()
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    log.warning("BGP speaker sent a message over %d bytes: connection dropped", MAX_LINE)
                    break
                if not line:
                    break
                text = line.strip()
                if not text.startswith(b"{"):
                    continue   # "done"/"error" acknowledgements, banners
                try:
                    msg = json.loads(text)
                except ValueError:
                    log.warning("BGP speaker sent a line that is not JSON (%d bytes): ignored", len(text))
                    continue
                if isinstance(msg, dict):
                    self._on_message(msg)
        finally:
            self._writer = None
            writer.close()
            if not self._stopping and self.alive and self._proc is not None:
                # the API is gone (the relay died) but ExaBGP runs on, deaf: end it, so the edge restarts both
                log.warning("BGP speaker's API connection closed: stopping ExaBGP to restart it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, 15)

    def send(self, line: str) -> bool:
        """Send one command; False when the API is not connected (the edge
        sends its whole state again on the next connection)."""
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(line.encode() + b"\n")
        return True

    def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()

    async def stop(self) -> None:
        self._stopping = True
        if self._writer is not None:
            self._writer.close()
        p = self._proc
        if p is not None and p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 15)
            try:
                await asyncio.wait_for(p.wait(), 5)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
                await p.wait()
        if self._waiter is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._waiter
        self._close_server()
