"""Network namespaces for tests: created with a per-test unique prefix and
always removed, also when the test fails."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator


def sh(*args: str, ns: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def unique(prefix: str = "pn") -> str:
    """A short unique tag: interface names stay within 15 characters."""
    return f"{prefix}{os.getpid() % 1000:03d}{uuid.uuid4().hex[:4]}"


@contextlib.contextmanager
def veth_pair(tag: str, a_addr: str = "10.77.0.1/24", b_addr: str = "10.77.0.2/24") -> Iterator[dict]:
    """Two namespaces joined by a veth pair, IPv6 off (no stray ND traffic)."""
    na, nb = f"{tag}a", f"{tag}b"
    ia, ib = f"{tag}x", f"{tag}y"
    made: list[str] = []
    try:
        for ns in (na, nb):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", ns=ns)
            sh("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", ia, "netns", na, "type", "veth", "peer", "name", ib, "netns", nb)
        sh("ip", "addr", "add", a_addr, "dev", ia, ns=na)
        sh("ip", "addr", "add", b_addr, "dev", ib, ns=nb)
        sh("ip", "link", "set", ia, "up", ns=na)
        sh("ip", "link", "set", ib, "up", ns=nb)
        yield {"ns_a": na, "ns_b": nb, "if_a": ia, "if_b": ib,
               "addr_a": a_addr.split("/")[0], "addr_b": b_addr.split("/")[0]}
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def require_xdp() -> None:
    """Skip the calling test unless XDP can run here (root, BCC, kernel
    headers). Under CI, which installs all of it, a missing piece fails."""
    import pytest

    from patronus.errors import DataplaneUnavailable

    try:
        from patronus.dataplane import preflight

        preflight()
    except DataplaneUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"XDP unavailable: {e}")


class Capture:
    """tcpdump on ``ifname`` in namespace ``ns`` (``filter``: a pcap
    expression), into ``path``; ``lines()`` after the ``with`` block are
    its packets as ``tcpdump -n -v`` prints them (one line each). Starts
    only once tcpdump says it is listening; always stopped."""

    def __init__(self, ns: str, ifname: str, path: os.PathLike[str] | str, filter: str = "") -> None:
        self.ns, self.ifname, self.path, self.filter = ns, ifname, str(path), filter
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Capture:
        # headers only (-s 256): with the default snap length of 256 KiB the ring of tcpdump's
        # immediate mode holds 8 packets, and a burst loses the rest
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "tcpdump", "-i", self.ifname, "-n", "-U",
                                      "-s", "256", "-B", "8192", "--immediate-mode", "-w", self.path,
                                      *self.filter.split()],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        said = []
        for _ in range(5):   # "listening on IF, link-type ...": from here on it captures
            said.append(self.proc.stderr.readline())
            if "listening on" in said[-1] or not said[-1]:
                break
        if "listening on" not in said[-1]:
            self.__exit__()
            raise RuntimeError(f"tcpdump on {self.ifname} in {self.ns}: {''.join(said).strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_for(self, n: int, timeout: float = 20.0) -> list[str]:
        """The packets once ``n`` are in the file (tcpdump reads its ring
        after the packets passed: stopping it at once loses the last ones),
        or what is there after ``timeout``."""
        import time

        end = time.monotonic() + timeout
        while len(got := self.lines()) < n and time.monotonic() < end:
            time.sleep(0.1)
        return got

    def lines(self) -> list[str]:
        out = subprocess.run(["tcpdump", "-r", self.path, "-n", "-v", "-tt"], capture_output=True, text=True)
        # -v prints each IP header's fields on the packet's line and the transport on the next: join them
        packets: list[str] = []
        for line in out.stdout.splitlines():
            if line.startswith((" ", "\t")) and packets:
                packets[-1] += " " + line.strip()
            else:
                packets.append(line)
        return packets
