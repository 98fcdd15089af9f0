"""csrc/capture.c (pcap / pcapng reader) under AddressSanitizer and UBSan.

A small harness, tests/c/capture_dump.c, is compiled together with the
reader and run on the checked-in fixtures (compared with the hand-written
tests/fixtures/expected.py), on synthesised edge cases, and on random or
mutated inputs, where it must finish cleanly: no sanitizer report, and a
final status that is END or one of the named errors.
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .sanitized import build, san_env

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_capture_fixtures_{name}", FIXTURES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mk = _load("make_captures")
EXPECTED = _load("expected").EXPECTED

STATUSES = {"END", "ERR_MAGIC", "ERR_TRUNCATED", "ERR_BLOCK"}
SAN_ENV = san_env()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build(tmp_path_factory.mktemp("capture_c") / "capture_dump", ["csrc/capture.c", "tests/c/capture_dump.c"])


def run_harness(exe: Path, *args: str, data: bytes | None = None) -> str:
    proc = subprocess.run([str(exe), *args], input=data, capture_output=True, env=SAN_ENV,
                          timeout=60)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and not err, f"exit {proc.returncode}\n{err}"
    return proc.stdout.decode()


def dump(exe: Path, data: bytes) -> tuple[int | None, list[tuple[int, int, int, int]], str]:
    """(format or None if open failed, [(ts_ns, caplen, wirelen, linktype)], status name)."""
    lines = run_harness(exe, "-", data=data).splitlines()
    fmt = None
    if lines and lines[0].startswith("format "):
        fmt = int(lines.pop(0).split()[1])
    status = lines.pop().split()
    assert status[0] == "status"
    assert status[2] in STATUSES, status
    pkts = [tuple(int(x) for x in line.split()) for line in lines]
    return fmt, pkts, status[2]


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


def test_fixtures_match_their_generator():
    built = mk.build_all()
    assert set(built) == set(EXPECTED)
    for name, data in built.items():
        assert (FIXTURES / name).read_bytes() == data, f"re-run make_captures.py ({name})"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_packets(harness, name):
    exp = EXPECTED[name]
    fmt, pkts, status = dump(harness, (FIXTURES / name).read_bytes())
    assert fmt == {"pcap": 0, "pcapng": 1}[exp["format"]]
    assert status == exp["status"]
    assert [p[0] for p in pkts] == exp["packets"]
    assert [p[1:] for p in pkts] == [r[:3] for r in exp["records"]]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_prefix_reads_a_prefix_of_the_packets(harness, name):
    assert run_harness(harness, "--prefixes", str(FIXTURES / name)).startswith("prefixes ok")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_single_byte_mutation_is_clean(harness, name):
    out = run_harness(harness, "--mutate", str(FIXTURES / name))
    counts = dict(kv.split("=") for kv in out.split()[1:])
    assert counts["OK"] == counts["other"] == counts["ERR_LINKTYPE"] == "0", out


# --------------------------------------------------------------------------
# Synthesised edge cases
# --------------------------------------------------------------------------

LE, BE = "<", ">"
FRAME = mk.udp4("10.1.0.1", "10.2.0.2", 5000, 5060, 10, ident=1)  # 52 bytes -> padded 60
U64 = 2**64 - 1


def ng(*blocks: bytes, e: str = LE) -> bytes:
    return mk.shb(e) + b"".join(blocks)


def ts_case(tsresol: int, units: int, tsoffset: int | None = None) -> bytes:
    return ng(mk.idb(LE, tsresol=tsresol, tsoffset=tsoffset), mk.epb(LE, 0, units, FRAME))


def pkt(ts: int, caplen: int = 60, wirelen: int | None = None, linktype: int = 1):
    return (ts, caplen, caplen if wirelen is None else wirelen, linktype)


def bad_trailer(block: bytes) -> bytes:
    return block[:-4] + struct.pack("<I", len(block) + 4)


CASES = {
    # timestamps: exact decimal, floor for what is not a whole nanosecond
    "resol 10^0": (ts_case(0, 1700000000), [pkt(1700000000 * 10**9)], "END"),
    "resol 10^-3": (ts_case(3, 1700000000123), [pkt(1700000000123000000)], "END"),
    "resol 10^-9": (ts_case(9, U64), [pkt(U64)], "END"),
    "resol 10^-12": (ts_case(12, 12345678901234567), [pkt(12345678901234)], "END"),
    "resol 10^-28": (ts_case(28, U64), [pkt(U64 // 10**19)], "END"),
    "resol 10^-29": (ts_case(29, U64), [pkt(0)], "END"),
    "resol 10^-127": (ts_case(127, U64), [pkt(0)], "END"),
    "resol 10^0 saturates": (ts_case(0, U64), [pkt(U64)], "END"),
    "resol 10^-6 saturates": (ts_case(6, 2**63), [pkt(U64)], "END"),
    "resol 2^0": (ts_case(0x80, 5), [pkt(5 * 10**9)], "END"),
    "resol 2^-30": (ts_case(0x80 | 30, 3), [pkt(3 * 10**9 >> 30)], "END"),
    "resol 2^-32": (ts_case(0x80 | 32, (1700000000 << 32) + 0xFFFFFFFF),
                    [pkt(((1700000000 << 32) + 0xFFFFFFFF) * 10**9 >> 32)], "END"),
    "resol 2^-63": (ts_case(0x80 | 63, U64), [pkt(U64 * 10**9 >> 63)], "END"),
    "resol 2^-64": (ts_case(0x80 | 64, 2**63), [pkt(500000000)], "END"),
    "resol 2^-70": (ts_case(0x80 | 70, U64), [pkt(U64 * 10**9 >> 70)], "END"),
    "resol 2^-127": (ts_case(0xFF, U64), [pkt(0)], "END"),
    "tsoffset +": (ts_case(6, 1000, tsoffset=1700000000), [pkt(1700000000001000000)], "END"),
    "tsoffset -": (ts_case(9, 5 * 10**9 + 7, tsoffset=-2), [pkt(3 * 10**9 + 7)], "END"),
    "tsoffset clamps at 0": (ts_case(9, 5, tsoffset=-(2**63)), [pkt(0)], "END"),
    "tsoffset saturates": (ts_case(9, 5, tsoffset=2**63 - 1), [pkt(U64)], "END"),
    # link types are reported per interface, never rejected
    "linktypes per interface": (
        ng(mk.idb(LE, linktype=101), mk.idb(LE, linktype=1),
           mk.epb(LE, 0, 1, FRAME[14:]), mk.epb(LE, 1, 2, FRAME), mk.spb(LE, b"\x45" * 20)),
        [pkt(1000, 46, linktype=101), pkt(2000), pkt(0, 20, linktype=101)], "END"),
    "pcap linktype ignores the FCS bits": (
        mk.pcap_file([(1, 2, FRAME)], big_endian=True, nanos=False, linktype=0x14000000 | 228),
        [pkt(10**9 + 2000, linktype=228)], "END"),
    # lengths
    "pcap caplen < wirelen": (mk.pcap_file([(1, 2, FRAME[:20], 1500)], big_endian=False,
                                           nanos=True), [pkt(10**9 + 2, 20, 1500)], "END"),
    "epb caplen < wirelen": (ng(mk.idb(LE), mk.epb(LE, 0, 7, FRAME[:33], wirelen=60)),
                             [pkt(7000, 33, 60)], "END"),
    "spb caplen = original length": (ng(mk.idb(LE), mk.spb(LE, FRAME[:33])),
                                     [pkt(0, 33, 33)], "END"),
    "spb caplen = block room": (ng(mk.idb(LE), mk.spb(LE, FRAME[:33], wirelen=1500)),
                                [pkt(0, 36, 1500)], "END"),
    "zero-length packets": (ng(mk.idb(LE), mk.epb(LE, 0, 1, b""), mk.spb(LE, b"")),
                            [pkt(1000, 0), pkt(0, 0)], "END"),
    # sections and interfaces
    "interface ids restart per section": (
        ng(mk.idb(LE), mk.idb(LE, tsresol=9), mk.epb(LE, 1, 5, FRAME),
           mk.shb(BE), mk.idb(BE, tsresol=3), mk.epb(BE, 0, 5, FRAME)),
        [pkt(5), pkt(5000000)], "END"),
    "interface of an old section is gone": (
        ng(mk.idb(LE), mk.idb(LE), mk.shb(LE), mk.idb(LE), mk.epb(LE, 1, 5, FRAME)),
        [], "ERR_BLOCK"),
    "64 interfaces": (ng(*[mk.idb(LE, linktype=i) for i in range(64)],
                         mk.epb(LE, 63, 1, FRAME)), [pkt(1000, linktype=63)], "END"),
    "65 interfaces": (ng(mk.idb(LE), mk.epb(LE, 0, 1, FRAME), *[mk.idb(LE)] * 64),
                      [pkt(1000)], "ERR_BLOCK"),
    "64 interfaces in each of two sections": (
        ng(*[mk.idb(LE)] * 64, mk.shb(LE), *[mk.idb(LE)] * 64, mk.epb(LE, 63, 1, FRAME)),
        [pkt(1000)], "END"),
    "epb on unknown interface": (ng(mk.idb(LE), mk.epb(LE, 0, 1, FRAME), mk.epb(LE, 1, 2, FRAME)),
                                 [pkt(1000)], "ERR_BLOCK"),
    "pb on unknown interface": (ng(mk.pb(LE, 0, 1, FRAME)), [], "ERR_BLOCK"),
    "spb without interface": (ng(mk.spb(LE, FRAME)), [], "ERR_BLOCK"),
    "only a section header": (ng(), [], "END"),
    "unknown blocks only": (ng(mk.block(LE, 0x40000BAD, b"x" * 9), mk.block(LE, 0x80000001, b"")),
                            [], "END"),
    # damaged blocks
    "caplen beyond the block": (
        ng(mk.idb(LE), mk.epb(LE, 0, 1, FRAME),
           mk.block(LE, 6, struct.pack("<IIIII", 0, 0, 0, 61, 61) + FRAME)),
        [pkt(1000)], "ERR_BLOCK"),
    "trailing length differs": (ng(mk.idb(LE), mk.epb(LE, 0, 1, FRAME),
                                   bad_trailer(mk.epb(LE, 0, 2, FRAME))), [pkt(1000)], "ERR_BLOCK"),
    "block length not a multiple of 4": (
        ng(mk.idb(LE), struct.pack("<II", 6, 33) + b"\0" * 25), [], "ERR_BLOCK"),
    "block length below 12": (ng(mk.idb(LE), struct.pack("<III", 6, 8, 8)), [], "ERR_BLOCK"),
    "block length beyond the file": (ng(mk.idb(LE), mk.epb(LE, 0, 1, FRAME)[:-4]), [],
                                     "ERR_TRUNCATED"),
    "block header cut": (ng(mk.idb(LE), mk.epb(LE, 0, 1, FRAME), b"\6\0\0\0\x20"),
                         [pkt(1000)], "ERR_TRUNCATED"),
    "epb too short for its header": (ng(mk.idb(LE), mk.block(LE, 6, b"\0" * 16)), [], "ERR_BLOCK"),
    "pb too short for its header": (ng(mk.idb(LE), mk.block(LE, 2, b"\0" * 16)), [], "ERR_BLOCK"),
    "idb too short": (ng(mk.block(LE, 1, b"\1\0\0\0")), [], "ERR_BLOCK"),
    "if_tsresol of wrong size": (
        ng(mk.block(LE, 1, struct.pack("<HHI", 1, 0, 0) + mk.options(LE, mk.option(LE, 9, b"\6\6")))),
        [], "ERR_BLOCK"),
    "if_tsoffset of wrong size": (
        ng(mk.block(LE, 1, struct.pack("<HHI", 1, 0, 0) + mk.options(LE, mk.option(LE, 14, b"1234")))),
        [], "ERR_BLOCK"),
    "option overruns the block": (
        ng(mk.block(LE, 1, struct.pack("<HHIHH", 1, 0, 0, 2, 200) + b"eth0")), [], "ERR_BLOCK"),
    "options after opt_endofopt are ignored": (
        ng(mk.block(LE, 1, struct.pack("<HHIHHHH", 1, 0, 0, 0, 0, 9, 1) + b"\x09\0\0\0"),
           mk.epb(LE, 0, 1, FRAME)), [pkt(1000)], "END"),
    "second section with a bad byte-order magic": (
        ng(mk.idb(LE), mk.epb(LE, 0, 1, FRAME), mk.shb(LE)[:8] + b"\0" * 4 + mk.shb(LE)[12:]),
        [pkt(1000)], "ERR_BLOCK"),
    "section of major version 2": (
        ng(mk.block(LE, 0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 2, 0, -1))), [], "ERR_BLOCK"),
    "section header too short": (mk.block(LE, 0x0A0D0D0A, struct.pack("<IHH", 0x1A2B3C4D, 1, 0)),
                                 None, "ERR_BLOCK"),
    # not a capture / cut at the start
    "empty": (b"", None, "ERR_TRUNCATED"),
    "3 bytes of a magic": (b"\x4d\x3c\xb2", None, "ERR_TRUNCATED"),
    "3 bytes of something else": (b"GIF", None, "ERR_MAGIC"),
    "foreign magic": (b"GIF89a" + b"\0" * 40, None, "ERR_MAGIC"),
    "pcapng without byte-order magic": (b"\x0a\x0d\x0d\x0a" + b"\x1c\0\0\0" + b"\0" * 20, None,
                                        "ERR_MAGIC"),
    "pcapng cut in the section header": (mk.shb(BE)[:20], None, "ERR_TRUNCATED"),
    "pcapng shorter than a block": (mk.shb(BE)[:10], None, "ERR_TRUNCATED"),
    "pcap header only": (mk.pcap_file([], big_endian=False, nanos=False), [], "END"),
    "pcap header cut": (mk.pcap_file([], big_endian=True, nanos=True)[:23], None, "ERR_TRUNCATED"),
    "pcap record header cut": (mk.pcap_file([(1, 0, FRAME)], big_endian=False, nanos=False)[:-61],
                               [], "ERR_TRUNCATED"),
    "pcap huge caplen": (mk.pcap_file([], big_endian=False, nanos=False)
                         + struct.pack("<IIII", 1, 0, 0xFFFFFFFF, 60) + FRAME, [], "ERR_TRUNCATED"),
    "pcap max timestamp": (mk.pcap_file([(2**32 - 1, 2**32 - 1, FRAME)], big_endian=False,
                                        nanos=False),
                           [pkt((2**32 - 1) * 10**9 + (2**32 - 1) * 1000)], "END"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edge_case(harness, case):
    data, want_pkts, want_status = CASES[case]
    fmt, pkts, status = dump(harness, data)
    assert status == want_status
    if want_pkts is None:  # open failed
        assert fmt is None and pkts == []
    else:
        assert fmt == (0 if data[:4] != b"\x0a\x0d\x0d\x0a" else 1)
        assert pkts == want_pkts


# --------------------------------------------------------------------------
# Random and mutated input: must end cleanly, whatever it is
# --------------------------------------------------------------------------

FIXTURE_BYTES = {name: (FIXTURES / name).read_bytes() for name in sorted(EXPECTED)}
MAGICS = [b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",
          b"\x0a\x0d\x0d\x0a\x1c\0\0\0\x4d\x3c\x2b\x1a", b"\x0a\x0d\x0d\x0a\0\0\0\x1c\x1a\x2b\x3c\x4d"]


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=600),
                 st.tuples(st.sampled_from(MAGICS), st.binary(max_size=600)).map(b"".join)))
def test_random_bytes(harness, data):
    dump(harness, data)


@st.composite
def mutated_fixtures(draw):
    data = bytearray(FIXTURE_BYTES[draw(st.sampled_from(sorted(FIXTURE_BYTES)))])
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        # Either any byte, or a plausible small length / count in a 32-bit field.
        if draw(st.booleans()):
            data[i] = draw(st.integers(0, 255))
        else:
            data[i & ~3:(i & ~3) + 4] = struct.pack(draw(st.sampled_from("<>")) + "I",
                                                    draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(mutated_fixtures())
def test_mutated_fixtures(harness, data):
    dump(harness, data)
