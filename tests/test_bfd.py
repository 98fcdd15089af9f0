"""RFC 5880 sans-I/O: every state transition of section 6.2/6.8.6, the timer
rules of 6.8.2-6.8.4 and 6.8.7, Poll/Final, authentication, and random or
malformed packets against the state machine (hypothesis)."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patronus.failover.bfd import (DISCARD_REASONS, SLOW_US, Auth, BfdDecodeError, ControlPacket, Diag, Session,
                                   State, decode, encode)

U, D, I, AD = State.UP, State.DOWN, State.INIT, State.ADMIN_DOWN


def pkt(state, my=99, your=1, **kw):
    kw.setdefault("desired_min_tx_us", 50_000)
    kw.setdefault("required_min_rx_us", 50_000)
    return ControlPacket(state, my, your, **kw)


def session(**kw):
    kw.setdefault("tx_us", 50_000)
    kw.setdefault("rx_us", 50_000)
    return Session(1, multiplier=kw.pop("multiplier", 3), rng=random.Random(0), **kw)


def run_pair(a, b, start, until, wire=lambda s, p: decode(s.encode(p))):
    """Two sessions on a lossless zero-delay link, timers fired exactly when due."""
    t = start
    while True:
        t = min(x for x in (a.next_deadline(), b.next_deadline()) if x is not None)
        if t > until:
            return
        queue = [(a, b, p) for p in a.tick(t)] + [(b, a, p) for p in b.tick(t)]
        while queue:
            src, dst, p = queue.pop(0)
            queue += [(dst, src, q) for q in dst.receive(wire(src, p), t)]


def up_session():
    s = session()
    s.receive(pkt(D, your=0), 0.0)
    s.receive(pkt(U), 0.01)
    assert s.state == U
    return s


# -- codec -----------------------------------------------------------------------


def test_encode_decode_by_hand():
    p = ControlPacket(U, 0x01020304, 0x0A0B0C0D, Diag.NEIGHBOR_DOWN, 3, 50_000, 60_000, 0, poll=True)
    raw = encode(p)
    assert raw[:4] == bytes([0x20 | 3, (3 << 6) | 0x20, 3, 24])
    assert struct.unpack("!IIIII", raw[4:]) == (0x01020304, 0x0A0B0C0D, 50_000, 60_000, 0)
    assert decode(raw)._replace(raw=b"") == p and decode(raw).raw == raw


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b[:23], "short"),
    (lambda b: bytes([0x40]) + b[1:], "bad_version"),
    (lambda b: b[:3] + bytes([20]) + b[4:], "bad_length"),
    (lambda b: b[:3] + bytes([30]) + b[4:], "truncated"),
    (lambda b: b[:2] + bytes([0]) + b[3:], "zero_multiplier"),
    (lambda b: b[:1] + bytes([b[1] | 1]) + b[2:], "multipoint"),
    (lambda b: b[:4] + bytes(4) + b[8:], "zero_my_discriminator"),
])
def test_packet_checks_of_6_8_6(mutate, reason):
    with pytest.raises(BfdDecodeError) as e:
        decode(mutate(encode(pkt(U))))
    assert e.value.reason == reason


@given(st.binary(max_size=80))
def test_garbage_raises_only_named_errors(data):
    try:
        decode(data)
    except BfdDecodeError as e:
        assert e.reason in DISCARD_REASONS


# -- state machine (6.2, 6.8.6) ------------------------------------------------------

TRANSITIONS = [
    # local, received, expected
    (D, AD, D), (D, D, I), (D, I, U), (D, U, D),
    (I, AD, D), (I, D, I), (I, I, U), (I, U, U),
    (U, AD, D), (U, D, D), (U, I, U), (U, U, U),
]


@pytest.mark.parametrize("local,received,expected", TRANSITIONS)
def test_every_transition(local, received, expected):
    s = session()
    if local == I:
        s.receive(pkt(D, your=0), 0.0)
    elif local == U:
        s = up_session()
    assert s.state == local
    your = 0 if received in (D, AD) and local == D else 1
    s.receive(pkt(received, your=your), 0.02)
    assert s.state == expected
    if local in (I, U) and expected == D:
        assert s.local_diag == Diag.NEIGHBOR_DOWN


def test_admin_down_discards_everything_and_tells_the_peer():
    s = up_session()
    s.admin_down(1.0)
    (p,) = s.tick(1.0)
    assert (p.state, p.diag, s.state) == (AD, Diag.ADMIN_DOWN, AD)
    s.receive(pkt(U), 1.01)
    assert s.state == AD and s.discards["admin_down"] == 1
    s.admin_up(2.0)
    assert s.state == D


def test_zero_your_discriminator_only_while_down():
    s = up_session()
    assert s.receive(pkt(U, your=0), 0.1) == [] and s.discards == {"zero_your_discriminator": 1}
    s.receive(pkt(U, your=77), 0.1)
    assert s.discards["unknown_discriminator"] == 1 and s.state == U


# -- timers (6.8.2 - 6.8.4, 6.8.7) ---------------------------------------------------


def test_slow_rate_until_up_then_poll_to_the_fast_rate():
    s = session()
    (p,) = s.tick(0.0)
    assert p.desired_min_tx_us == SLOW_US and s.tx_interval() == 1.0
    gaps = []
    t = 0.0
    for _ in range(50):
        t = s.next_deadline()
        if s.tick(t):
            gaps.append(t)
    diffs = [b - a for a, b in zip(gaps, gaps[1:])]
    assert all(0.75 <= d <= 1.0 for d in diffs) and max(diffs) - min(diffs) > 0.05  # 75-100 % jitter
    s.receive(pkt(D, your=0, required_min_rx_us=50_000), t)
    (up,) = s.receive(pkt(I), t + 0.001)
    assert s.state == U and up.poll and up.desired_min_tx_us == 50_000
    assert s.tx_interval() == 0.05  # a faster rate may start before the Final
    s.receive(pkt(U, final=True), t + 0.002)
    assert not s._poll


def test_detect_mult_one_jitters_at_most_90_percent():
    s = session(multiplier=1)
    s._tx_interval_us = 100_000
    s.remote_min_rx_us = 1
    assert all(0.075 <= s._jittered() <= 0.09 for _ in range(200))


def test_detection_time_uses_the_remote_multiplier_and_the_slower_side():
    s = up_session()
    s.receive(pkt(U, detect_mult=5, desired_min_tx_us=80_000), 1.0)
    assert s.detection_time() == pytest.approx(5 * 0.08)
    assert s.tick(1.0 + 0.399) == [] or s.state == U
    s.tick(1.401)
    assert s.state == D and s.local_diag == Diag.DETECT_EXPIRED and s.remote_discr == 0


def test_remote_min_rx_limits_our_rate_and_zero_stops_it():
    s = up_session()
    s.receive(pkt(U, required_min_rx_us=300_000), 1.0)
    assert s.tx_interval() == 0.3
    s.receive(pkt(U, required_min_rx_us=0), 1.1)
    s._next_tx = 1.1
    assert s.tick(1.2) == []


def test_poll_is_answered_by_a_final_at_once_and_never_with_poll():
    s = up_session()
    s._poll = True
    out = s.receive(pkt(U, poll=True), 1.0)
    assert len(out) == 1 and out[0].final and not out[0].poll


def test_longer_tx_and_shorter_rx_wait_for_the_final():
    s = up_session()
    s.receive(pkt(U, final=True), 0.05)            # ends the Poll that the move to Up started
    s.set_timers(200_000, 20_000, 0.06)
    assert s._poll and s.tx_interval() == 0.05      # old tx until the Final
    assert s.detection_time() == pytest.approx(3 * 0.05)  # old rx for detection until the Final
    (p,) = s.tick(0.06)
    assert p.poll and p.desired_min_tx_us == 200_000 and p.required_min_rx_us == 20_000
    s.receive(pkt(U, final=True, desired_min_tx_us=10_000), 0.07)
    assert not s._poll and s.tx_interval() == 0.2
    assert s.detection_time() == pytest.approx(3 * 0.02)


def test_going_down_returns_to_the_slow_rate():
    s = up_session()
    (p,) = s.receive(pkt(D), 0.05)
    assert s.state == D and s.tx_interval() == 1.0
    assert p.desired_min_tx_us == SLOW_US and p.state == D


def test_remote_demand_mode_stops_periodic_packets_while_both_up():
    s = up_session()
    s.receive(pkt(U, demand=True), 1.0)
    s._next_tx = 1.0
    assert s.tick(1.0) == []


# -- authentication (6.7.4) ------------------------------------------------------------


@pytest.mark.parametrize("meticulous", [False, True])
def test_keyed_sha1_between_two_sessions(meticulous):
    auth = Auth({3: b"s3cret"}, 3, meticulous=meticulous)
    a = Session(1, 50_000, 50_000, auth=auth, rng=random.Random(1))
    b = Session(2, 50_000, 50_000, auth=auth, rng=random.Random(2))
    t = 10.0
    run_pair(a, b, 0.0, t)
    assert a.state == b.state == U and not a.discards and not b.discards
    assert a.sent > 150 and b.received == a.sent    # 50 ms rate after the slow start
    raw = bytearray(a.encode(a._packet()))
    raw[30] ^= 1                                      # a flipped bit of the sequence number
    b.receive(decode(bytes(raw)), t)
    assert b.discards == {"auth_bad": 1}
    good = a.encode(a._packet())
    b.receive(decode(good), t)
    b.receive(decode(good), t)                        # replayed
    assert b.discards.get("auth_sequence", 0) == (1 if meticulous else 0)
    plain = Session(3, 50_000, 50_000)
    assert b.receive(decode(encode(plain._packet())), t) == [] and b.discards["auth_missing"] == 1
    wrong = Auth({3: b"other"}, 3, meticulous=meticulous)
    c = Session(4, 50_000, 50_000, auth=wrong)
    b.receive(decode(c.encode(c._packet())), t)
    assert b.discards["auth_bad"] == 2
    assert "s3cret" not in repr(auth)


# -- random input ---------------------------------------------------------------------

ALLOWED = {D: {D, I, U}, I: {I, U, D}, U: {U, D}, AD: {AD}}


@st.composite
def packets(draw):
    return ControlPacket(State(draw(st.integers(0, 3))), draw(st.integers(1, 2**32 - 1)),
                         draw(st.sampled_from([0, 1, 2, 2**32 - 1])), Diag(draw(st.integers(0, 8))),
                         draw(st.integers(1, 255)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
                         0, draw(st.booleans()), draw(st.booleans()), False, draw(st.booleans()))


@settings(max_examples=300)
@given(st.lists(st.tuples(st.one_of(packets(), st.binary(max_size=60)), st.floats(0, 2)), max_size=60),
       st.booleans())
def test_random_and_malformed_packets_never_crash_or_break_the_rules(events, admin):
    s = session()
    if admin:
        s.admin_down(0.0)
    now = 0.0
    for item, dt in events:
        now += dt
        before = s.state
        s.tick(now)
        after_tick = s.state
        if isinstance(item, bytes):
            try:
                item = decode(item)
            except BfdDecodeError:
                continue
        try:
            out = s.receive(item, now)
        except Exception as e:  # pragma: no cover - the property is that this never happens
            raise AssertionError(f"receive raised {e!r}") from e
        assert s.state in ALLOWED[after_tick], (before, after_tick, s.state, item)
        for p in out:
            assert not (p.poll and p.final)
            decode(encode(p))
        if s.state == U:
            assert s.remote_discr != 0


def test_two_sessions_come_up_stay_up_and_detect_a_silent_peer_in_time():
    a, b = session(), Session(2, 50_000, 50_000, rng=random.Random(5))
    run_pair(a, b, 0.0, 30.0)
    assert a.state == b.state == U
    assert [t.new for t in a.transitions] == [I, U] or [t.new for t in a.transitions] == [U]
    last = max(a._last_rx, b._last_rx)
    # b goes silent: a notices after its detection time, not before
    while a.next_deadline() is not None and a.state == U:
        t = a.next_deadline()
        a.tick(t)
    assert a.transitions[-1].new == D
    assert a.transitions[-1].at - last <= 0.15 + 1e-9 and a.transitions[-1].at - last >= 0.15 - 0.05


def _pair(a_addr, b_addr, **kw):
    import asyncio

    from patronus.failover import BfdSession

    async def main():
        a = BfdSession(a_addr, b_addr, 20, 20, 3, port=kw.get("pa", 16001), peer_port=kw.get("pb", 16002), **kw.get("opts", {}))
        b = BfdSession(b_addr, a_addr, 20, 20, 3, port=kw.get("pb", 16002), peer_port=kw.get("pa", 16001), **kw.get("opts", {}))
        await a.start()
        await b.start()
        try:
            await asyncio.wait_for(a.wait_for(State.UP), 5)
            await asyncio.sleep(0.2)
            b.kill()
            t = await asyncio.wait_for(a.wait_for(State.DOWN), 2)
            return a.snapshot(), t
        finally:
            await a.stop()
            await b.stop()

    return asyncio.run(main())


def test_multihop_sessions_come_up_and_detect():
    snap, t = _pair("127.0.0.1", "127.0.0.3", pa=16011, pb=16012, opts={"multihop": True, "min_ttl": 250})
    assert t.old == U and t.diag == Diag.DETECT_EXPIRED and snap["received"] > 5


def test_ipv6_sessions_come_up_and_detect():
    try:
        snap, t = _pair("::1", "::1", pa=16021, pb=16022)
    except Exception as e:  # no IPv6 on loopback here
        if "Cannot assign" in str(e) or "Address family" in str(e):
            pytest.skip(str(e))
        raise
    assert t.old == U and t.diag == Diag.DETECT_EXPIRED and snap["received"] > 5


def test_packets_below_ttl_255_are_dropped_on_single_hop():
    import asyncio
    import socket

    from patronus.failover import BfdSession

    async def main():
        a = BfdSession("127.0.0.1", "127.0.0.4", 20, 20, 3, port=16031, peer_port=16032)
        await a.start()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
        s.bind(("127.0.0.4", 0))
        for _ in range(3):
            s.sendto(encode(ControlPacket(D, 77, 0)), ("127.0.0.1", 16031))
            await asyncio.sleep(0.02)
        s.close()
        ep = a._ep.discards
        st = a.state
        await a.stop()
        return ep, st

    discards, state = asyncio.run(main())
    assert discards.get("bad_ttl") == 3 and state == D


@pytest.mark.parametrize("cores", [(True, False), (False, True), (True, True)])
def test_the_compiled_and_python_cores_come_up_with_each_other_over_udp(cores):
    """Each side of a real UDP pair on its own core: they come Up, and a
    silent peer is a Down with the enum-typed transition either way."""
    import asyncio

    from patronus.failover import BfdSession

    async def main():
        a = BfdSession("127.0.0.1", "127.0.0.5", 20, 20, 3, port=16041, peer_port=16042, compiled=cores[0])
        b = BfdSession("127.0.0.5", "127.0.0.1", 20, 20, 3, port=16042, peer_port=16041, compiled=cores[1])
        await a.start()
        await b.start()
        try:
            await asyncio.wait_for(a.wait_for(State.UP), 5)
            await asyncio.wait_for(b.wait_for(State.UP), 5)
            await asyncio.sleep(0.2)   # at the fast rate for a while
            up = (a.state, b.state)
            b.kill()
            t = await asyncio.wait_for(a.wait_for(State.DOWN), 2)
            return up, t, a.snapshot()
        finally:
            await a.stop()
            await b.stop()

    up, t, snap = asyncio.run(main())
    assert up == (U, U) and isinstance(up[0], State)
    assert (t.old, t.new, t.diag) == (U, D, Diag.DETECT_EXPIRED) and isinstance(t.diag, Diag)
    assert snap["state"] == "DOWN" and snap["diag"] == "DETECT_EXPIRED" and snap["received"] > 5


def test_malformed_datagrams_for_a_compiled_session_are_counted_by_name():
    import asyncio
    import socket

    from patronus.failover import BfdSession

    async def main():
        a = BfdSession("127.0.0.1", "127.0.0.6", 20, 20, 3, port=16051, peer_port=16052, compiled=True)
        await a.start()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
        s.bind(("127.0.0.6", 0))
        good = bytearray(encode(ControlPacket(D, 77, a.core.local_discr)))
        bad_version = bytes([good[0] ^ 0x40]) + bytes(good[1:])
        zero_mult = bytes(good[:2]) + b"\0" + bytes(good[3:])
        for d in (b"\x20" * 10, bad_version, zero_mult):
            s.sendto(d, ("127.0.0.1", 16051))
        s.sendto(bytes(good), ("127.0.0.1", 16051))   # then a good one: the session goes on
        await asyncio.wait_for(a.wait_for(State.INIT), 2)
        s.close()
        out = dict(a._ep.discards), dict(a.core.discards), a.state
        await a.stop()
        return out

    endpoint, session, state = asyncio.run(main())
    assert endpoint == {"short": 1}
    assert session == {"bad_version": 1, "zero_multiplier": 1}
    assert state == I


def test_authentication_needs_the_python_core():
    from patronus.errors import ConfigError
    from patronus.failover import BfdSession
    from patronus.failover.bfd import Auth

    auth = Auth({1: b"secret"}, 1)
    with pytest.raises(ConfigError, match="compiled=False"):
        BfdSession("127.0.0.1", "127.0.0.7", auth=auth, compiled=True)
    assert not BfdSession("127.0.0.1", "127.0.0.7", auth=auth)._fast   # the default follows the auth
