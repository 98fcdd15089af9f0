"""BFD (RFC 5880, asynchronous mode), sans-I/O: the control packet codec
and the session state machine. Times are seconds (floats) from any
monotonic clock the caller owns, intervals on the wire microseconds; tests
drive it with a fake clock, ``patronus.failover.transport`` with the real one.

>>> a = Session(local_discr=1, tx_us=50_000, rx_us=50_000, multiplier=3, rng=random.Random(1))
>>> b = Session(local_discr=2, tx_us=50_000, rx_us=50_000, multiplier=3, rng=random.Random(2))
>>> t = 0.0
>>> for _ in range(3):                      # Down -> Init -> Up on both sides
...     for p in a.tick(t): _ = b.receive(decode(encode(p)), t)
...     for p in b.tick(t): _ = a.receive(decode(encode(p)), t)
...     t += 1.0
>>> a.state.name, b.state.name
('UP', 'UP')
>>> a.tick(t + 0.2) and a.state.name       # three 50 ms intervals without a packet
'DOWN'
>>> a.local_diag.name
'DETECT_EXPIRED'
"""

from __future__ import annotations

import hashlib
import hmac
import random
import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from ..errors import PatronusError

__all__ = ["State", "Diag", "ControlPacket", "Auth", "encode", "decode", "Session", "BfdDecodeError",
           "DISCARD_REASONS", "SLOW_US", "TRANSITIONS_KEPT"]

SLOW_US = 1_000_000  # RFC 5880 6.8.3: at least 1 s between packets while not Up
# Session.transitions keeps the newest this many state changes: packets a
# spoofer sends (Down, then AdminDown, with Your Discriminator 0) each cause
# one, so an unbounded list grew with the attacker's packet rate
TRANSITIONS_KEPT = 256
_HDR = struct.Struct("!BBBBIIIII")  # vers|diag, sta|flags, detect mult, length, discrs, intervals
_AUTH_SHA1 = struct.Struct("!BBBBI20s")
AUTH_KEYED_SHA1, AUTH_METICULOUS_SHA1 = 4, 5


class State(IntEnum):
    ADMIN_DOWN = 0
    DOWN = 1
    INIT = 2
    UP = 3


class Diag(IntEnum):
    NONE = 0
    DETECT_EXPIRED = 1
    ECHO_FAILED = 2
    NEIGHBOR_DOWN = 3
    FORWARDING_RESET = 4
    PATH_DOWN = 5
    CONCAT_PATH_DOWN = 6
    ADMIN_DOWN = 7
    REVERSE_CONCAT_PATH_DOWN = 8


# what a received datagram can be dropped for (6.8.6), counted by sessions and transports
DISCARD_REASONS = ("short", "bad_version", "bad_length", "truncated", "zero_multiplier", "multipoint",
                   "zero_my_discriminator", "zero_your_discriminator", "unknown_discriminator", "admin_down",
                   "auth_missing", "auth_unexpected", "auth_bad", "auth_sequence", "bad_ttl")


class BfdDecodeError(PatronusError, ValueError):
    """A BFD control packet that fails the checks of RFC 5880 6.8.6; ``reason``
    is one of ``DISCARD_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class AuthSection(NamedTuple):
    type: int
    key_id: int
    seq: int
    digest: bytes


class ControlPacket(NamedTuple):
    """One BFD control packet (RFC 5880 4.1). Intervals in microseconds.
    (A NamedTuple: sessions build one per packet sent and received.)"""

    state: State
    my_discr: int
    your_discr: int = 0
    diag: Diag = Diag.NONE
    detect_mult: int = 3
    desired_min_tx_us: int = SLOW_US
    required_min_rx_us: int = SLOW_US
    required_min_echo_rx_us: int = 0
    poll: bool = False
    final: bool = False
    cpi: bool = False
    demand: bool = False
    multipoint: bool = False
    auth: AuthSection | None = None
    version: int = 1
    raw: bytes = b""  # as received (for auth checks); empty for packets built here


@dataclass(frozen=True)
class Auth:
    """Keyed SHA1 authentication (RFC 5880 6.7.4): ``keys`` maps key id to
    secret (at most 20 bytes); ``send_key`` is the one used to send."""

    keys: dict[int, bytes]
    send_key: int
    meticulous: bool = False

    def __post_init__(self) -> None:
        if self.send_key not in self.keys or not all(0 <= k <= 255 and 1 <= len(v) <= 20 for k, v in self.keys.items()):
            raise ValueError("Auth: send_key must be one of keys; key ids 0-255, secrets 1-20 bytes")

    def __repr__(self) -> str:  # never show secrets
        return f"Auth(key ids {sorted(self.keys)}, send_key={self.send_key}, meticulous={self.meticulous})"


def _sha1(packet: bytes, key: bytes) -> bytes:
    return hashlib.sha1(packet[:32] + key.ljust(20, b"\0") + packet[52:]).digest()


def encode(p: ControlPacket, auth: Auth | None = None) -> bytes:
    """Wire bytes; with ``auth`` (and ``p.auth`` giving the sequence number)
    the keyed SHA1 section is appended and signed."""
    flags = (p.poll << 5) | (p.final << 4) | (p.cpi << 3) | ((auth is not None) << 2) | (p.demand << 1) | p.multipoint
    length = 24 + (28 if auth is not None else 0)
    head = _HDR.pack((p.version << 5) | int(p.diag), (int(p.state) << 6) | flags, p.detect_mult, length,
                     p.my_discr, p.your_discr, p.desired_min_tx_us, p.required_min_rx_us, p.required_min_echo_rx_us)
    if auth is None:
        return head
    seq = p.auth.seq if p.auth is not None else 0
    atype = AUTH_METICULOUS_SHA1 if auth.meticulous else AUTH_KEYED_SHA1
    key = auth.keys[auth.send_key]
    body = head + _AUTH_SHA1.pack(atype, 28, auth.send_key, 0, seq, key.ljust(20, b"\0"))
    return body[:32] + hashlib.sha1(body).digest()


_STATES = tuple(State)
_DIAGS = tuple(Diag)


def decode(data: bytes | bytearray | memoryview) -> ControlPacket:
    """Parse and run the packet-level checks of RFC 5880 6.8.6; raises
    ``BfdDecodeError`` (never anything else)."""
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) < 24:
        raise BfdDecodeError("short", f"{len(data)} bytes, a control packet has at least 24")
    b0, b1, mult, length, my, your, tx, rx, echo = _HDR.unpack_from(data)
    version, diag, state = b0 >> 5, b0 & 0x1F, b1 >> 6
    a = bool(b1 & 0x04)
    if version != 1:
        raise BfdDecodeError("bad_version", f"version {version}")
    if length < (26 if a else 24):
        raise BfdDecodeError("bad_length", f"length field {length}")
    if length > len(data):
        raise BfdDecodeError("truncated", f"length field {length}, datagram {len(data)} bytes")
    if mult == 0:
        raise BfdDecodeError("zero_multiplier")
    if b1 & 0x01:
        raise BfdDecodeError("multipoint")
    if my == 0:
        raise BfdDecodeError("zero_my_discriminator")
    auth = None
    if a:
        atype, alen = data[24], data[25]
        if atype in (AUTH_KEYED_SHA1, AUTH_METICULOUS_SHA1):
            if alen != 28 or length != 52:
                raise BfdDecodeError("auth_bad", f"SHA1 section of {alen} bytes in a packet of {length}")
            t, _, key_id, _, seq, digest = _AUTH_SHA1.unpack_from(data, 24)
            auth = AuthSection(t, key_id, seq, digest)
        else:
            if alen < 2 or 24 + alen > length:
                raise BfdDecodeError("auth_bad", f"auth section of {alen} bytes")
            auth = AuthSection(atype, data[26] if alen > 2 else 0, 0, b"")
    # reserved diagnostic codes carry no meaning for the receiver
    diag_e = _DIAGS[diag] if diag < len(_DIAGS) else Diag.NONE
    return ControlPacket(_STATES[state], my, your, diag_e, mult, tx, rx, echo, bool(b1 & 0x20), bool(b1 & 0x10),
                         bool(b1 & 0x08), bool(b1 & 0x02), False, auth, version,
                         data if length == len(data) else data[:length])


class Transition(NamedTuple):
    """One state change of a session."""

    old: State
    new: State
    diag: Diag
    at: float


class Session:
    """The RFC 5880 state variables and procedures of one session.

    ``tick(now)`` returns the control packets due (periodic transmission,
    with 75-100 % jitter) and fires the detection timer; ``receive(pkt, now)``
    applies a decoded packet (6.8.6) and returns packets to send at once
    (the Final answering a Poll, and the first packet after a state change);
    ``next_deadline()`` says when to call ``tick`` again. Every state change
    is appended to ``transitions``, which keeps the newest
    ``TRANSITIONS_KEPT`` (a deque); ``transition_count`` counts them all.
    """

    def __init__(self, local_discr: int, tx_us: int = 300_000, rx_us: int = 300_000, multiplier: int = 3,
                 *, auth: Auth | None = None, passive: bool = False, rng: random.Random | None = None) -> None:
        if not 1 <= local_discr < 2**32:
            raise ValueError("local discriminator must be a non-zero u32")
        if not 1 <= multiplier <= 255 or tx_us < 1 or rx_us < 0:
            raise ValueError("multiplier 1-255, tx_us >= 1, rx_us >= 0")
        self.local_discr = local_discr
        self.state = State.DOWN
        self.remote_state = State.DOWN
        self.remote_discr = 0
        self.local_diag = Diag.NONE
        self.detect_mult = multiplier
        self.config_tx_us = tx_us            # what the operator asked for
        self.desired_min_tx_us = SLOW_US if tx_us < SLOW_US else tx_us  # what is advertised (6.8.3)
        self.required_min_rx_us = rx_us
        self.remote_min_rx_us = 1
        self.remote_desired_min_tx_us = 0
        self.remote_detect_mult = 0
        self.remote_demand = False
        self.auth = auth
        self.passive = passive
        self.xmit_auth_seq = random.getrandbits(32) if auth else 0
        self.rcv_auth_seq = 0
        self.auth_seq_known = False
        self._rng = rng or random.Random()
        self._poll = False                   # a Poll Sequence is in progress
        self._pending: tuple[int, int] | None = None   # (tx, rx) that take effect when the Final comes
        self._old_rx_us: int | None = None   # RequiredMinRx in force for detection until the Final
        self._tx_interval_us = self.desired_min_tx_us  # actual interval until a Poll ends
        self._next_tx: float | None = 0.0
        self._last_rx: float | None = None
        self._last_auth_rx: float | None = None
        self.transitions: deque[Transition] = deque(maxlen=TRANSITIONS_KEPT)  # bounded: see TRANSITIONS_KEPT
        self.transition_count = 0
        self.discards: dict[str, int] = {}
        self.received = self.sent = 0

    # -- timers -----------------------------------------------------------------

    def detection_time(self) -> float:
        """Seconds without a packet before the session goes Down (6.8.4)."""
        rx = self._old_rx_us if self._old_rx_us is not None else self.required_min_rx_us
        return self.remote_detect_mult * max(rx, self.remote_desired_min_tx_us) / 1e6

    def tx_interval(self) -> float:
        """Seconds between periodic packets before jitter (6.8.7)."""
        return max(self._tx_interval_us, self.remote_min_rx_us) / 1e6

    def _jittered(self) -> float:
        hi = 0.9 if self.detect_mult == 1 else 1.0
        return self.tx_interval() * self._rng.uniform(0.75, hi)

    def next_deadline(self) -> float | None:
        """When ``tick`` must run next (None: nothing scheduled)."""
        a, b = self._next_tx, self._detect_at()
        if a is None:
            return b
        return a if b is None or a < b else b

    def _detect_at(self) -> float | None:
        if self.state in (State.INIT, State.UP) and self._last_rx is not None and self.remote_detect_mult:
            return self._last_rx + self.detection_time()
        return None

    def _may_transmit(self) -> bool:
        if self.remote_min_rx_us == 0:
            return False  # the remote asked for no packets
        if self.passive and self.remote_discr == 0:
            return False
        # demand mode active on the remote: cease periodic transmission (6.6)
        return not (self.remote_demand and self.state == State.UP and self.remote_state == State.UP)

    # -- state changes -------------------------------------------------------

    def _set_state(self, new: State, diag: Diag, now: float) -> None:
        old = self.state
        if new == old:
            return
        self.state = new
        self.local_diag = diag if new != State.UP else self.local_diag
        if new == State.UP:
            # speed up from the slow rate: advertise the configured interval
            # through a Poll Sequence (6.8.3)
            if self.config_tx_us != self.desired_min_tx_us:
                self._start_poll(self.config_tx_us, self.required_min_rx_us)
        else:
            self._poll = False
            self._pending = None
            self._old_rx_us = None
            self.desired_min_tx_us = max(self.config_tx_us, SLOW_US)
            self._tx_interval_us = self.desired_min_tx_us
        self.transitions.append(Transition(old, new, self.local_diag, now))
        self.transition_count += 1
        self._next_tx = now  # tell the peer at once

    def _start_poll(self, tx_us: int, rx_us: int) -> None:
        increase_tx = tx_us > self.desired_min_tx_us
        if rx_us < self.required_min_rx_us and self._old_rx_us is None:
            self._old_rx_us = self.required_min_rx_us  # keep detecting with the old value until the Final
        self.desired_min_tx_us, self.required_min_rx_us = tx_us, rx_us
        if not increase_tx:
            self._tx_interval_us = tx_us       # a faster rate may start at once
        self._pending = (tx_us, rx_us)
        self._poll = True

    def set_timers(self, tx_us: int, rx_us: int, now: float) -> None:
        """Change the intervals. While Up this runs a Poll Sequence: a longer
        transmit interval and a shorter receive interval apply only after the
        peer's Final (6.8.3)."""
        if tx_us < 1 or rx_us < 0:
            raise ValueError("tx_us >= 1, rx_us >= 0")
        self.config_tx_us = tx_us
        if self.state == State.UP:
            self._start_poll(tx_us, rx_us)
            self._next_tx = now  # the Poll goes out at once
        else:
            self.required_min_rx_us = rx_us
            self.desired_min_tx_us = max(tx_us, SLOW_US)
            self._tx_interval_us = self.desired_min_tx_us

    def admin_down(self, now: float) -> None:
        self._set_state(State.ADMIN_DOWN, Diag.ADMIN_DOWN, now)

    def admin_up(self, now: float) -> None:
        if self.state == State.ADMIN_DOWN:
            self._set_state(State.DOWN, Diag.NONE, now)

    # -- packets -----------------------------------------------------------------

    def _packet(self, final: bool = False) -> ControlPacket:
        auth = None
        if self.auth is not None:
            if self.auth.meticulous or self.sent % 4 == 0:
                self.xmit_auth_seq = (self.xmit_auth_seq + 1) & 0xFFFFFFFF
            auth = AuthSection(AUTH_METICULOUS_SHA1 if self.auth.meticulous else AUTH_KEYED_SHA1,
                               self.auth.send_key, self.xmit_auth_seq, b"")
        self.sent += 1
        return ControlPacket(self.state, self.local_discr, self.remote_discr, self.local_diag, self.detect_mult,
                             self.desired_min_tx_us, self.required_min_rx_us, 0,
                             poll=self._poll and not final, final=final, auth=auth)

    def encode(self, p: ControlPacket) -> bytes:
        return encode(p, self.auth)

    def tick(self, now: float) -> list[ControlPacket]:
        """Fire due timers; returns the packets to send now."""
        out: list[ControlPacket] = []
        at = self._detect_at()
        if at is not None and now >= at:
            self._set_state(State.DOWN, Diag.DETECT_EXPIRED, now)
            self.remote_discr = 0
            self.remote_min_rx_us = 1
            self.remote_state = State.DOWN
        if (self.auth is not None and self._last_auth_rx is not None and self.auth_seq_known
                and now - self._last_auth_rx > 2 * max(self.detection_time(), 1.0)):
            self.auth_seq_known = False
        if self._next_tx is not None and now >= self._next_tx:
            if self._may_transmit():
                out.append(self._packet())
            self._next_tx = now + self._jittered()
        return out

    def _discard(self, reason: str) -> list[ControlPacket]:
        self.discards[reason] = self.discards.get(reason, 0) + 1
        return []

    def _check_auth(self, p: ControlPacket, now: float) -> str | None:
        if self.auth is None:
            return "auth_unexpected" if p.auth is not None else None
        if p.auth is None:
            return "auth_missing"
        want = AUTH_METICULOUS_SHA1 if self.auth.meticulous else AUTH_KEYED_SHA1
        key = self.auth.keys.get(p.auth.key_id)
        if p.auth.type != want or key is None or not p.raw:
            return "auth_bad"
        if not hmac.compare_digest(_sha1(p.raw, key), p.auth.digest):
            return "auth_bad"
        if self.auth_seq_known:
            span = 3 * self.detect_mult
            delta = (p.auth.seq - self.rcv_auth_seq) & 0xFFFFFFFF
            ok = 1 <= delta <= span if self.auth.meticulous else delta <= span
            if not ok:
                return "auth_sequence"
        self.rcv_auth_seq = p.auth.seq
        self.auth_seq_known = True
        self._last_auth_rx = now
        return None

    def receive(self, p: ControlPacket, now: float) -> list[ControlPacket]:
        """Apply a decoded packet (RFC 5880 6.8.6, after the packet-level
        checks ``decode`` made). Returns packets to send at once."""
        if p.your_discr == 0 and p.state not in (State.DOWN, State.ADMIN_DOWN):
            return self._discard("zero_your_discriminator")
        if p.your_discr != 0 and p.your_discr != self.local_discr:
            return self._discard("unknown_discriminator")
        why = self._check_auth(p, now)
        if why:
            return self._discard(why)
        self.received += 1
        self.remote_discr = p.my_discr
        self.remote_state = p.state
        self.remote_demand = p.demand
        self.remote_min_rx_us = p.required_min_rx_us
        self.remote_desired_min_tx_us = p.desired_min_tx_us
        self.remote_detect_mult = p.detect_mult
        if p.final and self._poll:  # the Poll Sequence ends: pending changes apply
            self._poll = False
            if self._pending is not None:
                self._tx_interval_us = self._pending[0]
            self._pending = None
            self._old_rx_us = None
        self._last_rx = now
        if self.state == State.ADMIN_DOWN:
            return self._discard("admin_down")
        before = self.state
        if p.state == State.ADMIN_DOWN:
            if self.state != State.DOWN:
                self._set_state(State.DOWN, Diag.NEIGHBOR_DOWN, now)
        elif self.state == State.DOWN:
            if p.state == State.DOWN:
                self._set_state(State.INIT, Diag.NONE, now)
            elif p.state == State.INIT:
                self._set_state(State.UP, Diag.NONE, now)
        elif self.state == State.INIT:
            if p.state in (State.INIT, State.UP):
                self._set_state(State.UP, Diag.NONE, now)
        elif p.state == State.DOWN:  # Up
            self._set_state(State.DOWN, Diag.NEIGHBOR_DOWN, now)
        out = []
        if p.poll:
            out.append(self._packet(final=True))  # never P and F together; not subject to the tx timer
        elif self.state != before and self._may_transmit():
            out.append(self._packet())
            self._next_tx = now + self._jittered()
        self._reschedule(now)
        return out

    def _reschedule(self, now: float) -> None:
        """The interval just got shorter (peer's RequiredMinRx, our Poll):
        do not wait out a packet scheduled at the old, slower rate."""
        if self._next_tx is not None and self._next_tx - now > self.tx_interval():
            self._next_tx = now + self._jittered()
