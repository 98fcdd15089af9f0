"""BFD over UDP with asyncio: RFC 5881 single hop (port 3784, TTL 255 both
ways) and RFC 5883 multihop (port 4784). Sessions that share a local address
share one receiving socket (an endpoint, bound to that address and not
shareable with any other socket), which finds each packet's session by Your
Discriminator, or by the peer address while that is still zero.
Every session has its own sending socket (a source port in 49152-65535,
kept for the life of the session) and its own timer on the event loop.

>>> import asyncio
>>> async def pair():
...     a = BfdSession(local="127.0.0.1", peer="127.0.0.2", tx_ms=20, rx_ms=20, port=13784, peer_port=23784)
...     b = BfdSession(local="127.0.0.2", peer="127.0.0.1", tx_ms=20, rx_ms=20, port=23784, peer_port=13784)
...     await a.start(); await b.start()
...     await asyncio.wait_for(a.wait_for(State.UP), 5)
...     state = a.state.name
...     await a.stop(); await b.stop()
...     return state
>>> asyncio.run(pair())
'UP'
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import ipaddress
import json
import logging
import math
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import ConfigError
from .._sockets import big_buffers
from .._fanout import Fanout
from ..netns import socket_in
from .bfd import Auth, BfdDecodeError, ControlPacket, Diag, Session, State, Transition, decode

try:   # the compiled session core (patronus/_bfd.pyx); the Python Session is the specification
    from .._bfd import FastSession
except ImportError:   # pragma: no cover - an install without the built extension
    FastSession = None

__all__ = ["BfdSession", "BfdEndpoint", "SINGLE_HOP_PORT", "MULTIHOP_PORT"]

SINGLE_HOP_PORT, MULTIHOP_PORT = 3784, 4784
IP_RECVTTL, IP_TTL, IP_PKTINFO = 12, 2, 8                      # <linux/in.h>
IPV6_RECVHOPLIMIT, IPV6_HOPLIMIT, IPV6_RECVPKTINFO, IPV6_PKTINFO = 51, 52, 49, 50  # <linux/in6.h>
_SRC_PORTS = (49152, 65535)
log = logging.getLogger(__name__)


def _family(addr: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET
    except ValueError:
        raise ConfigError("BfdSession address", addr, "is not an IP address") from None


def _bind_error(local: str, port: int | None, e: OSError) -> ConfigError:
    """The named error for a failed bind: an address the host lacks says so
    and how to fix it, rather than passing for "no free source port"."""
    if e.errno == errno.EADDRNOTAVAIL:
        return ConfigError("BfdSession local", local, "is not an address of this host (fix: assign it to an "
                           f"interface, e.g. 'ip addr add {local} dev lo', or run in the network namespace "
                           "that has it: netns= / --netns)")
    if e.errno == errno.EADDRINUSE:
        return ConfigError("BfdSession local", (local, port), "is in use by another socket (another BFD daemon "
                           "on this address, e.g. FRR bfdd or a second patronus bfd; fix: stop it, or use "
                           "another local address or port)")
    return ConfigError("BfdSession local", (local, port), f"cannot be bound: {e.strerror}")


class BfdEndpoint:
    """The receiving socket of one local address, port and namespace, shared
    by every session of that address: one reader for hundreds of sessions.
    The destination address of each packet (IP_PKTINFO) and its TTL
    (IP_RECVTTL, the check of RFC 5881 section 5) come with it.

    It binds the local address, not the wildcard, and without SO_REUSEADDR:
    with the wildcard two processes on one host (say ``patronus bfd`` on
    127.0.0.1 and on 127.0.0.2) both wanted 0.0.0.0:3784 and, sharing it,
    the kernel gave all packets to one of them, so neither came Up; with
    SO_REUSEADDR any other local user could bind the same (unprivileged)
    port and take the session's packets, and the session went Down."""

    _all: dict[tuple[Any, ...], BfdEndpoint] = {}

    @classmethod
    def get(cls, local: str, port: int, netns: str | None, min_ttl: int) -> BfdEndpoint:
        loop = asyncio.get_running_loop()
        key = (id(loop), netns, _family(local), local, port, min_ttl)
        ep = cls._all.get(key)
        if ep is None:
            ep = cls._all[key] = BfdEndpoint(local, port, netns, min_ttl, key)
        return ep

    def __init__(self, local: str, port: int, netns: str | None, min_ttl: int, key: tuple[Any, ...]) -> None:
        self.family = _family(local)
        self.key = key
        self.min_ttl = min_ttl
        self.sessions: dict[int, BfdSession] = {}        # local discriminator -> session
        self.by_peer: dict[tuple[str, str], BfdSession] = {}  # (local, peer) -> session
        self.discards: dict[str, int] = {}
        sock = socket_in(netns, self.family, socket.SOCK_DGRAM)
        try:
            # no SO_REUSEADDR/SO_REUSEPORT: no port of ours may be shared (see the class docstring)
            big_buffers(sock)  # hundreds of sessions' packets may queue while the loop is busy
            if self.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                sock.bind((local, port))
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                sock.bind((local, port))
        except OSError as e:
            sock.close()
            raise _bind_error(local, port, e) from None
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _count(self, reason: str) -> None:
        self.discards[reason] = self.discards.get(reason, 0) + 1

    def _readable(self) -> None:
        for _ in range(1024):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(512, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            now = self.loop.time()
            ttl, dst = None, None
            for level, kind, val in anc:
                if (level, kind) in ((socket.IPPROTO_IP, IP_TTL), (socket.IPPROTO_IPV6, IPV6_HOPLIMIT)):
                    ttl = struct.unpack("i", val[:4])[0] if len(val) >= 4 else val[0]
                elif level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(val) >= 12:
                    dst = val[8:12]        # ipi_addr: the header's destination, packed
                elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(val) >= 16:
                    dst = val[:16]
            if ttl is not None and ttl < self.min_ttl:
                self._count("bad_ttl")
                continue
            if len(data) < 24:
                self._count("short")
                continue
            # Your Discriminator (bytes 8-11) finds the session; its core checks the rest
            your = int.from_bytes(data[8:12], "big")
            s = self.sessions.get(your) if your else self.by_peer.get((dst, addr[0]))
            if s is None or (dst is not None and s._local_packed != dst) or (s.peer != addr[0] and not s.multihop):
                self._count("unknown_discriminator")
                continue
            if s._fast:
                s._on_datagram(data, now)
                continue
            try:
                p = decode(data)
            except BfdDecodeError as e:
                self._count(e.reason)
                continue
            s._on_packet(p, now)

    def add(self, s: BfdSession) -> None:
        self.sessions[s.core.local_discr] = s
        self.by_peer[(s._local_packed, s.peer)] = s

    def remove(self, s: BfdSession) -> None:
        self.sessions.pop(s.core.local_discr, None)
        if self.by_peer.get((s._local_packed, s.peer)) is s:
            del self.by_peer[(s._local_packed, s.peer)]
        if not self.sessions:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            BfdEndpoint._all.pop(self.key, None)


class _Scheduler:
    """All sessions' timers of one event loop in one heap of (when, seq,
    session) tuples, compared in C, behind a single loop timer. A session
    re-arms only when its deadline moves earlier; stale entries are skipped."""

    _all: dict[int, _Scheduler] = {}

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Scheduler:
        sch = cls._all.get(id(loop))
        if sch is None or sch.loop is not loop:
            sch = cls._all[id(loop)] = _Scheduler(loop)
        return sch

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, int, BfdSession]] = []
        self.seq = 0
        self.handle: asyncio.TimerHandle | None = None
        self.armed_at = math.inf

    def arm(self, s: BfdSession, at: float) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, s))
        if at < self.armed_at:
            if self.handle is not None:
                self.handle.cancel()
            self.armed_at = at
            self.handle = self.loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self.handle, self.armed_at = None, math.inf
        # the loop may fire a timer a hair before its time (it rounds to its
        # clock resolution); treat what is due within 0.1 ms as due now
        now = self.loop.time() + 1e-4
        heap = self.heap
        while heap and heap[0][0] <= now:
            at, _, s = heapq.heappop(heap)
            if s._due == at:
                s._due = None
                s._run(now)
        if heap and heap[0][0] < self.armed_at:
            if self.handle is not None:  # armed by a session above, for a later time
                self.handle.cancel()
            self.armed_at = heap[0][0]
            self.handle = self.loop.call_at(self.armed_at, self._fire)


class BfdSession:
    """One BFD session, asynchronous mode, over UDP.

    ``BfdSession(local="10.0.0.1", peer="10.0.0.2", tx_ms=50, rx_ms=50,
    multiplier=3)``; ``await start()``; ``state``; ``on_change(callback)``
    (called with a ``Transition``: old, new, diag, at); ``async for t in
    changes()``; ``set_timers(tx_ms, rx_ms)`` (a Poll Sequence while Up);
    ``await stop()``. A callback that raises is logged and counted in
    ``callback_errors``; it cannot stop this or any other session's timers.
    ``multihop=True`` uses port 4784 and accepts packets
    with TTL >= ``min_ttl``; single hop sends with TTL 255 and drops any
    packet that arrives with less. ``netns`` runs it in a named namespace.
    ``compiled``: the session core, the compiled ``patronus._bfd.FastSession``
    (about ten times less CPU a packet; the default where it is built and no
    ``auth`` is asked for) or the Python ``Session`` it is tested against
    (``False``; the one with authentication).
    """

    def __init__(self, local: str, peer: str, tx_ms: float = 300, rx_ms: float = 300, multiplier: int = 3, *,
                 multihop: bool = False, min_ttl: int | None = None, netns: str | None = None,
                 auth: Auth | None = None, port: int | None = None, peer_port: int | None = None,
                 discriminator: int | None = None, compiled: bool | None = None) -> None:
        if compiled is None:
            compiled = FastSession is not None and auth is None
        if compiled and FastSession is None:
            raise ConfigError("BfdSession compiled", compiled, "needs the built extension patronus._bfd (fix: "
                              "pip install -e . with Cython and a C compiler, or compiled=False)")
        if compiled and auth is not None:
            raise ConfigError("BfdSession compiled", compiled, "has no authentication: auth= needs compiled=False")
        if _family(local) != _family(peer):
            raise ConfigError("BfdSession peer", peer, f"is not of the family of {local}")
        if not 1 <= multiplier <= 255:
            raise ConfigError("BfdSession.multiplier", multiplier, "is not in 1..255")
        if not 1 <= tx_ms <= 60_000 or not 0 <= rx_ms <= 60_000:
            raise ConfigError("BfdSession timers", (tx_ms, rx_ms), "tx 1..60000 ms, rx 0..60000 ms")
        self.local, self.peer, self.multihop, self.netns = local, peer, multihop, netns
        self._local_packed = socket.inet_pton(_family(local), local)
        self.port = port if port is not None else (MULTIHOP_PORT if multihop else SINGLE_HOP_PORT)
        self.peer_port = peer_port if peer_port is not None else self.port
        self.min_ttl = min_ttl if min_ttl is not None else (1 if multihop else 255)
        discr = discriminator or random.randrange(1, 2**32)
        self._fast = bool(compiled)
        self.core: Any = (FastSession(discr, int(tx_ms * 1000), int(rx_ms * 1000), multiplier) if compiled else
                          Session(discr, int(tx_ms * 1000), int(rx_ms * 1000), multiplier, auth=auth))
        self._changes: Fanout[Transition] = Fanout()
        self._due: float | None = None  # when this session's timer is armed in the scheduler
        self._sched: _Scheduler | None = None
        self._ep: BfdEndpoint | None = None
        self._tx: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seen = 0
        self.send_errors = 0
        self.callback_errors = 0  # state-change callbacks that raised (logged, then ignored)

    # -- public ------------------------------------------------------------------

    @property
    def state(self) -> State:
        return State(self.core.state) if self._fast else self.core.state

    @property
    def poll_pending(self) -> bool:
        """A Poll Sequence (RFC 5880 6.5) is waiting for the peer's Final."""
        return bool(self.core._poll)

    def on_change(self, callback: Callable[[Transition], Any]) -> None:
        # Callbacks run inside the timer scheduler shared by every session of
        # the loop and inside the endpoint's reader: one that raised used to
        # abort the scheduler before it re-armed, and every session on the
        # loop stopped sending and detecting. Isolate it: log, count, go on.
        def guarded(t: Transition) -> None:
            try:
                callback(t)
            except Exception:
                self.callback_errors += 1
                log.exception("BFD %s -> %s: state-change callback %r raised on %s -> %s", self.local, self.peer,
                              callback, t.old.name, t.new.name)

        self._changes.subscribe(guarded)

    def changes(self) -> AsyncIterator[Transition]:
        """Every state change from now on (``async for t in s.changes()``)."""
        return self._changes.stream()

    async def wait_for(self, state: State) -> Transition | None:
        """Return once the session is in ``state`` (the transition, or None if it already was)."""
        if self.state == state:
            return None
        async for t in self.changes():
            if t.new == state:
                return t
        return None  # pragma: no cover

    async def start(self) -> BfdSession:
        self._loop = asyncio.get_running_loop()
        self._ep = BfdEndpoint.get(self.local, self.port, self.netns, self.min_ttl)
        if self.core.local_discr in self._ep.sessions or (self._local_packed, self.peer) in self._ep.by_peer:
            raise ConfigError("BfdSession", (self.local, self.peer), "already has a session")
        self._tx = self._tx_socket()
        self._sched = _Scheduler.of(self._loop)
        self._ep.add(self)
        self._run(self._loop.time())
        return self

    async def stop(self) -> None:
        """Say AdminDown to the peer (it sees the session go down at once, not
        after a detection time), then close."""
        if self._loop is None:
            return
        self.core.admin_down(self._loop.time())
        for p in self.core.tick(self._loop.time()):
            self._send(p)
        self.kill()
        self._notify()

    def kill(self) -> None:
        """Stop without a word to the peer, as a crash or a cut cable would:
        the peer finds out only when its detection time runs out."""
        if self._loop is None:
            return
        self._due = None
        if self._ep is not None:
            self._ep.remove(self)
        if self._tx is not None:
            self._tx.close()
        self._loop = None

    def set_timers(self, tx_ms: float, rx_ms: float) -> None:
        assert self._loop is not None
        self.core.set_timers(int(tx_ms * 1000), int(rx_ms * 1000), self._loop.time())
        self._run(self._loop.time())

    def snapshot(self) -> dict[str, Any]:
        c = self.core
        return {"local": self.local, "peer": self.peer, "state": State(c.state).name,
                "remote_state": State(c.remote_state).name, "diag": Diag(c.local_diag).name,
                "local_discr": c.local_discr, "remote_discr": c.remote_discr,
                "tx_ms": c.tx_interval() * 1e3, "detect_ms": c.detection_time() * 1e3,
                "sent": c.sent, "received": c.received, "discards": dict(c.discards)}

    # -- internals -------------------------------------------------------------

    def _tx_socket(self) -> socket.socket:
        fam = _family(self.local)
        sock = socket_in(self.netns, fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        for _ in range(64):  # RFC 5881 section 4: a source port in 49152-65535, the same for the session
            try:
                sock.bind((self.local, random.randint(*_SRC_PORTS)))
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:  # another port would not help (say, an address we lack)
                    sock.close()
                    raise _bind_error(self.local, None, e) from None
                continue
        else:
            sock.close()
            raise ConfigError("BfdSession local", self.local, "has no free source port in 49152-65535")
        sock.setblocking(False)
        return sock

    def _send(self, p: ControlPacket | bytes) -> None:
        if self._tx is None:
            return
        try:
            self._tx.sendto(p if self._fast else self.core.encode(p), (self.peer, self.peer_port))
        except OSError:
            self.send_errors += 1

    def _on_packet(self, p: ControlPacket, now: float) -> None:
        for out in self.core.receive(p, now):
            self._send(out)
        self._run(now)

    def _on_datagram(self, data: bytes, now: float) -> None:
        """The compiled core: checks and applies the datagram as it came."""
        for out in self.core.receive(data, now):
            self._send(out)
        self._run(now)

    def _run(self, now: float) -> None:
        """Fire the session's due timers, notify, and re-arm its timer."""
        if self._loop is None:
            return
        for out in self.core.tick(now):
            self._send(out)
        self._notify()
        at = self.core.next_deadline()
        if at is not None and (self._due is None or at < self._due):
            self._due = at
            assert self._sched is not None
            self._sched.arm(self, at)

    def _notify(self) -> None:
        # core.transitions keeps only the newest TRANSITIONS_KEPT: count by
        # transition_count, which keeps growing, and take the tail
        n = self.core.transition_count - self._seen
        if n <= 0:
            return
        self._seen = self.core.transition_count
        kept = self.core.transitions
        for t in list(kept)[max(len(kept) - n, 0):]:
            if self._fast:   # (old, new, diag, at) as integers
                t = Transition(State(t[0]), State(t[1]), Diag(t[2]), t[3])
            self._changes.publish(t)


def transition_json(s: BfdSession, t: Transition) -> str:
    """One JSON line per state change (the ``patronus bfd`` command's output)."""
    return json.dumps({"time": time.time(), "local": s.local, "peer": s.peer, "old": t.old.name,
                       "new": t.new.name, "diag": t.diag.name, "detect_ms": round(s.core.detection_time() * 1e3, 1)})
