"""Hypothesis strategies for frames: valid ones of every shape the parser
knows, truncated ones, mutated ones, and garbage."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from patronus import packets as pk

# small pools so random frames often hit random prefixes
V4 = ["10.0.0.1", "10.0.0.2", "10.1.2.3", "192.168.1.1", "0.0.0.0", "255.255.255.255", "172.16.5.4"]
V6 = ["::1", "2001:db8::1", "2001:db8:1::5", "fe80::1", "::", "ffff::ffff"]
PORTS = [0, 1, 53, 80, 443, 5060, 5061, 65535]


def _addr(version):
    pool = V4 if version == 4 else V6
    bits = 32 if version == 4 else 128
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return st.one_of(st.sampled_from(pool), st.integers(0, 2**bits - 1).map(lambda i: str(cls(i))))


ports = st.one_of(st.sampled_from(PORTS), st.integers(0, 65535))
protos = st.one_of(st.sampled_from([6, 17, 1, 58]), st.integers(0, 255))


@st.composite
def l4_payload(draw, proto):
    if proto == 6:
        return (draw(ports).to_bytes(2, "big") + draw(ports).to_bytes(2, "big") + bytes(9)
                + bytes([draw(st.integers(0, 255))]) + bytes(6) + draw(st.binary(max_size=8)))
    if proto == 17:
        return draw(ports).to_bytes(2, "big") + draw(ports).to_bytes(2, "big") + bytes(4) + draw(st.binary(max_size=8))
    return draw(st.binary(max_size=24))


@st.composite
def valid_frames(draw):
    version = draw(st.sampled_from([4, 6]))
    src, dst = draw(_addr(version)), draw(_addr(version))
    proto = draw(protos)
    dscp = draw(st.integers(0, 63))
    vlans = tuple(draw(st.lists(st.integers(0, 4095), max_size=2)))
    payload = draw(l4_payload(proto))
    if version == 4:
        frag = draw(st.sampled_from([0, 0, 0, 1, 185]))
        opts = draw(st.sampled_from([b"", b"\x01\x01\x01\x00", bytes(8)]))
        ip = pk.ipv4(src, dst, proto, payload, dscp=dscp, frag_offset=frag, more_fragments=draw(st.booleans()),
                     options=opts)
        et = 0x0800
    else:
        chain = draw(st.lists(st.sampled_from([0, 43, 60, 44]), max_size=9))
        ext = b""
        nxt = proto
        for kind in reversed(chain):
            if kind == 44:
                ext = pk.fragment_header(nxt, offset=draw(st.sampled_from([0, 0, 3]))) + ext
            else:
                ext = pk.ext_header(nxt, bytes(draw(st.sampled_from([6, 14])))) + ext
            nxt = kind
        ip = pk.ipv6(src, dst, nxt, payload, dscp=dscp, ext=ext)
        et = 0x86DD
    frame = pk.ethernet(ip, et, vlans)
    if draw(st.booleans()):
        frame += bytes(draw(st.integers(0, 20)))  # Ethernet padding
    if draw(st.integers(0, 9)) == 0:
        frame = frame[: draw(st.integers(0, len(frame)))]
    return frame


@st.composite
def mutated_frames(draw):
    f = bytearray(draw(valid_frames()))
    for _ in range(draw(st.integers(1, 4))):
        if f:
            f[draw(st.integers(0, len(f) - 1))] = draw(st.integers(0, 255))
    return bytes(f)


any_frames = st.one_of(valid_frames(), valid_frames(), mutated_frames(), st.binary(max_size=80))
