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
