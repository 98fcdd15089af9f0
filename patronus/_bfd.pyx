# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""BFD (RFC 5880) sessions with the per-packet work compiled: decode, the
state machine, timers and encode. ``patronus.failover.bfd.Session`` (sans-I/O
Python) is the specification; ``FastSession`` does the same for sessions
without authentication, and tests/test_bfd_fast.py drives both with the same
packet and clock sequences (hypothesis) and requires the same transitions,
packets and discards.

>>> import random
>>> a = FastSession(1, 50_000, 50_000, 3, rng=random.Random(1))
>>> b = FastSession(2, 50_000, 50_000, 3, rng=random.Random(2))
>>> t = 0.0
>>> for _ in range(3):
...     for p in a.tick(t): _ = b.receive(p, t)
...     for p in b.tick(t): _ = a.receive(p, t)
...     t += 1.0
>>> a.state, b.state                          # 3: Up
(3, 3)
"""

import random as _random
from collections import deque

from libc.stdint cimport uint8_t, uint32_t

DEF SLOW = 1000000
DEF ADMIN_DOWN = 0
DEF DOWN = 1
DEF INIT = 2
DEF UP = 3
DEF D_NONE = 0
DEF D_DETECT = 1
DEF D_NEIGHBOR = 3
DEF D_ADMIN = 7

TRANSITIONS_KEPT = 256


cdef inline uint32_t _rd32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline void _wr32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef class FastSession:
    """One session; times in seconds from the caller's monotonic clock,
    intervals in microseconds. ``tick(now)`` and ``receive(datagram, now)``
    return the datagrams to send (bytes). ``transitions`` holds the newest
    ``TRANSITIONS_KEPT`` state changes as (old, new, diag, at)."""

    cdef public int state, remote_state, local_diag, detect_mult, remote_detect_mult
    cdef public long long local_discr, remote_discr
    cdef public long long config_tx_us, desired_min_tx_us, required_min_rx_us
    cdef public long long remote_min_rx_us, remote_desired_min_tx_us
    cdef public bint remote_demand, passive
    cdef readonly bint _poll     # a Poll Sequence is waiting for the peer's Final
    cdef bint _has_pending, _has_old_rx, _has_next_tx, _has_last_rx
    cdef long long _pend_tx, _pend_rx, _old_rx_us, _tx_interval_us
    cdef double _next_tx, _last_rx
    cdef public object transitions
    cdef public long long transition_count, received, sent
    cdef public dict discards
    cdef object _uniform

    def __init__(self, long long local_discr, long long tx_us=300_000, long long rx_us=300_000, int multiplier=3,
                 *, bint passive=False, rng=None):
        if not 1 <= local_discr < 2**32:
            raise ValueError("local discriminator must be a non-zero u32")
        if not 1 <= multiplier <= 255 or tx_us < 1 or rx_us < 0:
            raise ValueError("multiplier 1-255, tx_us >= 1, rx_us >= 0")
        self.local_discr = local_discr
        self.state = DOWN
        self.remote_state = DOWN
        self.remote_discr = 0
        self.local_diag = D_NONE
        self.detect_mult = multiplier
        self.config_tx_us = tx_us
        self.desired_min_tx_us = SLOW if tx_us < SLOW else tx_us
        self.required_min_rx_us = rx_us
        self.remote_min_rx_us = 1
        self.remote_desired_min_tx_us = 0
        self.remote_detect_mult = 0
        self.remote_demand = False
        self.passive = passive
        self._uniform = (rng if rng is not None else _random.Random()).uniform
        self._poll = False
        self._has_pending = False
        self._has_old_rx = False
        self._tx_interval_us = self.desired_min_tx_us
        self._next_tx = 0.0
        self._has_next_tx = True
        self._has_last_rx = False
        self.transitions = deque(maxlen=TRANSITIONS_KEPT)
        self.transition_count = 0
        self.discards = {}
        self.received = self.sent = 0

    # -- timers --------------------------------------------------------------------

    cpdef double detection_time(self):
        cdef long long rx = self._old_rx_us if self._has_old_rx else self.required_min_rx_us
        cdef long long m = rx if rx > self.remote_desired_min_tx_us else self.remote_desired_min_tx_us
        return self.remote_detect_mult * m / 1e6

    cpdef double tx_interval(self):
        cdef long long m = self._tx_interval_us if self._tx_interval_us > self.remote_min_rx_us else self.remote_min_rx_us
        return m / 1e6

    cdef double _jittered(self):
        hi = 0.9 if self.detect_mult == 1 else 1.0
        return self.tx_interval() * <double>self._uniform(0.75, hi)

    cdef bint _detect_at(self, double* at):
        if (self.state == INIT or self.state == UP) and self._has_last_rx and self.remote_detect_mult:
            at[0] = self._last_rx + self.detection_time()
            return True
        return False

    def next_deadline(self):
        """When ``tick`` must run next (None: nothing scheduled)."""
        cdef double b
        cdef bint hb = self._detect_at(&b)
        if not self._has_next_tx:
            return b if hb else None
        return self._next_tx if (not hb or self._next_tx < b) else b

    cdef bint _may_transmit(self):
        if self.remote_min_rx_us == 0:
            return False
        if self.passive and self.remote_discr == 0:
            return False
        return not (self.remote_demand and self.state == UP and self.remote_state == UP)

    # -- state changes ---------------------------------------------------------------

    cdef void _set_state(self, int new, int diag, double now):
        cdef int old = self.state
        if new == old:
            return
        self.state = new
        if new != UP:
            self.local_diag = diag
        if new == UP:
            if self.config_tx_us != self.desired_min_tx_us:
                self._start_poll(self.config_tx_us, self.required_min_rx_us)
        else:
            self._poll = False
            self._has_pending = False
            self._has_old_rx = False
            self.desired_min_tx_us = self.config_tx_us if self.config_tx_us > SLOW else SLOW
            self._tx_interval_us = self.desired_min_tx_us
        self.transitions.append((old, new, self.local_diag, now))
        self.transition_count += 1
        self._next_tx = now
        self._has_next_tx = True

    cdef void _start_poll(self, long long tx_us, long long rx_us):
        cdef bint increase_tx = tx_us > self.desired_min_tx_us
        if rx_us < self.required_min_rx_us and not self._has_old_rx:
            self._old_rx_us = self.required_min_rx_us
            self._has_old_rx = True
        self.desired_min_tx_us = tx_us
        self.required_min_rx_us = rx_us
        if not increase_tx:
            self._tx_interval_us = tx_us
        self._pend_tx, self._pend_rx = tx_us, rx_us
        self._has_pending = True
        self._poll = True

    def set_timers(self, long long tx_us, long long rx_us, double now):
        """Change the intervals (a Poll Sequence while Up, RFC 5880 6.8.3)."""
        if tx_us < 1 or rx_us < 0:
            raise ValueError("tx_us >= 1, rx_us >= 0")
        self.config_tx_us = tx_us
        if self.state == UP:
            self._start_poll(tx_us, rx_us)
            self._next_tx = now
            self._has_next_tx = True
        else:
            self.required_min_rx_us = rx_us
            self.desired_min_tx_us = tx_us if tx_us > SLOW else SLOW
            self._tx_interval_us = self.desired_min_tx_us

    def admin_down(self, double now):
        self._set_state(ADMIN_DOWN, D_ADMIN, now)

    def admin_up(self, double now):
        if self.state == ADMIN_DOWN:
            self._set_state(DOWN, D_NONE, now)

    # -- packets ---------------------------------------------------------------------

    cdef bytes _packet(self, bint final):
        cdef uint8_t b[24]
        cdef bint poll = self._poll and not final
        self.sent += 1
        b[0] = (1 << 5) | (self.local_diag & 0x1F)
        b[1] = ((self.state & 3) << 6) | (poll << 5) | (final << 4)
        b[2] = self.detect_mult
        b[3] = 24
        _wr32(b + 4, <uint32_t>self.local_discr)
        _wr32(b + 8, <uint32_t>self.remote_discr)
        _wr32(b + 12, <uint32_t>self.desired_min_tx_us)
        _wr32(b + 16, <uint32_t>self.required_min_rx_us)
        _wr32(b + 20, 0)
        return (<char*>b)[:24]

    cpdef list tick(self, double now):
        """Fire due timers; the datagrams to send now."""
        cdef list out = []
        cdef double at
        if self._detect_at(&at) and now >= at:
            self._set_state(DOWN, D_DETECT, now)
            self.remote_discr = 0
            self.remote_min_rx_us = 1
            self.remote_state = DOWN
        if self._has_next_tx and now >= self._next_tx:
            if self._may_transmit():
                out.append(self._packet(False))
            self._next_tx = now + self._jittered()
        return out

    cdef list _discard(self, str reason):
        self.discards[reason] = self.discards.get(reason, 0) + 1
        return []

    cpdef list receive(self, const uint8_t[:] data, double now):
        """Check (RFC 5880 6.8.6) and apply one received datagram; the
        datagrams to send at once. A datagram that fails a check is counted
        in ``discards`` by the reason ``patronus.failover.bfd`` names."""
        cdef Py_ssize_t n = data.shape[0]
        if n < 24:
            return self._discard("short")
        cdef const uint8_t* p = &data[0]
        cdef int version = p[0] >> 5, diag = p[0] & 0x1F, st = p[1] >> 6, mult = p[2], length = p[3]
        cdef bint a = (p[1] & 0x04) != 0
        cdef uint32_t my = _rd32(p + 4), your = _rd32(p + 8)
        cdef uint32_t tx = _rd32(p + 12), rx = _rd32(p + 16)
        cdef int atype, alen
        if version != 1:
            return self._discard("bad_version")
        if length < (26 if a else 24):
            return self._discard("bad_length")
        if length > n:
            return self._discard("truncated")
        if mult == 0:
            return self._discard("zero_multiplier")
        if p[1] & 0x01:
            return self._discard("multipoint")
        if my == 0:
            return self._discard("zero_my_discriminator")
        if a:
            atype, alen = p[24], p[25]
            if atype == 4 or atype == 5:
                if alen != 28 or length != 52:
                    return self._discard("auth_bad")
            elif alen < 2 or 24 + alen > length:
                return self._discard("auth_bad")
        # the session's checks (6.8.6), after the packet's
        if your == 0 and st != DOWN and st != ADMIN_DOWN:
            return self._discard("zero_your_discriminator")
        if your != 0 and your != self.local_discr:
            return self._discard("unknown_discriminator")
        if a:
            return self._discard("auth_unexpected")   # this session has no authentication
        self.received += 1
        self.remote_discr = my
        self.remote_state = st
        self.remote_demand = (p[1] & 0x02) != 0
        self.remote_min_rx_us = rx
        self.remote_desired_min_tx_us = tx
        self.remote_detect_mult = mult
        cdef bint poll = (p[1] & 0x20) != 0, final = (p[1] & 0x10) != 0
        if final and self._poll:
            self._poll = False
            if self._has_pending:
                self._tx_interval_us = self._pend_tx
            self._has_pending = False
            self._has_old_rx = False
        self._last_rx = now
        self._has_last_rx = True
        if self.state == ADMIN_DOWN:
            return self._discard("admin_down")
        cdef int before = self.state
        if st == ADMIN_DOWN:
            if self.state != DOWN:
                self._set_state(DOWN, D_NEIGHBOR, now)
        elif self.state == DOWN:
            if st == DOWN:
                self._set_state(INIT, D_NONE, now)
            elif st == INIT:
                self._set_state(UP, D_NONE, now)
        elif self.state == INIT:
            if st == INIT or st == UP:
                self._set_state(UP, D_NONE, now)
        elif st == DOWN:
            self._set_state(DOWN, D_NEIGHBOR, now)
        cdef list out = []
        if poll:
            out.append(self._packet(True))
        elif self.state != before and self._may_transmit():
            out.append(self._packet(False))
            self._next_tx = now + self._jittered()
            self._has_next_tx = True
        if self._has_next_tx and self._next_tx - now > self.tx_interval():
            self._next_tx = now + self._jittered()
        return out
