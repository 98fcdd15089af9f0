"""The probe packet: encode, decode, and the responder's sans-I/O core.

A probe is a UDP payload in the spirit of TWAMP-light (RFC 5357 appendix I):
the sender stamps its transmit time, the responder echoes the probe with its
own receive and transmit times, and the sender adds the arrival time. From
the four times: round-trip time without the responder's dwell time, one-way
delay *variation* in each direction (the two clocks need not agree: offsets
cancel in differences), and from the sequence numbers loss, duplicates and
reordering. All integers are network byte order::

    0       2       3       4       6       8          12         16
    +-------+-------+-------+-------+-------+----------+----------+
    | "PN"  | ver=1 | kind  | flags | length| session  |   seq    |
    +-------+-------+-------+-------+-------+----------+----------+
    16: t1 (u64, sender transmit, ns)   24: t2 (u64, responder receive, ns)
    32: t3 (u64, responder transmit, ns)   40: padding up to `length`

``kind`` is 1 (request) or 2 (reply); ``length`` is the whole payload, so a
probe cut short on the way is detected, and padding lets probes test path
MTU and packet trains. Requests carry t2 = t3 = 0.

>>> p = Probe(KIND_REQUEST, session=7, seq=1, t1=1_000)
>>> decode(encode(p)) == p
True
>>> r = Reflector()
>>> reply = decode(r.handle(encode(p), rx_ns=5_000, tx_ns=5_200))
>>> (reply.kind, reply.seq, reply.t1, reply.t2, reply.t3)
(2, 1, 1000, 5000, 5200)
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import NamedTuple

from ..errors import MalformedProbe

__all__ = ["Probe", "encode", "decode", "Reflector", "HEADER", "MAX_SIZE", "KIND_REQUEST", "KIND_REPLY",
           "MALFORMED_REASONS", "FLAG_TRAIN"]

MAGIC = b"PN"
VERSION = 1
KIND_REQUEST, KIND_REPLY = 1, 2
FLAG_TRAIN = 0x0001  # part of a back-to-back packet train (bandwidth estimate)
_FMT = struct.Struct("!2sBBHHIIQQQ")
HEADER = _FMT.size  # 40
MAX_SIZE = 65_507  # largest UDP payload over IPv4
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1

MALFORMED_REASONS = ("short", "bad_magic", "bad_version", "bad_kind", "bad_length", "bad_times", "not_request")


class Probe(NamedTuple):
    """One probe, request or reply. ``size`` is the payload length on the wire."""

    kind: int
    session: int
    seq: int
    t1: int
    t2: int = 0
    t3: int = 0
    size: int = HEADER
    flags: int = 0


def encode(p: Probe) -> bytes:
    """Bytes of a probe (zero padding up to ``p.size``); raises ValueError on
    fields out of range."""
    if p.kind not in (KIND_REQUEST, KIND_REPLY):
        raise ValueError(f"kind {p.kind!r} is neither request (1) nor reply (2)")
    if not HEADER <= p.size <= MAX_SIZE:
        raise ValueError(f"size {p.size} outside {HEADER}..{MAX_SIZE}")
    if not (0 <= p.session <= _U32 and 0 <= p.seq <= _U32 and 0 <= p.flags <= 0xFFFF):
        raise ValueError("session and seq are u32, flags u16")
    if not all(0 <= t <= _U64 for t in (p.t1, p.t2, p.t3)):
        raise ValueError("times are u64 nanoseconds")
    head = _FMT.pack(MAGIC, VERSION, p.kind, p.flags, p.size, p.session, p.seq, p.t1, p.t2, p.t3)
    return head + bytes(p.size - HEADER)


def decode(data: bytes | bytearray | memoryview) -> Probe:
    """Parse a probe; anything else raises ``MalformedProbe`` with a reason
    from ``MALFORMED_REASONS`` (never another exception)."""
    n = len(data)
    if n < HEADER:
        raise MalformedProbe("short", f"{n} bytes, a probe has at least {HEADER}")
    magic, ver, kind, flags, length, session, seq, t1, t2, t3 = _FMT.unpack_from(data)
    if magic != MAGIC:
        raise MalformedProbe("bad_magic", f"starts with {bytes(magic)!r}, not {MAGIC!r}")
    if ver != VERSION:
        raise MalformedProbe("bad_version", f"version {ver}, this is version {VERSION}")
    if kind not in (KIND_REQUEST, KIND_REPLY):
        raise MalformedProbe("bad_kind", f"kind {kind}")
    if length != n:
        raise MalformedProbe("bad_length", f"length field {length}, datagram {n} bytes")
    if kind == KIND_REQUEST and (t2 or t3):
        raise MalformedProbe("bad_times", "a request carries responder times")
    if kind == KIND_REPLY and t3 < t2:
        raise MalformedProbe("bad_times", f"responder sent (t3={t3}) before it received (t2={t2})")
    return Probe(kind, session, seq, t1, t2, t3, n, flags)


class Reflector:
    """Sans-I/O echo side: turns a request datagram into its reply, counts
    what it could not answer by reason. Never raises on input.

    >>> r = Reflector()
    >>> r.handle(b"garbage", 1, 2) is None, dict(r.malformed)
    (True, {'short': 1})
    """

    def __init__(self) -> None:
        self.answered = 0
        self.malformed: Counter[str] = Counter()

    def handle(self, data: bytes | bytearray | memoryview, rx_ns: int, tx_ns: int) -> bytes | None:
        try:
            p = decode(data)
        except MalformedProbe as e:
            self.malformed[e.reason] += 1
            return None
        if p.kind != KIND_REQUEST:
            self.malformed["not_request"] += 1
            return None
        self.answered += 1
        rx, tx = rx_ns & _U64, max(tx_ns, rx_ns) & _U64
        # the reply keeps the request's length (and so tests the way back too)
        return _FMT.pack(MAGIC, VERSION, KIND_REPLY, p.flags, p.size, p.session, p.seq, p.t1, rx, tx) + \
            bytes(memoryview(data)[HEADER:])
