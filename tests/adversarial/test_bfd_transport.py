"""BFD over UDP under attack or misuse: another local user's socket on our
port, a state-change callback that raises, a local address the host does
not have, two ``patronus bfd`` processes on one host.

Ports: the loopback tests use 161xx (other test files use 13784/23784,
140xx, 150xx and 160xx); the tests on the standard port 3784 run in a
network namespace of their own, so nothing else on the machine can collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from patronus.failover import BfdSession, State

from ..netns import sh, unique

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setresuid, network namespaces)")


@contextlib.contextmanager
def bare_netns():
    """A fresh network namespace with only loopback (up): the standard BFD
    port there is ours alone, and no address but 127/8 and ::1 exists."""
    ns = unique("bfa")
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "set", "lo", "up", ns=ns)
        yield ns
    finally:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _bind_as(uid: int, targets: list[tuple[str, int]]) -> list[int]:
    """In a forked child running as ``uid``: try to bind a UDP socket (with
    SO_REUSEADDR and SO_REUSEPORT, as an attacker would) to each target;
    returns the errno of each attempt (0: bound, i.e. the port was shared)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup, only syscalls, then _exit
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            out = []
            for addr in targets:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    s.bind(addr)
                    out.append(0)
                except OSError as e:
                    out.append(e.errno)
                s.close()
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child could not run as nobody"
    return json.loads(data)


@needs_root
def test_another_local_user_cannot_bind_the_sessions_ports():
    """Defect 1: the endpoint bound with SO_REUSEADDR, so a process of any
    other user could bind the same port too and take the session's packets
    (Linux hands unicast datagrams to one of the sharing sockets)."""

    async def main():
        s = BfdSession("127.0.0.1", "127.0.0.5", 20, 20, 3, port=16101, peer_port=16102)
        await s.start()
        try:
            tx_port = s._tx.getsockname()[1]
            return _bind_as(NOBODY, [("0.0.0.0", 16101), ("127.0.0.1", 16101), ("127.0.0.1", tx_port)])
        finally:
            await s.stop()

    assert asyncio.run(main()) == [errno.EADDRINUSE] * 3


def test_a_raising_callback_does_not_stop_other_sessions_detecting(caplog):
    """Defect 2: a callback that raised inside the shared timer scheduler
    stopped it: every session on the loop stopped sending and detecting."""

    async def main():
        a1 = BfdSession("127.0.0.1", "127.0.2.1", 20, 20, 3, port=16111, peer_port=16112)
        a2 = BfdSession("127.0.2.1", "127.0.0.1", 20, 20, 3, port=16112, peer_port=16111)
        b1 = BfdSession("127.0.0.1", "127.0.2.2", 20, 20, 3, port=16113, peer_port=16114)
        b2 = BfdSession("127.0.2.2", "127.0.0.1", 20, 20, 3, port=16114, peer_port=16113)
        a1_down = asyncio.Event()

        def broken_hook(t):
            if t.new == State.DOWN:
                a1_down.set()
                raise RuntimeError("failover hook bug")

        a1.on_change(broken_hook)
        for s in (a1, a2, b1, b2):
            await s.start()
        try:
            await asyncio.wait_for(asyncio.gather(a1.wait_for(State.UP), b1.wait_for(State.UP)), 5)
            a2.kill()                                   # a1 detects: its hook raises in the scheduler
            await asyncio.wait_for(a1_down.wait(), 2)
            b2.kill()                                   # b1 must still detect its own peer's death
            t = await asyncio.wait_for(b1.wait_for(State.DOWN), 2)
            return t, a1.callback_errors
        finally:
            for s in (a1, a2, b1, b2):
                await s.stop()

    with caplog.at_level(logging.ERROR, logger="patronus.failover.transport"):
        t, errors = asyncio.run(main())
    assert t.old == State.UP and t.new == State.DOWN
    assert errors == 1
    assert any("failover hook bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)


@needs_root
def test_a_local_address_this_host_lacks_is_named_as_such(capsys):
    """Defect 4a: the error said "has no free source port in 49152-65535"."""
    from patronus.cli import main

    with bare_netns() as ns:
        rc = main(["bfd", "--local", "10.0.0.1", "--peer", "10.0.0.2", "--netns", ns, "--duration", "0.1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "10.0.0.1" in err and "not an address of this host" in err and "free source port" not in err


def _reader(proc: subprocess.Popen, name: str, out: queue.Queue) -> None:
    for line in proc.stdout:
        out.put((name, line))


@needs_root
def test_two_bfd_processes_on_one_host_come_up_on_port_3784():
    """Defect 4b: both processes bound 0.0.0.0:3784 (sharing it through
    SO_REUSEADDR); the kernel gave every packet to one of them and neither
    session ever came Up. Each must bind its own local address."""
    with bare_netns() as ns:
        procs = {}
        lines: queue.Queue = queue.Queue()
        try:
            for local, peer in (("127.0.0.1", "127.0.0.2"), ("127.0.0.2", "127.0.0.1")):
                p = subprocess.Popen([sys.executable, "-m", "patronus.cli", "bfd", "--local", local, "--peer", peer,
                                      "--tx-ms", "20", "--rx-ms", "20", "--netns", ns, "--duration", "30"],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                procs[local] = p
                threading.Thread(target=_reader, args=(p, local, lines), daemon=True).start()
            up: set[str] = set()
            deadline = time.monotonic() + 15  # slow start: about 1 s per packet until Up
            while up != set(procs) and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    name, line = lines.get(timeout=0.5)
                    rec = json.loads(line)
                    assert rec["local"] == name and rec["peer"] != name
                    if rec["new"] == "UP":
                        up.add(name)
                for name, p in procs.items():
                    assert p.poll() is None, f"{name}: exited {p.returncode}: {p.stderr.read()}"
            assert up == set(procs), f"Up: {sorted(up)} of {sorted(procs)}"
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
