"""Probing paths over real sockets with asyncio: the UDP responder, the
monitor that probes many paths from one process, and ICMP echo probing.

One UDP socket per local address carries the probes of every path that
leaves from it; replies find their path by session id. One scheduler task
sends each path's probes on its own phase (spread over the interval so a
thousand paths do not send in one burst) and expires unanswered ones.

>>> import asyncio
>>> from patronus.paths import Monitor, Responder
>>> async def main():
...     async with Responder(("127.0.0.1", 0)) as resp:
...         async with Monitor(interval_ms=20, window=20) as mon:
...             mon.add("lo-test", remote=resp.address)
...             await asyncio.sleep(0.3)
...             return mon.metrics("lo-test")
>>> m = asyncio.run(main())
>>> m.received > 5 and m.loss_pct == 0.0 and m.rtt_ms < 50
True
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import ipaddress
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, MalformedProbe, ProbeUnavailable
from .._sockets import big_buffers, drain
from ..netns import socket_in
from .codec import FLAG_TRAIN, HEADER, KIND_REPLY, KIND_REQUEST, MAX_SIZE, Probe, Reflector, decode, encode
from .mtu import MtuSearch
from .stats import Metrics, PathStats

__all__ = ["Monitor", "Responder", "DEFAULT_PORT"]

DEFAULT_PORT = 7362
# <linux/in.h>, <linux/in6.h> (Python 3.11's socket module lacks some of them)
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE, IPV6_DONTFRAG = 23, 3, 62
_now = time.monotonic_ns


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise ConfigError("address", host, "is not an IP address") from None


def _path_id(path: Any) -> str:
    pid = getattr(path, "id", path)
    if not isinstance(pid, str) or not pid:
        raise ConfigError("path", path, "is neither a Path nor a path id string")
    return pid


# ---------------------------------------------------------------------------
# responder


class _Reader:
    """A non-blocking datagram socket read from the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        big_buffers(sock)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:  # overridden
        raise NotImplementedError

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class _ResponderSocket(_Reader):
    def __init__(self, sock: socket.socket, core: Reflector) -> None:
        super().__init__(sock)
        self.core = core

    def _readable(self) -> None:
        drain(self.sock, self._handle, self._error)

    def _handle(self, data: bytes, addr: Any) -> None:
        rx = _now()
        reply = self.core.handle(data, rx, _now())
        if reply is not None:
            try:
                self.sock.sendto(reply, addr)
            except OSError:
                self._error()

    def _error(self) -> None:
        self.core.malformed["send_error"] += 1


class Responder:
    """The echo side of the probe protocol: answers every valid request, counts
    malformed datagrams by reason (``malformed``), never stops on bad input.

    ``Responder(("0.0.0.0", 7362))``, then ``await start()`` (or ``async
    with``); ``netns`` puts the socket in a named network namespace.
    """

    def __init__(self, address: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT), *, netns: str | None = None) -> None:
        self._bind = (address[0], int(address[1]))
        self._family = _family(address[0])
        self._netns = netns
        self.core = Reflector()
        self._sock: _ResponderSocket | None = None
        self.address: tuple[str, int] = self._bind

    @property
    def answered(self) -> int:
        return self.core.answered

    @property
    def malformed(self) -> dict[str, int]:
        return dict(self.core.malformed)

    async def start(self) -> Responder:
        sock = socket_in(self._netns, self._family, socket.SOCK_DGRAM)
        try:
            sock.bind(self._bind)
        except OSError as e:
            sock.close()
            raise ConfigError("Responder.address", self._bind, f"cannot be bound: {e.strerror}") from None
        self.address = sock.getsockname()[:2]
        self._sock = _ResponderSocket(sock, self.core)
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> Responder:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# monitor


@dataclass
class _Path:
    id: str
    remote: tuple[str, int]
    method: str
    interval_ns: int
    session: int
    stats: PathStats
    sender: Any  # _UdpSender or _IcmpSender
    seq: int = 0
    probe_size: int = HEADER
    local: tuple[str, int] = ("", 0)
    netns: str | None = None
    waiters: dict[int, asyncio.Future] = field(default_factory=dict)  # seq -> future (MTU, trains)


class _UdpSender(_Reader):
    """One UDP socket shared by every path leaving from one local address."""

    def __init__(self, monitor: Monitor, sock: socket.socket) -> None:
        super().__init__(sock)
        self.monitor = monitor

    def _readable(self) -> None:
        drain(self.sock, self._handle, self._error)

    def _error(self) -> None:  # ICMP port unreachable and the like
        self.monitor.send_errors += 1

    def _handle(self, data: bytes, addr: Any) -> None:
        t4 = _now()
        try:
            p = decode(data)
        except MalformedProbe as e:
            self.monitor.malformed[e.reason] = self.monitor.malformed.get(e.reason, 0) + 1
            return
        if p.kind != KIND_REPLY:
            self.monitor.malformed["not_reply"] = self.monitor.malformed.get("not_reply", 0) + 1
            return
        self.monitor._on_reply(p.session, p.seq, p.t1, p.t2, p.t3, t4, p.flags)

    def send(self, path: _Path, seq: int, size: int, flags: int = 0) -> int:
        t1 = _now()
        data = encode(Probe(KIND_REQUEST, path.session, seq, t1, size=size, flags=flags))
        try:
            self.sock.sendto(data, path.remote)
        except OSError:  # unreachable, buffer full: the probe will count as lost
            self.monitor.send_errors += 1
        return t1


_ICMP_PAYLOAD = struct.Struct("!4sIIQ")  # magic, session, seq, t1
_ICMP_MAGIC = b"PNic"


class _IcmpSender(_Reader):
    """Echo requests for IPv4 or IPv6: an unprivileged ICMP datagram socket
    where net.ipv4.ping_group_range allows it, a raw socket as root."""

    def __init__(self, monitor: Monitor, family: int, netns: str | None) -> None:
        self.monitor = monitor
        self.family = family
        proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
        self.raw = False
        try:
            sock = socket_in(netns, family, socket.SOCK_DGRAM, proto)
        except PermissionError:
            try:
                sock = socket_in(netns, family, socket.SOCK_RAW, proto)
                self.raw = True
            except PermissionError:
                raise ProbeUnavailable(
                    "ICMP probes need an ICMP datagram socket (not allowed for this group) or a raw one (root)",
                    "sysctl -w net.ipv4.ping_group_range='0 2147483647', or run as root") from None
        super().__init__(sock)
        self.ident = random.getrandbits(16)
        self.echo_req, self.echo_rep = (8, 0) if family == socket.AF_INET else (128, 129)

    def send(self, path: _Path, seq: int, size: int, flags: int = 0) -> int:
        t1 = _now()
        payload = _ICMP_PAYLOAD.pack(_ICMP_MAGIC, path.session, seq, t1)
        payload += bytes(max(0, size - HEADER))
        head = struct.pack("!BBHHH", self.echo_req, 0, 0, self.ident, seq & 0xFFFF)
        msg = head + payload
        if self.raw and self.family == socket.AF_INET:  # the kernel fills ICMPv6 checksums itself
            from .._fast import inet_checksum

            msg = head[:2] + struct.pack("!H", inet_checksum(msg)) + head[4:] + payload
        try:
            self.sock.sendto(msg, (path.remote[0], 0))
        except OSError:
            self.monitor.send_errors += 1
        return t1

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.monitor.send_errors += 1
                return
            t4 = _now()
            if self.raw and self.family == socket.AF_INET and data and data[0] >> 4 == 4:
                data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets deliver the IP header
            if len(data) < 8 + _ICMP_PAYLOAD.size or data[0] != self.echo_rep:
                continue
            magic, session, seq, t1 = _ICMP_PAYLOAD.unpack_from(data, 8)
            if magic != _ICMP_MAGIC:
                continue
            # no responder clock: both "responder" times are the arrival, so
            # the forward jitter is the round-trip jitter
            self.monitor._on_reply(session, seq, t1, t4, t4, t4, 0)


class Monitor:
    """Probes paths continuously and keeps their metrics.

    ``interval_ms``: time between probes of one path; ``window``: probes in
    the sliding window; ``window_s``: also forget probes older than this;
    ``timeout_ms``: a probe unanswered this long is lost; sooner, once
    replies have come, after an RTO-like time of at least ``min_timeout_ms``
    (see ``PathStats``).

    ``add(path, local=(addr, port), remote=(addr, port), method="udp")``
    probes a path (a ``patronus.Path`` or any id string) against a
    ``Responder``; ``method="icmp"`` sends ICMP echo requests to
    ``remote[0]`` instead. ``netns`` puts the path's socket in a named
    network namespace.
    """

    def __init__(self, interval_ms: float = 100, window: int = 50, *, window_s: float | None = None,
                 timeout_ms: float = 1000, min_timeout_ms: float = 200, probe_size: int = HEADER) -> None:
        if not 1 <= interval_ms <= 3_600_000:
            raise ConfigError("Monitor.interval_ms", interval_ms, "is not in [1, 3600000]")
        if not HEADER <= probe_size <= MAX_SIZE:
            raise ConfigError("Monitor.probe_size", probe_size, f"is not in [{HEADER}, {MAX_SIZE}]")
        self.interval_ms = interval_ms
        self.window = window
        self.window_s = window_s
        self.timeout_ms = timeout_ms
        self.min_timeout_ms = min_timeout_ms
        self.probe_size = probe_size
        self._paths: dict[str, _Path] = {}
        self._by_session: dict[int, _Path] = {}
        self._udp: dict[tuple[str | None, str, int], _UdpSender] = {}
        self._icmp: dict[tuple[str | None, int], _IcmpSender] = {}
        self._heap: list[tuple[int, str]] = []
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self.malformed: dict[str, int] = {}
        self.send_errors = 0
        self.sent = 0

    # -- paths ------------------------------------------------------------------

    def add(self, path: Any, *, remote: tuple[str, int], local: tuple[str, int] | None = None,
            method: str = "udp", netns: str | None = None, interval_ms: float | None = None,
            probe_size: int | None = None) -> None:
        pid = _path_id(path)
        if pid in self._paths:
            raise ConfigError("Monitor.add", pid, "is already monitored")
        if method not in ("udp", "icmp"):
            raise ConfigError("Monitor.add method", method, "is neither 'udp' nor 'icmp'")
        fam = _family(remote[0])
        if local is None:
            local = ("::" if fam == socket.AF_INET6 else "0.0.0.0", 0)
        if _family(local[0]) != fam:
            raise ConfigError("Monitor.add local", local, f"is not of the family of {remote[0]}")
        size = self.probe_size if probe_size is None else probe_size
        if not HEADER <= size <= MAX_SIZE:
            raise ConfigError("Monitor.add probe_size", size, f"is not in [{HEADER}, {MAX_SIZE}]")
        session = random.getrandbits(32)
        while session in self._by_session:
            session = random.getrandbits(32)
        ivl = int((interval_ms or self.interval_ms) * 1e6)
        stats = PathStats(self.window, self.window_s, self.timeout_ms / 1000,
                          min_timeout_s=self.min_timeout_ms / 1000)
        entry = _Path(pid, (remote[0], int(remote[1])), method, ivl, session, stats, None, probe_size=size,
                      local=(local[0], int(local[1])), netns=netns)
        self._paths[pid] = entry
        self._by_session[session] = entry
        if self._task is not None:
            self._attach(entry)
            # a random phase inside the interval spreads many paths' probes out
            heapq.heappush(self._heap, (_now() + random.randrange(max(ivl, 1)), pid))
            self._wake.set()

    def remove(self, path: Any) -> None:
        e = self._paths.pop(_path_id(path))
        self._by_session.pop(e.session, None)

    def paths(self) -> list[str]:
        return list(self._paths)

    def metrics(self, path: Any) -> Metrics:
        pid = _path_id(path)
        if pid not in self._paths:
            raise ConfigError("Monitor.metrics", pid, "is not monitored")
        return self._paths[pid].stats.metrics(_now())

    def all_metrics(self) -> dict[str, Metrics]:
        now = _now()
        return {pid: e.stats.metrics(now) for pid, e in self._paths.items()}

    def observe_bytes(self, path: Any, total_bytes: int, now_ns: int | None = None) -> None:
        """Feed a path's cumulative byte counter (e.g. the data plane's per-path
        bytes): ``bandwidth_mbps`` is the rate between readings."""
        self._paths[_path_id(path)].stats.observe_bytes(total_bytes, _now() if now_ns is None else now_ns)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> Monitor:
        if self._task is not None:
            return self
        self._wake = asyncio.Event()
        now = _now()
        for e in self._paths.values():
            self._attach(e)
            heapq.heappush(self._heap, (now + random.randrange(max(e.interval_ns, 1)), e.id))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="patronus-monitor")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for s in (*self._udp.values(), *self._icmp.values()):
            s.close()
        self._udp.clear()
        self._icmp.clear()
        self._heap.clear()
        for e in self._paths.values():
            e.sender = None

    async def __aenter__(self) -> Monitor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _attach(self, e: _Path) -> None:
        fam = _family(e.remote[0])
        if e.method == "icmp":
            key = (e.netns, fam)
            if key not in self._icmp:
                self._icmp[key] = _IcmpSender(self, fam, e.netns)
            e.sender = self._icmp[key]
            return
        key = (e.netns, e.local[0], e.local[1])
        if key not in self._udp:
            sock = socket_in(e.netns, fam, socket.SOCK_DGRAM)
            try:
                sock.bind(e.local)
            except OSError as err:
                sock.close()
                raise ConfigError("Monitor.add local", e.local, f"cannot be bound: {err.strerror}") from None
            self._udp[key] = _UdpSender(self, sock)
        e.sender = self._udp[key]

    # -- probing ------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            now = _now()
            while self._heap and self._heap[0][0] <= now:
                due, pid = heapq.heappop(self._heap)
                e = self._paths.get(pid)
                if e is None:
                    continue
                self._send(e)
                nxt = due + e.interval_ns
                if nxt <= now:  # fell behind (a stall): skip missed slots, keep the phase
                    nxt = now + e.interval_ns - (now - due) % e.interval_ns
                heapq.heappush(self._heap, (nxt, pid))
            self._wake.clear()
            delay = (self._heap[0][0] - _now()) / 1e9 if self._heap else 1.0
            if delay > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    def _send(self, e: _Path, size: int | None = None, flags: int = 0) -> tuple[int, int] | None:
        s = e.sender
        if s is None:
            return None
        e.stats.expire(_now())
        e.seq = (e.seq + 1) & 0xFFFFFFFF
        t1 = s.send(e, e.seq, size or e.probe_size, flags)
        e.stats.on_send(e.seq, t1)
        self.sent += 1
        return e.seq, t1

    def _on_reply(self, session: int, seq: int, t1: int, t2: int, t3: int, t4: int, flags: int) -> None:
        e = self._by_session.get(session)
        if e is None:
            self.malformed["unknown_session"] = self.malformed.get("unknown_session", 0) + 1
            return
        fut = e.waiters.pop(seq, None)
        if fut is not None and not fut.done():
            fut.set_result((t1, t2, t3, t4))
        if flags & FLAG_TRAIN:
            return  # trains and MTU probes are not part of the path statistics
        e.stats.on_reply(seq, t1, t2, t3, t4)

    # -- path MTU and packet trains ---------------------------------------------

    async def probe_mtu(self, path: Any, lo: int = 576, hi: int = 9000, timeout_ms: float = 300,
                        tries: int = 2) -> int:
        """Largest IP packet that crosses the path and back with DF set,
        found by binary search between ``lo`` and ``hi`` (``MtuSearch``) with
        probes on a socket of their own (IP_PMTUDISC_PROBE: DF set, the
        kernel's cached path MTU ignored), each size tried ``tries`` times.
        Stored as the path's ``mtu`` metric; ProbeUnavailable when not even
        ``lo`` comes back."""
        e = self._paths[_path_id(path)]
        if e.method != "udp":
            raise ConfigError("probe_mtu", e.id, "needs a UDP-probed path")
        fam = _family(e.remote[0])
        overhead = 28 if fam == socket.AF_INET else 48
        sock = socket_in(e.netns, fam, socket.SOCK_DGRAM)
        try:
            if fam == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
            sock.bind((e.local[0], 0))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            search = MtuSearch(lo, hi, tries=tries, probe_range=(HEADER + overhead, MAX_SIZE + overhead))
            seq = 0
            while (ip_size := search.next_size()) is not None:
                seq += 1
                want = 0x80000000 | seq
                data = encode(Probe(KIND_REQUEST, e.session, want, _now(), size=ip_size - overhead,
                                    flags=FLAG_TRAIN))
                try:
                    sock.sendto(data, e.remote)
                except OSError as err:
                    if err.errno != errno.EMSGSIZE:
                        raise
                    search.on_too_big()  # larger than the local interface's MTU
                    continue
                try:
                    while True:
                        got = await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout_ms / 1000)
                        try:
                            p = decode(got)
                        except MalformedProbe:
                            continue
                        if p.session == e.session and p.seq == want:
                            search.on_reply()
                            break
                except asyncio.TimeoutError:
                    search.on_timeout()
            if search.result is None:
                raise ProbeUnavailable(f"no {lo}-byte probe came back on {e.id}",
                                       "check that a Responder runs at the remote end")
            e.stats.mtu = search.result
            return search.result
        finally:
            sock.close()

    async def packet_train(self, path: Any, count: int = 20, size: int = 1200, timeout_ms: float = 1000) -> float:
        """Active bandwidth estimate: ``count`` back-to-back probes of ``size``
        bytes; the spread of their arrival times at the responder (t2) gives
        the bottleneck rate in Mbit/s of UDP payload. Stored as ``train_mbps``."""
        e = self._paths[_path_id(path)]
        if e.method != "udp" or e.sender is None:
            raise ConfigError("packet_train", e.id, "needs a started, UDP-probed path")
        loop = asyncio.get_running_loop()
        futs = []
        for _ in range(count):  # back to back: no await between the sends
            fut = loop.create_future()
            e.seq = (e.seq + 1) & 0xFFFFFFFF
            e.waiters[e.seq] = fut
            e.sender.send(e, e.seq, size, FLAG_TRAIN)
            futs.append(fut)
        done, pending = await asyncio.wait(futs, timeout=timeout_ms / 1000)
        for f in pending:
            f.cancel()
        t2s = sorted(f.result()[1] for f in done)
        if len(t2s) < 2 or t2s[-1] == t2s[0]:
            return float("nan")
        mbps = (len(t2s) - 1) * size * 8 / ((t2s[-1] - t2s[0]) / 1e9) / 1e6
        e.stats.train_mbps = mbps
        return mbps
