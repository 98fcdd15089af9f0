"""A capture of real programs' traffic, for the pcap-to-flows peer benchmark
(``test_bench_peers_pcap.py``).

Two network namespaces joined by a veth pair (names with a unique prefix,
always removed afterwards), IPv4 and IPv6 on the link. In the server
namespace: ``python -m http.server`` (HTTP/1.0: one TCP connection per
request) and ``iperf3 -s``. From the client namespace, at the same time:

- ``curl`` fetching a 16 KiB file ``CURL_V4`` times over IPv4 and
  ``CURL_V6`` times over IPv6 (one URL glob per curl process, so every
  request is a new connection from a new source port),
- ``ping`` and ``ping -6`` (ICMP echo, 20 ms apart),
- ``iperf3`` TCP at ``TCP_MBPS`` Mbit/s for ``TCP_SECONDS``, then UDP:
  ``UDP_STREAMS`` parallel streams of 256-byte datagrams at ``UDP_MBPS``
  Mbit/s each, for ``UDP_SECONDS``,

and whatever the kernel adds (ARP, IPv6 neighbour discovery, MLD), all
captured on the client's veth with ``tcpdump -s 0 -B 8192 -w`` (whole
frames: GSO is off on the veth (``gso_max_segs 1``), so a frame is at most
1,514 bytes, as on a wire; the benchmark derives a ``-s 256`` copy with
``editcap``). The sizes come from $PN_PEERS_* (see the constants). The
programs are real; the packet count varies a little between runs (TCP
segmentation, retransmissions, tcpdump drops), which is why the benchmark
measures every tool on the same file and counts flows from it.

Root only. Standalone: ``python benchmarks/peers_capture.py out.pcap``
writes a capture and prints what it holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CURL_V4 = int(os.environ.get("PN_PEERS_CURL_V4", "1200"))
CURL_V6 = int(os.environ.get("PN_PEERS_CURL_V6", "300"))
TCP_SECONDS = int(os.environ.get("PN_PEERS_TCP_SECONDS", "2"))
TCP_MBPS = int(os.environ.get("PN_PEERS_TCP_MBPS", "300"))
UDP_STREAMS = int(os.environ.get("PN_PEERS_UDP_STREAMS", "4"))
UDP_MBPS = int(os.environ.get("PN_PEERS_UDP_MBPS", "30"))
UDP_SECONDS = int(os.environ.get("PN_PEERS_UDP_SECONDS", "3"))
SNAPLEN = 0  # whole frames (tcpdump's 262,144); the benchmark derives a 256-byte snap with editcap

A4, B4 = "10.231.0.1", "10.231.0.2"
A6, B6 = "fd00:231::1", "fd00:231::2"
HTTP_PORT, IPERF_TCP, IPERF_UDP = 8080, 5201, 5202  # one iperf3 server a test: it serves one at a time


def _sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _popen(ns: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)


def _wait_port(ns: str, port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if f":{port} " in _sh("ss", "-Hltn", ns=ns).stdout:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} in {ns} after {timeout} s")


@contextlib.contextmanager
def _namespaces(tag: str):
    na, nb = f"{tag}a", f"{tag}b"
    ia, ib = f"{tag}x", f"{tag}y"
    made: list[str] = []
    try:
        for ns in (na, nb):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            _sh("ip", "link", "set", "lo", "up", ns=ns)
        _sh("ip", "link", "add", ia, "netns", na, "type", "veth", "peer", "name", ib, "netns", nb)
        for ns, ifname, v4, v6 in ((na, ia, A4, A6), (nb, ib, B4, B6)):
            _sh("ip", "addr", "add", f"{v4}/24", "dev", ifname, ns=ns)
            _sh("ip", "-6", "addr", "add", f"{v6}/64", "dev", ifname, "nodad", ns=ns)
            # no GSO super-packets (TSO would hand 64 KB segments to the veth): frames as on a wire
            _sh("ip", "link", "set", "dev", ifname, "gso_max_segs", "1", "gso_max_size", "1514", ns=ns)
            _sh("ip", "link", "set", ifname, "up", ns=ns)
        yield na, nb, ia
    finally:
        for ns in made:  # every process still in the namespace, then the namespace (and the veth)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def capture_real_traffic(path: Path | str, tag: str | None = None) -> dict:
    """Write the capture to ``path``; returns what tcpdump reported
    (``packets``, ``dropped``) and how long the traffic ran (``seconds``)."""
    if os.geteuid() != 0:
        raise PermissionError("the real-programs capture needs root (network namespaces, tcpdump)")
    tag = tag or f"pq{os.getpid() % 1000:03d}{uuid.uuid4().hex[:4]}"
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pn-peers-www-") as www, _namespaces(tag) as (na, nb, ia):
        Path(www, "f").write_bytes(os.urandom(16 * 1024))
        dn = subprocess.DEVNULL
        _popen(nb, sys.executable, "-m", "http.server", "--bind", "::", "--directory", www, str(HTTP_PORT),
               stdout=dn, stderr=dn)
        for port in (IPERF_TCP, IPERF_UDP):
            _popen(nb, "iperf3", "-s", "-p", str(port), stdout=dn, stderr=dn)
        for port in (HTTP_PORT, IPERF_TCP, IPERF_UDP):
            _wait_port(nb, port)
        dump = _popen(na, "tcpdump", "-i", ia, "-n", "-s", str(SNAPLEN), "-B", "8192", "-w", str(path),
                      stdout=dn, stderr=subprocess.PIPE, text=True)
        line = dump.stderr.readline()  # "listening on ...": capturing from here on
        if "listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line}{dump.stderr.read()}")
        t0 = time.monotonic()
        clients = [
            _popen(na, "curl", "-s", "-o", "/dev/null", f"http://{B4}:{HTTP_PORT}/f?[1-{CURL_V4}]"),
            _popen(na, "curl", "-s", "-o", "/dev/null", "-g", f"http://[{B6}]:{HTTP_PORT}/f?[1-{CURL_V6}]"),
            _popen(na, "ping", "-q", "-c", "100", "-i", "0.02", B4, stdout=dn),
            _popen(na, "ping", "-6", "-q", "-c", "100", "-i", "0.02", B6, stdout=dn),
        ]
        iperf = (f"iperf3 -c {B4} -p {IPERF_TCP} -b {TCP_MBPS}M -t {TCP_SECONDS} && "
                 f"iperf3 -c {B4} -p {IPERF_UDP} -u -P {UDP_STREAMS} -b {UDP_MBPS}M -l 256 -t {UDP_SECONDS}")
        clients.append(_popen(na, "sh", "-c", iperf, stdout=dn, stderr=subprocess.PIPE, text=True))
        for c in clients:
            if c.wait(timeout=120) != 0:
                err = c.stderr.read() if c.stderr else ""
                raise RuntimeError(f"{' '.join(c.args)} exited {c.returncode}: {err}")
        seconds = time.monotonic() - t0
        time.sleep(0.2)  # the last FINs and ACKs
        dump.send_signal(signal.SIGINT)
        err = dump.stderr.read()
        dump.wait(timeout=30)

    def count(what: str) -> int:
        m = re.search(rf"(\d+) packets? {what}", err)
        return int(m.group(1)) if m else -1

    return {"packets": count("captured"), "dropped": count("dropped by kernel"), "seconds": round(seconds, 2),
            "bytes": path.stat().st_size}


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "real.pcap")
    print(capture_real_traffic(out), out)
