"""Fuzzing the wire codecs: random bytes and mutated valid packets either
parse or raise the codec's named error (with a documented reason), never
anything else. Bounded: each test runs a fixed number of examples, no
deadline (a slow CI machine must not turn into a flaky failure)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus.errors import MalformedProbe
from patronus.failover.bfd import DISCARD_REASONS, Auth, BfdDecodeError, ControlPacket, Diag, State
from patronus.failover.bfd import decode as bfd_decode
from patronus.failover.bfd import encode as bfd_encode
from patronus.failover.bfd import AuthSection
from patronus.paths import codec
from patronus.paths.codec import KIND_REPLY, KIND_REQUEST, MALFORMED_REASONS, Probe, Reflector

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
u32 = st.integers(0, 2**32 - 1)


@st.composite
def mutated(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid packet with bytes flipped, overwritten, cut off or appended."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from([0, 1, 2, 0x1F, 0x20, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[i:]
        elif op == "extend":
            data += draw(st.binary(max_size=40))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


# -- BFD control packets (RFC 5880 4.1) ------------------------------------------------


@st.composite
def bfd_packets(draw) -> bytes:
    p = ControlPacket(State(draw(st.integers(0, 3))), draw(st.integers(1, 2**32 - 1)), draw(u32),
                      Diag(draw(st.integers(0, 8))), draw(st.integers(1, 255)), draw(u32), draw(u32), draw(u32),
                      poll=draw(st.booleans()), final=draw(st.booleans()), cpi=draw(st.booleans()),
                      demand=draw(st.booleans()))
    if draw(st.booleans()):
        auth = Auth({3: b"s3cret"}, 3, meticulous=draw(st.booleans()))
        return bfd_encode(p._replace(auth=AuthSection(4, 3, draw(u32), b"")), auth)
    return bfd_encode(p)


@st.composite
def bfd_deep(draw) -> bytes:
    """Past the first checks (version 1, a multiplier, My Discriminator), then
    anything: random flags (A bit included), length field, auth type and
    length, and a tail cut anywhere. Random bytes rarely get this far."""
    length = draw(st.sampled_from([24, 25, 26, 27, 28, 51, 52, 53, draw(st.integers(0, 255))]))
    flags = draw(st.sampled_from([0x04, 0x24, 0x14, 0x00, draw(st.integers(0, 255)) & ~1]))  # mostly A set
    head = bytes([0x20 | draw(st.integers(0, 31)), flags, draw(st.integers(1, 255)), length])
    head += draw(st.integers(1, 2**32 - 1)).to_bytes(4, "big") + draw(st.binary(min_size=16, max_size=16))
    auth = bytes([draw(st.sampled_from([1, 2, 3, 4, 5, draw(st.integers(0, 255))])),
                  draw(st.sampled_from([0, 1, 2, 3, 24, 28, draw(st.integers(0, 255))]))])
    cut = draw(st.sampled_from([length, length, length + 1, length - 1, draw(st.integers(24, 80))]))
    return (head + auth + draw(st.binary(max_size=40)))[:cut]


def _bfd_parses_or_names_its_error(data: bytes) -> None:
    try:
        p = bfd_decode(data)
    except BfdDecodeError as e:
        assert e.reason in DISCARD_REASONS
        return
    assert p.version == 1 and p.detect_mult > 0 and p.my_discr != 0 and not p.multipoint
    assert isinstance(p.state, State) and isinstance(p.diag, Diag)
    assert bfd_decode(bytearray(data)) == p and bfd_decode(memoryview(data)) == p


@FUZZ
@given(st.binary(max_size=120))
def test_bfd_random_bytes_parse_or_raise_bfd_decode_error(data):
    _bfd_parses_or_names_its_error(data)


@FUZZ
@given(mutated(bfd_packets()))
def test_bfd_mutated_packets_parse_or_raise_bfd_decode_error(data):
    _bfd_parses_or_names_its_error(data)


@FUZZ
@given(bfd_deep())
def test_bfd_headers_with_random_flags_lengths_and_auth(data):
    _bfd_parses_or_names_its_error(data)


@FUZZ
@given(bfd_packets())
def test_bfd_valid_packets_parse(data):
    assert bfd_decode(data).raw == data


# -- path probes (patronus.paths.codec) ---------------------------------------------------


@st.composite
def probes(draw) -> bytes:
    kind = draw(st.sampled_from([KIND_REQUEST, KIND_REPLY]))
    t2 = draw(st.integers(0, 2**64 - 1)) if kind == KIND_REPLY else 0
    t3 = draw(st.integers(t2, 2**64 - 1)) if kind == KIND_REPLY else 0
    return codec.encode(Probe(kind, draw(u32), draw(u32), draw(st.integers(0, 2**64 - 1)), t2, t3,
                              draw(st.integers(codec.HEADER, codec.HEADER + 64)), draw(st.integers(0, 0xFFFF))))


def _probe_parses_or_names_its_error(data: bytes) -> None:
    try:
        p = codec.decode(data)
    except MalformedProbe as e:
        assert e.reason in MALFORMED_REASONS
    else:
        assert p.size == len(data) and p.kind in (KIND_REQUEST, KIND_REPLY)
        assert codec.decode(bytearray(data)) == p and codec.decode(memoryview(data)) == p
        assert codec.encode(p)[:codec.HEADER] == data[:codec.HEADER]
    r = Reflector()  # the responder built on it never raises either
    reply = r.handle(data, 5, 7)
    assert reply is None or codec.decode(reply).kind == KIND_REPLY
    assert r.answered + sum(r.malformed.values()) == 1


@FUZZ
@given(st.binary(max_size=120))
def test_probe_random_bytes_parse_or_raise_malformed_probe(data):
    _probe_parses_or_names_its_error(data)


@FUZZ
@given(mutated(probes()))
def test_probe_mutated_packets_parse_or_raise_malformed_probe(data):
    _probe_parses_or_names_its_error(data)


@FUZZ
@given(st.sampled_from([KIND_REQUEST, KIND_REPLY, 0, 3, 255]), st.binary(min_size=36, max_size=80),
       st.sampled_from([0, 0, 0, 1, 2, 4]))
def test_probe_random_header_behind_a_valid_magic(kind, tail, lie):
    # most random bytes die at the magic check: start past it, with a length
    # field that is right (or a few bytes off) so the later checks are reached
    n = 4 + 2 + len(tail) + 2
    data = b"PN\x01" + bytes([kind]) + tail[:2] + (n + lie - 2).to_bytes(2, "big") + tail[2:] + b"\0\0"
    _probe_parses_or_names_its_error(data)
