"""The compiled BFD session (patronus._bfd.FastSession) against its
specification, the sans-I/O Python session (patronus.failover.bfd): driven
with the same datagrams, clock steps and operator actions (hypothesis), both
send the same bytes, make the same transitions, count the same discards and
ask to be ticked at the same time."""

from __future__ import annotations

import random
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus._bfd import FastSession
from patronus.failover.bfd import BfdDecodeError, Session, decode

LOCAL = 7


def datagrams() -> Any:
    """Control packets as a peer (or a broken or hostile one) would send them."""
    head = st.tuples(
        st.sampled_from([1, 1, 1, 1, 0, 2]),                      # version
        st.integers(0, 31),                                       # diag
        st.integers(0, 3),                                        # state
        st.sampled_from([0, 0x20, 0x10, 0x02, 0x04, 0x01, 0x08, 0x30]),   # P, F, D, A, M, C flags
        st.sampled_from([3, 3, 1, 0, 255]),                       # detect mult
        st.sampled_from([24, 24, 24, 23, 26, 52, 60]),            # length field
        st.sampled_from([9, 9, 0, 12345]),                        # my discriminator
        st.sampled_from([0, LOCAL, LOCAL, 99]),                   # your discriminator
        st.sampled_from([0, 1, 20_000, 50_000, 300_000, 1_000_000]),   # desired min tx
        st.sampled_from([0, 1, 20_000, 50_000, 300_000, 1_000_000]),   # required min rx
    )

    def build(h: tuple[Any, ...], tail: bytes, cut: int) -> bytes:
        v, diag, sta, flags, mult, length, my, your, tx, rx = h
        b = struct.pack("!BBBBIIIII", (v << 5) | diag, (sta << 6) | flags, mult, length, my, your, tx, rx, 0) + tail
        return b[:cut] if cut else b

    return st.builds(build, head, st.sampled_from([b"", bytes([4, 28]) + bytes(26), bytes([1, 6, 1, 3, 65, 66]),
                                                   bytes([9, 2])]),
                     st.sampled_from([0, 0, 0, 0, 10, 25]))


steps = st.lists(st.one_of(
    st.tuples(st.just("tick"), st.floats(0.0, 1.5)),
    st.tuples(st.just("recv"), datagrams()),
    st.tuples(st.just("timers"), st.sampled_from([(20_000, 20_000), (50_000, 50_000), (300_000, 100_000),
                                                   (1_500_000, 1_500_000)])),
    st.tuples(st.just("admin"), st.booleans()),
), min_size=1, max_size=60)


def _python_receive(s: Session, data: bytes, now: float) -> list[bytes]:
    try:
        p = decode(data)
    except BfdDecodeError as e:
        s.discards[e.reason] = s.discards.get(e.reason, 0) + 1
        return []
    return [s.encode(x) for x in s.receive(p, now)]


def _same(py: Session, fast: FastSession) -> None:
    assert fast.state == int(py.state)
    assert [(int(t.old), int(t.new), int(t.diag), t.at) for t in py.transitions] == list(fast.transitions)
    assert fast.transition_count == py.transition_count
    assert fast.discards == py.discards
    assert (fast.received, fast.sent) == (py.received, py.sent)
    assert (fast.remote_discr, fast.remote_min_rx_us, fast.desired_min_tx_us, fast.required_min_rx_us) == \
        (py.remote_discr, py.remote_min_rx_us, py.desired_min_tx_us, py.required_min_rx_us)
    assert fast.next_deadline() == py.next_deadline()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tx=st.sampled_from([20_000, 50_000, 300_000]), mult=st.integers(1, 4), passive=st.booleans(),
       seed=st.integers(0, 2**32 - 1), script=steps)
def test_the_compiled_session_does_what_the_specification_does(tx: int, mult: int, passive: bool, seed: int,
                                                                 script: list[tuple[str, Any]]) -> None:
    py = Session(LOCAL, tx, tx, mult, passive=passive, rng=random.Random(seed))
    fast = FastSession(LOCAL, tx, tx, mult, passive=passive, rng=random.Random(seed))
    now = 0.0
    for kind, arg in script:
        if kind == "tick":
            now += arg
            assert fast.tick(now) == [py.encode(p) for p in py.tick(now)]
        elif kind == "recv":
            assert fast.receive(arg, now) == _python_receive(py, arg, now)
        elif kind == "timers":
            py.set_timers(*arg, now)
            fast.set_timers(*arg, now)
        elif arg:
            py.admin_down(now)
            fast.admin_down(now)
        else:
            py.admin_up(now)
            fast.admin_up(now)
        _same(py, fast)


def test_two_compiled_sessions_come_up_and_detect_a_silent_peer() -> None:
    a = FastSession(1, 50_000, 50_000, 3, rng=random.Random(1))
    b = FastSession(2, 50_000, 50_000, 3, rng=random.Random(2))
    t = 0.0
    while t < 5.0 and not (a.state == b.state == 3):
        for p in a.tick(t):
            for q in b.receive(p, t):
                a.receive(q, t)
        for p in b.tick(t):
            for q in a.receive(p, t):
                b.receive(q, t)
        t += 0.01
    assert a.state == b.state == 3 and a.desired_min_tx_us == 50_000   # Up, then the Poll to 50 ms
    last = t
    while a.state == 3:   # b falls silent
        t += 0.01
        a.tick(t)
    assert a.transitions[-1][1:3] == (1, 1) and 0.15 - 0.011 <= t - last <= 0.15 + 0.011   # Down, detect expired
