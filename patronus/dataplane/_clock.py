"""The XDP program's clock: "now" is ``jiffies * tick_ns + clock_base``
(one inlined load a packet instead of a helper call). The tick and the base
are measured from readings of (jiffies, CLOCK_MONOTONIC coarse) the loader
takes through the program ``pn_clock``.

>>> nearest_tick(3_999_000)   # CONFIG_HZ=250
4000000
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import DataplaneUnavailable

__all__ = ["calibrate", "nearest_tick", "HZ"]

HZ = (24, 48, 100, 128, 200, 250, 256, 300, 500, 1000, 1024, 1200)  # the CONFIG_HZ values Linux offers


def nearest_tick(measured_ns: float) -> int:
    """TICK_NSEC of the CONFIG_HZ closest to a measured tick."""
    return min(((10**9 + hz // 2) // hz for hz in HZ), key=lambda k: abs(k - measured_ns))


def calibrate(read: Callable[[], tuple[int, int]], ticks: int = 25, timeout_s: float = 3.0) -> tuple[int, int]:
    """(tick_ns, clock_base) from ``read()`` samples (jiffies, coarse ns)
    spanning at least ``ticks`` ticks. The coarse clock moves in whole ticks
    with jiffies, but the kernel bumps jiffies a moment before the clock: a
    sample in that moment has the clock one tick behind. Over 25 ticks that
    skews the measured tick by 4 % at most, and the base is taken from the
    sample furthest ahead."""
    samples = [read()]
    deadline = time.monotonic() + timeout_s
    while samples[-1][0] - samples[0][0] < ticks and time.monotonic() < deadline:
        time.sleep(0.002)
        samples.append(read())
    (j0, t0), (j1, t1) = samples[0], samples[-1]
    if j1 - j0 < ticks:
        raise DataplaneUnavailable(f"jiffies advanced {j1 - j0} in {timeout_s:g} s", "is the kernel's tick stopped?")
    measured = (t1 - t0) / (j1 - j0)
    tick = nearest_tick(measured)
    if abs(measured - tick) > 0.05 * tick:
        raise DataplaneUnavailable(f"the kernel tick measured {measured:.0f} ns, not a CONFIG_HZ tick",
                                   "report this kernel's CONFIG_HZ to the patronus developers")
    return tick, max((t - j * tick) % (1 << 64) for j, t in samples)
