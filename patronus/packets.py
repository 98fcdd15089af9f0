"""Build Ethernet frames for tests, demos and notebooks (no scapy needed).

>>> f = udp("10.1.0.5", "10.2.0.9", 40000, 5060, dscp=46)
>>> len(f), f[12:14].hex()
(42, '0800')
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["ethernet", "ipv4", "ipv6", "udp", "tcp", "icmp"]

SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")


def ethernet(payload: bytes, ethertype: int, vlans: tuple[int, ...] = ()) -> bytes:
    """Ethernet II header (with 802.1Q tags, outermost first) + payload."""
    hdr = DST_MAC + SRC_MAC
    for vid in vlans:
        hdr += struct.pack("!HH", 0x8100, vid & 0x0FFF)
    return hdr + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, dscp: int = 0, ttl: int = 64,
         frag_offset: int = 0, more_fragments: bool = False, options: bytes = b"") -> bytes:
    """IPv4 packet; ``options`` is padded to a multiple of 4 bytes."""
    options += b"\x00" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    flags = (0x2000 if more_fragments else 0) | (frag_offset & 0x1FFF)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, dscp << 2, ihl * 4 + len(payload), 0, flags, ttl, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + options + payload


def ipv6(src: str, dst: str, proto: int, payload: bytes, *, dscp: int = 0, hop_limit: int = 64,
         ext: bytes = b"") -> bytes:
    """IPv6 packet; ``ext`` is a chain of extension headers whose first
    next-header is given by ``proto`` when ext is empty. Build chains with ext_header()."""
    tc = dscp << 2
    hdr = struct.pack("!IHBB16s16s", (6 << 28) | (tc << 20), len(ext) + len(payload), proto, hop_limit,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return hdr + ext + payload


def ext_header(next_header: int, body: bytes = b"\x00" * 6) -> bytes:
    """A generic IPv6 extension header (hop-by-hop, routing, destination options):
    next header, length in 8-octet units beyond the first, body padded."""
    body += b"\x00" * (-(len(body) + 2) % 8)
    return struct.pack("!BB", next_header, (len(body) + 2) // 8 - 1) + body


def fragment_header(next_header: int, offset: int = 0, more: bool = False, ident: int = 1) -> bytes:
    return struct.pack("!BBHI", next_header, 0, (offset << 3) | int(more), ident)


def _l4_frame(src: str, dst: str, proto: int, seg: bytes, dscp: int, vlans: tuple[int, ...]) -> bytes:
    if ipaddress.ip_address(src).version == 6:
        return ethernet(ipv6(src, dst, proto, seg, dscp=dscp), 0x86DD, vlans)
    return ethernet(ipv4(src, dst, proto, seg, dscp=dscp), 0x0800, vlans)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *, dscp: int = 0,
        vlans: tuple[int, ...] = ()) -> bytes:
    """Ethernet + IPv4/IPv6 (by address) + UDP frame."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _l4_frame(src, dst, 17, seg, dscp, vlans)


def tcp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *, flags: int = 0x10,
        dscp: int = 0, vlans: tuple[int, ...] = ()) -> bytes:
    """Ethernet + IPv4/IPv6 + TCP frame (``flags``: 0x02 SYN, 0x10 ACK, ...)."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    return _l4_frame(src, dst, 6, seg, dscp, vlans)


def icmp(src: str, dst: str, *, dscp: int = 0, vlans: tuple[int, ...] = ()) -> bytes:
    """Echo request (ICMP for IPv4 sources, ICMPv6 for IPv6)."""
    v6 = ipaddress.ip_address(src).version == 6
    msg = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 1, 1)
    return _l4_frame(src, dst, 58 if v6 else 1, msg, dscp, vlans)
