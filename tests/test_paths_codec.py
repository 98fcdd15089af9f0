"""The probe codec: every valid probe round-trips, every malformed datagram
raises MalformedProbe with a named reason, and the reflector never crashes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from patronus.errors import MalformedProbe
from patronus.paths.codec import (HEADER, KIND_REPLY, KIND_REQUEST, MALFORMED_REASONS, Probe, Reflector, decode,
                                  encode)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def probes(draw):
    kind = draw(st.sampled_from([KIND_REQUEST, KIND_REPLY]))
    t2 = t3 = 0
    if kind == KIND_REPLY:
        t2 = draw(u64)
        t3 = draw(st.integers(t2, 2**64 - 1))
    return Probe(kind, draw(u32), draw(u32), draw(u64), t2, t3, draw(st.integers(HEADER, 2000)),
                 draw(st.integers(0, 0xFFFF)))


@given(probes())
def test_every_valid_probe_round_trips(p):
    data = encode(p)
    assert len(data) == p.size
    assert decode(data) == p


@given(st.binary(max_size=200))
def test_garbage_raises_only_named_errors(data):
    try:
        decode(data)
    except MalformedProbe as e:
        assert e.reason in MALFORMED_REASONS


@given(probes(), st.data())
def test_mutated_probes_never_crash_the_reflector(p, data):
    raw = bytearray(encode(p))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    r = Reflector()
    out = r.handle(bytes(raw[:cut]), 10, 20)
    assert (out is None) == (r.answered == 0)
    assert r.answered + sum(r.malformed.values()) == 1
    if out is not None:
        reply = decode(out)
        assert reply.kind == KIND_REPLY and (reply.t2, reply.t3) == (10, 20) and len(out) == cut


def _raw(**kw):
    f = dict(magic=b"PN", ver=1, kind=1, flags=0, length=HEADER, session=1, seq=2, t1=3, t2=0, t3=0)
    f.update(kw)
    return struct.pack("!2sBBHHIIQQQ", *f.values())


@pytest.mark.parametrize("data,reason", [
    (b"", "short"),
    (_raw()[:39], "short"),
    (_raw(magic=b"XX"), "bad_magic"),
    (_raw(ver=2), "bad_version"),
    (_raw(kind=3), "bad_kind"),
    (_raw(length=41), "bad_length"),
    (_raw() + b"\0", "bad_length"),
    (_raw(t2=5), "bad_times"),
    (_raw(kind=2, t2=9, t3=8), "bad_times"),
])
def test_each_malformation_has_its_reason(data, reason):
    with pytest.raises(MalformedProbe) as e:
        decode(data)
    assert e.value.reason == reason
    r = Reflector()
    assert r.handle(data, 1, 2) is None and r.malformed == {reason: 1}


def test_reflector_ignores_replies_and_keeps_padding_length():
    r = Reflector()
    assert r.handle(encode(Probe(KIND_REPLY, 1, 1, 1, 2, 3)), 5, 6) is None
    assert r.malformed == {"not_request": 1}
    out = r.handle(encode(Probe(KIND_REQUEST, 1, 1, 1, size=1400)), 5, 6)
    assert len(out) == 1400


def test_encode_refuses_out_of_range_fields():
    with pytest.raises(ValueError):
        encode(Probe(KIND_REQUEST, 2**32, 0, 0))
    with pytest.raises(ValueError):
        encode(Probe(KIND_REQUEST, 0, 0, 0, size=HEADER - 1))
    with pytest.raises(ValueError):
        encode(Probe(7, 0, 0, 0))
