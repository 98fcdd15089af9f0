"""A WAN impairment relay: a UDP relay that delays, jitters, drops,
duplicates, reorders and rate-limits what it forwards, changeable while it
runs. This kernel has no netem; the relay gives tests (and users trying
patronus on one machine) the bad links an SD-WAN has to cope with.

Clients send to ``listen``; each client gets its own upstream socket towards
``target`` (like a NAT), and replies come back through the relay to the
client. Both directions are impaired unless ``direction`` says otherwise.

Definitions, per direction and per packet:

* delay: ``delay_ms`` plus a uniform random term in [-1.5 J, +1.5 J] with
  J = ``jitter_ms`` (never below zero). For iid uniform delays of width 3 J
  the mean |difference| between consecutive packets is J, so the RFC 3550
  interarrival jitter a receiver measures converges on ``jitter_ms``. Large
  jitter reorders packets, as on a real link (and as netem does);
* loss: each packet dropped with probability ``loss_pct`` / 100;
* duplication: each forwarded packet sent twice with ``duplicate_pct`` / 100;
* reordering: with ``reorder_pct`` / 100 a packet is held back and sent right
  after the next packet of its direction (or after 1 s without one);
* rate: ``rate_kbps`` serialises packets (UDP payload bits) at that rate;
  a packet that would wait more than ``queue_ms`` in the queue is dropped.

>>> import asyncio
>>> from patronus.paths import Monitor, Responder
>>> async def main():
...     async with Responder(("127.0.0.1", 0)) as resp:
...         async with Impairment(("127.0.0.1", 0), resp.address, delay_ms=10) as wan:
...             async with Monitor(interval_ms=20) as mon:
...                 mon.add("via-wan", remote=wan.address)
...                 await asyncio.sleep(0.4)
...                 return mon.metrics("via-wan").rtt_ms
>>> 19 < asyncio.run(main()) < 30    # 10 ms each way
True
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigError
from .._sockets import drain
from ..netns import socket_in

__all__ = ["Impairment", "ImpairmentConfig"]

_HOLD_MAX_S = 1.0


@dataclass(frozen=True)
class ImpairmentConfig:
    """What the relay does to packets (see module docs for definitions)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    duplicate_pct: float = 0.0
    reorder_pct: float = 0.0
    rate_kbps: float | None = None
    queue_ms: float = 200.0
    direction: str = "both"  # "both", "forward" (client -> target) or "reverse"

    def __post_init__(self) -> None:
        for f in ("delay_ms", "jitter_ms", "queue_ms"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 60_000:
                raise ConfigError(f"Impairment.{f}", v, "is not a number of ms in [0, 60000]")
        for f in ("loss_pct", "duplicate_pct", "reorder_pct"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 100:
                raise ConfigError(f"Impairment.{f}", v, "is not a percentage in [0, 100]")
        if self.rate_kbps is not None and (isinstance(self.rate_kbps, bool) or not self.rate_kbps > 0):
            raise ConfigError("Impairment.rate_kbps", self.rate_kbps, "is not a positive rate (None: unlimited)")
        if self.direction not in ("both", "forward", "reverse"):
            raise ConfigError("Impairment.direction", self.direction, "is not 'both', 'forward' or 'reverse'")


@dataclass
class _Lane:
    """One direction's state: link busy-until time and a held (reordered) packet."""

    free_at: float = 0.0
    held: tuple[Callable[[], None], asyncio.TimerHandle] | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("received", "forwarded", "lost", "queue_drops", "duplicated", "reordered"), 0))


class Impairment:
    """The relay. ``Impairment(listen, target, delay_ms=..., ...)``, then
    ``await start()`` or ``async with``; ``set(loss_pct=5)`` changes it at
    run time; ``stats()`` counts per direction. ``netns`` puts the listening
    socket in a named namespace, ``target_netns`` the upstream sockets."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, netns: str | None = None,
                 target_netns: str | None = None, seed: int | None = None, **config: Any) -> None:
        self.config = ImpairmentConfig(**config)
        self._listen = (listen[0], int(listen[1]))
        self.target = (target[0], int(target[1]))
        self._netns = netns
        self._target_netns = target_netns if target_netns is not None else netns
        self._rng = random.Random(seed)
        self._sock: socket.socket | None = None
        self._up: dict[Any, socket.socket] = {}  # client address -> upstream socket
        self._lanes = {"forward": _Lane(), "reverse": _Lane()}
        self.address = self._listen
        self._loop: asyncio.AbstractEventLoop | None = None

    def set(self, **changes: Any) -> ImpairmentConfig:
        """Change the impairment while it runs; returns the new config."""
        names = {f.name for f in fields(ImpairmentConfig)}
        bad = set(changes) - names
        if bad:
            raise ConfigError("Impairment.set", sorted(bad), f"are not settings ({', '.join(sorted(names))})")
        self.config = replace(self.config, **changes)
        return self.config

    def stats(self) -> dict[str, dict[str, int]]:
        return {d: dict(lane.counts) for d, lane in self._lanes.items()}

    async def start(self) -> Impairment:
        self._loop = asyncio.get_running_loop()
        fam = socket.AF_INET6 if ":" in self._listen[0] else socket.AF_INET
        sock = socket_in(self._netns, fam, socket.SOCK_DGRAM)
        try:
            sock.bind(self._listen)
        except OSError as e:
            sock.close()
            raise ConfigError("Impairment.listen", self._listen, f"cannot be bound: {e.strerror}") from None
        sock.setblocking(False)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        self._loop.add_reader(sock.fileno(), self._from_clients)
        return self

    def close(self) -> None:
        if self._loop is None:
            return
        for lane in self._lanes.values():
            if lane.held is not None:
                lane.held[1].cancel()
                lane.held = None
        for s in [self._sock, *self._up.values()]:
            if s is not None and s.fileno() >= 0:
                self._loop.remove_reader(s.fileno())
                s.close()
        self._up.clear()
        self._sock = None

    async def __aenter__(self) -> Impairment:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- packets ----------------------------------------------------------------

    def _from_clients(self) -> None:
        assert self._sock is not None
        drain(self._sock, self._client_datagram)

    def _client_datagram(self, data: bytes, addr: Any) -> None:
        up = self._up.get(addr)
        if up is None:
            fam = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
            up = socket_in(self._target_netns, fam, socket.SOCK_DGRAM)
            up.setblocking(False)
            up.connect(self.target)
            self._up[addr] = up
            assert self._loop is not None
            self._loop.add_reader(up.fileno(), self._from_target, up, addr)
        self._impair("forward", data, lambda d=data, u=up: self._send(u.send, d))

    def _from_target(self, up: socket.socket, client: Any) -> None:
        sock = self._sock
        if sock is not None:
            drain(up, lambda data, _addr: self._impair(
                "reverse", data, lambda d=data: self._send(lambda b: sock.sendto(b, client), d)))

    @staticmethod
    def _send(fn: Callable[[bytes], Any], data: bytes) -> None:
        try:
            fn(data)
        except OSError:
            pass

    def _impair(self, direction: str, data: bytes, send: Callable[[], None]) -> None:
        cfg, lane, rng = self.config, self._lanes[direction], self._rng
        loop = self._loop
        assert loop is not None
        lane.counts["received"] += 1
        if cfg.direction != "both" and cfg.direction != direction:
            lane.counts["forwarded"] += 1
            send()
            return
        if cfg.loss_pct and rng.random() * 100 < cfg.loss_pct:
            lane.counts["lost"] += 1
            return
        now = loop.time()
        delay = cfg.delay_ms / 1000
        if cfg.jitter_ms:
            delay = max(0.0, delay + rng.uniform(-1.5, 1.5) * cfg.jitter_ms / 1000)
        due = now + delay
        if cfg.rate_kbps:
            start = max(due, lane.free_at)
            if start - due > cfg.queue_ms / 1000:
                lane.counts["queue_drops"] += 1
                return
            lane.free_at = start + len(data) * 8 / (cfg.rate_kbps * 1000)
            due = lane.free_at
        copies = 2 if cfg.duplicate_pct and rng.random() * 100 < cfg.duplicate_pct else 1
        if copies == 2:
            lane.counts["duplicated"] += 1

        def emit() -> None:
            for _ in range(copies):
                send()
                lane.counts["forwarded"] += 1
            if lane.held is not None and lane.held[0] is not emit:  # the held packet goes right after
                held, handle = lane.held
                lane.held = None
                handle.cancel()
                held()

        if cfg.reorder_pct and lane.held is None and rng.random() * 100 < cfg.reorder_pct:
            lane.counts["reordered"] += 1

            def release() -> None:
                if lane.held is not None and lane.held[0] is emit:
                    lane.held = None
                    emit()

            lane.held = (emit, loop.call_at(due + _HOLD_MAX_S, release))
            return
        loop.call_at(due, emit)
