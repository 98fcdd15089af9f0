"""The compiled helpers against Python references."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from patronus import _fast


def py_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@given(st.binary(max_size=2000))
def test_checksum_matches_rfc1071(data):
    assert _fast.inet_checksum(data) == py_checksum(data)


def test_checksum_known_ipv4_header():
    # header from RFC 1071 examples style: a real IPv4 header whose checksum field is b861
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert _fast.inet_checksum(hdr) == 0xB861


@given(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 2**32 - 1))
def test_prefix_contains_v4(net, plen, addr):
    n = ipaddress.IPv4Network((net, plen), strict=False)
    a = ipaddress.IPv4Address(addr)
    assert _fast.prefix_contains(n.network_address.packed, plen, a.packed) == (a in n)


@given(st.integers(0, 2**128 - 1), st.integers(0, 128), st.integers(0, 2**128 - 1))
def test_prefix_contains_v6(net, plen, addr):
    n = ipaddress.IPv6Network((net, plen), strict=False)
    a = ipaddress.IPv6Address(addr)
    assert _fast.prefix_contains(n.network_address.packed, plen, a.packed) == (a in n)
