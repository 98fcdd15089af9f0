"""Path MTU search, sans-I/O: which IP packet size to probe next, and what
the answers mean. ``Monitor.probe_mtu`` is the I/O loop around it (probes
with DF set on a socket of their own); tests drive it with any oracle.

The search first checks ``lo`` (when even that does not come back the path
answers no probes at all: ``result`` None), then halves ``[lo, hi]``:
``1 + ceil(log2(hi - lo + 1))`` sizes at most, each tried up to ``tries``
times (a lost probe is not yet a size that does not fit).

>>> s = MtuSearch(lo=576, hi=1500)
>>> while (size := s.next_size()) is not None:   # a path whose MTU is 1400
...     if size <= 1400:
...         s.on_reply()
...     else:
...         s.on_timeout()
>>> s.result, s.probes
(1400, 16)
"""

from __future__ import annotations

__all__ = ["MtuSearch"]


class MtuSearch:
    """Binary search for the largest IP packet size (bytes) in ``[lo, hi]``
    that crosses a path and back.

    ``next_size()`` is the size to probe now (the same until an answer comes
    in; None when done); answer it with ``on_reply()`` (it came back),
    ``on_timeout()`` (no reply in time; after ``tries`` of them the size does
    not fit) or ``on_too_big()`` (the local stack refused to send it: it does
    not fit, no retry). Sizes outside ``probe_range`` (what a probe can be,
    headers included) do not fit without being sent. When done, ``result``
    is the size found, or None when ``lo`` itself did not fit.

    >>> s = MtuSearch(lo=1000, hi=1003, tries=1)
    >>> s.next_size()
    1000
    >>> s.on_reply(); s.next_size()
    1002
    >>> s.on_too_big(); s.next_size()
    1001
    >>> s.on_reply(); s.next_size(), s.done, s.result
    (None, True, 1001)
    """

    def __init__(self, lo: int = 576, hi: int = 9000, *, tries: int = 2,
                 probe_range: tuple[int, int] | None = None) -> None:
        self.lo, self.hi, self.tries = int(lo), int(hi), max(1, int(tries))
        self.probe_range = probe_range
        self.result: int | None = None
        self.done = False
        self.probes = 0        # probes asked for (each try of each size)
        self._checked_lo = False
        self._size: int | None = None
        self._failed_tries = 0
        self._asked = False    # next_size() has handed out the current try
        self._advance()

    def next_size(self) -> int | None:
        """The IP packet size to probe now; None when the search is done."""
        if self._size is not None and not self._asked:
            self.probes += 1
            self._asked = True
        return self._size

    def on_reply(self) -> None:
        """The probe of ``next_size()`` bytes came back: that size fits."""
        self._answer(True)

    def on_timeout(self) -> None:
        """No reply to the probe in time; after ``tries`` of them the size does not fit."""
        if self._size is None:
            return
        self._failed_tries += 1
        self._asked = False
        if self._failed_tries >= self.tries:
            self._answer(False)

    def on_too_big(self) -> None:
        """The local stack refused to send it (EMSGSIZE): the size does not fit."""
        self._answer(False)

    # -- the search ---------------------------------------------------------------

    def _sendable(self, size: int) -> bool:
        return self.probe_range is None or self.probe_range[0] <= size <= self.probe_range[1]

    def _answer(self, fits: bool) -> None:
        size = self._size
        if size is None:
            return
        if not self._checked_lo:
            self._checked_lo = True
            if not fits:
                self._finish(None)
                return
        elif fits:
            self.lo = size
        else:
            self.hi = size - 1
        self._advance()

    def _advance(self) -> None:
        """Pick the next size, settling those that cannot be sent at once."""
        while True:
            if not self._checked_lo:
                size = self.lo
            elif self.lo < self.hi:
                size = (self.lo + self.hi + 1) // 2
            else:
                self._finish(self.lo)
                return
            if self._sendable(size):
                self._size, self._failed_tries, self._asked = size, 0, False
                return
            if not self._checked_lo:
                self._finish(None)
                return
            self.hi = size - 1

    def _finish(self, result: int | None) -> None:
        self.result, self.done, self._size = result, True, None
