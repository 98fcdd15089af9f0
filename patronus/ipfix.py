"""IPFIX export (RFC 7011) of drained flows, over UDP, to any collector
(nfcapd, pmacct, GoFlow2, Elastiflow...).

Every row of ``abi.FLOW_DTYPE`` a data plane drains becomes one data
record with the standard information elements (RFC 7012 / IANA registry):
addresses, ports, protocol, ``ipClassOfService`` (the DSCP in the upper six
bits) and ``ipDiffServCodePoint``, ``tcpControlBits``, ``octetDeltaCount``
and ``packetDeltaCount`` (what the record counted since the flow's previous
record: a long flow cut by the active timeout is exported in several),
``flowStartMilliseconds`` / ``flowEndMilliseconds`` and ``flowEndReason``;
plus three enterprise-specific elements under ``pen`` (default 32473, the
enterprise number RFC 5612 sets aside for documentation, until patronus has
its own): 1 ``patronusPolicy`` (the policy's index in the policy table,
unsigned32, 4294967295 for the default class), 2 ``patronusPath`` (the path
slot, 4294967295 for none), 3 ``patronusSite`` (the destination site's
column, 0 outside every site). docs/OBSERVABILITY.md lists them.

Templates (256 for IPv4 records, 257 for IPv6) go in the first message and
again every ``template_refresh_s`` (RFC 7011 section 8.4: over UDP the
collector learns them only from those resends). Each message header carries
the sequence number the RFC asks for: the data records sent before it in
this observation domain, modulo 2**32. Messages stay within ``mtu`` bytes.

>>> import numpy as np
>>> from patronus import abi
>>> exp = IpfixExporter(("127.0.0.1", 4739))   # nothing needs to listen: UDP
>>> flows = np.zeros(3, abi.FLOW_DTYPE)
>>> flows["family"] = 4
>>> exp.export(flows, reason="idle")
3
>>> exp.stats()["records"], exp.sequence
(3, 3)
>>> exp.close()
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from typing import Any

import numpy as np

from .errors import ConfigError

try:   # the compiled encoder and sender (csrc/ipfix.c); numpy does it without
    from . import _fast
except ImportError:   # pragma: no cover - an install without the built extension
    _fast = None  # type: ignore[assignment]

__all__ = ["IpfixExporter", "parse_collector", "PEN", "END_REASONS", "TEMPLATE_V4", "TEMPLATE_V6"]

PEN = 32473                  # RFC 5612: the enterprise number for documentation
TEMPLATE_V4, TEMPLATE_V6 = 256, 257
VERSION = 10
# flowEndReason (IANA): why a record was exported
END_REASONS = {"idle": 1, "active": 2, "end": 3, "forced": 4, "lack_of_resources": 5}
_NONE32 = 0xFFFFFFFF

# (element id, length, enterprise?) in record order; the record dtypes below follow it
_COMMON = [
    (7, 2, False),     # sourceTransportPort
    (11, 2, False),    # destinationTransportPort
    (4, 1, False),     # protocolIdentifier
    (5, 1, False),     # ipClassOfService (TOS byte: DSCP << 2)
    (195, 1, False),   # ipDiffServCodePoint
    (6, 1, False),     # tcpControlBits (reduced-size encoding)
    (1, 8, False),     # octetDeltaCount
    (2, 8, False),     # packetDeltaCount
    (152, 8, False),   # flowStartMilliseconds
    (153, 8, False),   # flowEndMilliseconds
    (136, 1, False),   # flowEndReason
    (1, 4, True),      # patronusPolicy
    (2, 4, True),      # patronusPath
    (3, 4, True),      # patronusSite
]
_FIELDS = {4: [(8, 4, False), (12, 4, False), *_COMMON],      # sourceIPv4Address, destinationIPv4Address
           6: [(27, 16, False), (28, 16, False), *_COMMON]}   # sourceIPv6Address, destinationIPv6Address
_TAIL = [("sport", ">u2"), ("dport", ">u2"), ("proto", "u1"), ("tos", "u1"), ("dscp", "u1"), ("flags", "u1"),
         ("octets", ">u8"), ("packets", ">u8"), ("start", ">u8"), ("end", ">u8"), ("reason", "u1"),
         ("policy", ">u4"), ("path", ">u4"), ("site", ">u4")]
_RECORD = {4: np.dtype([("src", "u1", (4,)), ("dst", "u1", (4,)), *_TAIL]),
           6: np.dtype([("src", "u1", (16,)), ("dst", "u1", (16,)), *_TAIL])}
_TEMPLATE_ID = {4: TEMPLATE_V4, 6: TEMPLATE_V6}


def parse_collector(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port), checked.

    >>> parse_collector("127.0.0.1:4739"), parse_collector("[::1]:2055")
    (('127.0.0.1', 4739), ('::1', 2055))
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError("IPFIX collector", text, "is not HOST:PORT (e.g. 192.0.2.10:4739 or [2001:db8::1]:4739)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


def _template_set(pen: int) -> bytes:
    body = b""
    for family in (4, 6):
        fields = _FIELDS[family]
        body += struct.pack("!HH", _TEMPLATE_ID[family], len(fields))
        for ie, length, enterprise in fields:
            body += struct.pack("!HHI", ie | 0x8000, length, pen) if enterprise else struct.pack("!HH", ie, length)
    return struct.pack("!HH", 2, 4 + len(body)) + body


class IpfixExporter:
    """Send flows (``abi.FLOW_DTYPE`` rows) to an IPFIX collector over UDP.

    ``collector``: (host, port) or ``"HOST:PORT"``. ``clock_offset_ns``:
    added to the flows' ``first_ns``/``last_ns`` to make them Unix time
    (default 0: both data planes and captures give Unix time; flows timed
    by CLOCK_MONOTONIC need ``time.time_ns() - time.monotonic_ns()``).
    ``netns``: send from that namespace.
    """

    def __init__(self, collector: tuple[str, int] | str, *, observation_domain: int = 1,
                 template_refresh_s: float = 60.0, mtu: int = 1400, clock_offset_ns: int | None = None,
                 pen: int = PEN, netns: str | None = None) -> None:
        host, port = parse_collector(collector) if isinstance(collector, str) else collector
        if not 0 <= observation_domain <= _NONE32:
            raise ConfigError("IPFIX observation_domain", observation_domain, "is not an unsigned 32-bit number")
        if not 0.1 <= template_refresh_s <= 86_400:
            raise ConfigError("IPFIX template_refresh_s", template_refresh_s, "is not 0.1 to 86,400 s")
        if not 200 <= mtu <= 65_000:
            raise ConfigError("IPFIX mtu", mtu, "is not 200 to 65,000 bytes")
        if not 1 <= pen <= _NONE32:
            raise ConfigError("IPFIX pen", pen, "is not an enterprise number")
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            if not infos:
                raise ConfigError("IPFIX collector", host, "does not resolve") from None
            family, host = infos[0][0], infos[0][4][0]
        from .netns import socket_in

        self.collector = (host, port)
        self.sock = socket_in(netns, family, socket.SOCK_DGRAM)
        self.sock.connect((host, port))   # connected: the kernel reports a collector that refuses (ICMP)
        self.last_error: str | None = None
        self.domain, self.refresh_s, self.mtu, self.pen = observation_domain, template_refresh_s, mtu, pen
        self.offset_ns = 0 if clock_offset_ns is None else clock_offset_ns
        self.sequence = 0               # data records sent so far (the next message's sequence number)
        self._templates = _template_set(pen)
        self._next_templates = 0.0      # monotonic time the templates are due again
        self.messages = self.records = self.templates_sent = self.send_errors = self.records_lost = 0

    # -- encoding ----------------------------------------------------------------

    def _records(self, flows: np.ndarray, family: int, reason: Any) -> np.ndarray:
        rec = np.zeros(len(flows), _RECORD[family])
        self._fill(rec, flows, family, reason)
        return rec

    def _fill(self, rec: np.ndarray, flows: np.ndarray, family: int, reason: Any) -> None:
        """Write the records of ``flows`` into ``rec`` (same shape; a view into a message array will do)."""
        width = 4 if family == 4 else 16
        rec["src"] = flows["src"][..., :width]
        rec["dst"] = flows["dst"][..., :width]
        for dst, src in (("sport", "sport"), ("dport", "dport"), ("proto", "proto"), ("octets", "bytes"),
                         ("packets", "packets"), ("flags", "tcp_flags")):
            rec[dst] = flows[src]
        rec["dscp"] = flows["dscp"] & 0x3F
        rec["tos"] = (flows["dscp"] & 0x3F) << 2
        rec["start"] = (flows["first_ns"].astype(np.int64) + self.offset_ns) // 1_000_000
        rec["end"] = (flows["last_ns"].astype(np.int64) + self.offset_ns) // 1_000_000
        rec["reason"] = reason
        pol = flows["policy"].astype(np.int64)
        rec["policy"] = np.where(pol < 0, _NONE32, pol)
        rec["path"] = flows["path"]
        rec["site"] = flows["site"]

    def _message(self, sets: bytes, now: float) -> bytes:
        return struct.pack("!HHIII", VERSION, 16 + len(sets), int(now), self.sequence & _NONE32, self.domain) + sets

    def _send(self, msg: bytes | memoryview, records: int) -> bool:
        try:
            self.sock.send(msg)
        except OSError as e:   # counted; the sequence still advances, so the collector sees the gap too
            self.last_error = e.strerror
            self.send_errors += 1
            self.records_lost += records
            return False
        self.messages += 1
        return True

    # -- public ----------------------------------------------------------------------

    def export(self, flows: np.ndarray, reason: str | np.ndarray = "idle") -> int:
        """Send ``flows`` as data records ending for ``reason`` (``END_REASONS``:
        idle, active, end, forced, lack_of_resources; or an array with a
        flowEndReason code per flow); returns how many were sent."""
        if isinstance(reason, str):
            if reason not in END_REASONS:
                raise ConfigError("IPFIX flowEndReason", reason, f"is not one of {', '.join(END_REASONS)}")
            codes: Any = END_REASONS[reason]
        else:
            codes = np.asarray(reason, np.uint8)
            if codes.shape != (len(flows),):
                raise ConfigError("IPFIX flowEndReason", codes.shape, f"is not one code per flow ({len(flows)})")
        now = time.time()
        pending = b""                       # the templates, when due, lead the next message
        if time.monotonic() >= self._next_templates:
            pending = self._templates
            self._next_templates = time.monotonic() + self.refresh_s
            self.templates_sent += 1
        sent = 0
        flows = np.ascontiguousarray(flows)
        for family in (4, 6):
            rows = np.flatnonzero(flows["family"] == family)
            if not len(rows):
                continue
            size = _RECORD[family].itemsize
            i = 0
            if pending:                     # the first message: the templates, then what fits
                room = (self.mtu - 16 - len(pending) - 4) // size
                if room <= 0:               # the templates alone fill a message
                    self._send(self._message(pending, now), 0)
                else:
                    first = rows[:room]
                    body = self._records(flows[first], family,
                                         codes if np.isscalar(codes) else codes[first]).tobytes()
                    data_set = struct.pack("!HH", _TEMPLATE_ID[family], 4 + len(body)) + body
                    sent += self._send_counted(self._message(pending + data_set, now), len(first))
                    i = len(first)
                pending = b""
            if i < len(rows):               # the rest from its first row on (the encoder skips the other family)
                start = int(rows[i])
                rest = flows[start:]
                why = codes if np.isscalar(codes) else codes[start:]
                if _fast is not None and hasattr(_fast, "ipfix_export"):
                    sent += self._send_compiled(rest, family, why, now)
                else:
                    part = rest[rest["family"] == family]
                    sent += self._send_records(part, family, why if np.isscalar(why) else
                                               why[rest["family"] == family], now)
        if pending:                         # templates due, no records: send them alone
            self._send(self._message(pending, now), 0)
        return sent

    def _send_counted(self, msg: bytes, n: int) -> int:
        """Send a message of ``n`` records; the sequence moves on either way."""
        ok = self._send(msg, n)
        self.sequence = (self.sequence + n) & _NONE32
        if ok:
            self.records += n
        return n if ok else 0

    def _send_compiled(self, flows: np.ndarray, family: int, why: Any, now: float) -> int:
        """Encode and send in C (csrc/ipfix.c: sendmmsg batches on the connected socket)."""
        assert _fast is not None
        # the C encoder's record sizes are the templates' (tests/test_ipfix.py decodes both paths)
        assert _fast.IPFIX_RECORD_SIZES == (_RECORD[4].itemsize, _RECORD[6].itemsize)
        per = max(1, (self.mtu - 20) // _RECORD[family].itemsize)
        records, msgs, ok, errors, err = _fast.ipfix_export(
            self.sock.fileno(), flows.view(np.uint8).reshape(-1), family,
            None if np.isscalar(why) else np.ascontiguousarray(why, np.uint8), int(why) if np.isscalar(why) else 0,
            self.offset_ns, _TEMPLATE_ID[family], int(now) & _NONE32, self.sequence, self.domain, per)
        self.sequence = (self.sequence + records) & _NONE32
        self.messages += ok
        if errors:   # each refused message: per records lost, but the last one may hold fewer
            self.send_errors += errors
            self.records_lost += min(records, errors * per)
            self.last_error = os.strerror(err)
        sent = records - min(records, errors * per)
        self.records += sent
        return sent

    def _send_records(self, flows: np.ndarray, family: int, why: Any, now: float) -> int:
        """Data-only messages for ``flows``, built in one array (header, set
        header and as many records as the MTU allows each, the records
        written in place), then sent one datagram at a time."""
        if not len(flows):
            return 0
        rdt, template = _RECORD[family], _TEMPLATE_ID[family]
        size = rdt.itemsize
        per = max(1, (self.mtu - 20) // size)
        full, tail = divmod(len(flows), per)
        sent = 0
        if full:
            msg = np.dtype([("version", ">u2"), ("length", ">u2"), ("time", ">u4"), ("seq", ">u4"),
                            ("domain", ">u4"), ("set_id", ">u2"), ("set_len", ">u2"), ("rec", rdt, (per,))])
            out = np.zeros(full, msg)
            out["version"], out["length"], out["time"], out["domain"] = VERSION, msg.itemsize, int(now), self.domain
            out["set_id"], out["set_len"] = template, 4 + per * size
            out["seq"] = (self.sequence + np.arange(full, dtype=np.uint64) * per) & _NONE32
            self._fill(out["rec"], flows[:full * per].reshape(full, per), family,
                       why if np.isscalar(why) else why[:full * per].reshape(full, per))
            view = memoryview(out).cast("B")
            step = msg.itemsize
            for k in range(full):
                sent += self._send_counted(view[k * step:(k + 1) * step], per)
        if tail:
            body = self._records(flows[full * per:], family, why if np.isscalar(why) else why[full * per:]).tobytes()
            sent += self._send_counted(self._message(struct.pack("!HH", template, 4 + len(body)) + body, now), tail)
        return sent

    def stats(self) -> dict[str, int]:
        """Messages, records and template sets sent; send errors and the records they lost."""
        return {"messages": self.messages, "records": self.records, "templates_sent": self.templates_sent,
                "send_errors": self.send_errors, "records_lost": self.records_lost}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IpfixExporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
