"""The sans-I/O path MTU search (patronus.paths.mtu.MtuSearch) against
oracles: a path that passes every size up to its MTU, loses some probes,
and a local interface that refuses sizes above its own MTU."""

from __future__ import annotations

import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from patronus.paths import MtuSearch


def run(search: MtuSearch, path_mtu: int, *, local_mtu: int | None = None, losses: list[bool] | None = None):
    """Answer the search like a path: sizes up to ``path_mtu`` come back
    (unless the next entry of ``losses`` drops the probe), larger ones never;
    sizes above ``local_mtu`` are refused by the sender. The distinct sizes
    probed, in order."""
    losses = list(losses or [])
    sizes: list[int] = []
    while (size := search.next_size()) is not None:
        if not sizes or sizes[-1] != size:
            sizes.append(size)
        if local_mtu is not None and size > local_mtu:
            search.on_too_big()
        elif size <= path_mtu and not (losses and losses.pop(0)):
            search.on_reply()
        else:
            search.on_timeout()
        assert len(sizes) < 100
    assert search.done and search.next_size() is None
    return sizes


def steps(lo: int, hi: int) -> int:
    return 1 + math.ceil(math.log2(hi - lo + 1))


@settings(max_examples=500, deadline=None)
@given(lo=st.integers(68, 9000), width=st.integers(0, 20000), mtu=st.integers(0, 40000))
def test_converges_to_the_path_mtu_within_log2_steps(lo, width, mtu):
    hi = lo + width
    search = MtuSearch(lo, hi, tries=2)
    sizes = run(search, mtu)
    if mtu < lo:
        assert search.result is None and sizes == [lo]
    else:
        assert search.result == min(mtu, hi)
        assert len(sizes) <= steps(lo, hi)
        assert all(lo <= s <= hi for s in sizes)
    assert search.probes <= 2 * len(sizes)


@settings(max_examples=300, deadline=None)
@given(lo=st.integers(576, 1500), width=st.integers(0, 8000), mtu=st.integers(576, 9000),
       losses=st.lists(st.booleans(), max_size=60), tries=st.integers(2, 4))
def test_a_lost_probe_is_tried_again(lo, width, mtu, losses, tries):
    """Losses never ``tries`` in a row: the search still finds the MTU."""
    hi = lo + width
    assume(mtu >= lo)
    run_ = 0
    for lost in losses:  # no more than tries - 1 losses in a row
        run_ = run_ + 1 if lost else 0
        assume(run_ < tries)
    search = MtuSearch(lo, hi, tries=tries)
    run(search, mtu, losses=losses)
    assert search.result == min(mtu, hi)


@settings(max_examples=300, deadline=None)
@given(lo=st.integers(576, 1500), width=st.integers(0, 8000), path_mtu=st.integers(576, 9000),
       local_mtu=st.integers(576, 9000))
def test_a_size_the_sender_refuses_does_not_fit_at_once(lo, width, path_mtu, local_mtu):
    hi = lo + width
    assume(min(path_mtu, local_mtu) >= lo)
    search = MtuSearch(lo, hi, tries=3)
    sizes = run(search, path_mtu, local_mtu=local_mtu)
    assert search.result == min(path_mtu, local_mtu, hi)
    assert len(sizes) <= steps(lo, hi)


@given(lo=st.integers(0, 200), width=st.integers(0, 3000), mtu=st.integers(0, 4000),
       low=st.integers(0, 300), high=st.integers(0, 3000))
def test_sizes_a_probe_cannot_have_are_never_asked(lo, width, mtu, low, high):
    """Outside ``probe_range`` a size does not fit without being probed;
    ``lo`` outside it ends the search with no result."""
    hi = lo + width
    search = MtuSearch(lo, hi, probe_range=(low, high))
    sizes = run(search, mtu)
    assert all(low <= s <= high for s in sizes)
    if not low <= lo <= high or mtu < lo:
        assert search.result is None
    else:
        assert search.result == min(mtu, hi, high)


def test_lo_not_answered_tries_then_gives_up():
    search = MtuSearch(576, 1500, tries=3)
    assert [search.next_size() for _ in range(2)] == [576, 576]   # the same size until answered
    assert search.probes == 1
    search.on_timeout()
    assert search.next_size() == 576 and search.probes == 2
    search.on_timeout()
    assert search.next_size() == 576 and not search.done
    search.on_timeout()
    assert search.done and search.result is None and search.probes == 3 and search.next_size() is None
