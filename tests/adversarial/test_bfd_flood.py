"""Defect 3: ``Session.transitions`` grew without bound under a stream of
spoofed packets (Down then AdminDown from a made-up peer, over and over:
every packet is a state change). The record must keep a bounded tail."""

from __future__ import annotations

import random

from patronus.failover import bfd
from patronus.failover.bfd import ControlPacket, Session, State

FLOOD = 20_000


def test_transitions_stay_bounded_under_a_flood_of_spoofed_packets():
    s = Session(1, 50_000, 50_000, rng=random.Random(0))
    for i in range(FLOOD):
        # Your Discriminator 0 is allowed while Down/AdminDown: nothing to guess
        spoofed = ControlPacket(State.DOWN if i % 2 == 0 else State.ADMIN_DOWN, 99, 0)
        s.receive(spoofed, i * 1e-4)
    kept = getattr(bfd, "TRANSITIONS_KEPT", None)
    assert kept is not None and len(s.transitions) <= kept < FLOOD
    assert s.transition_count == FLOOD                     # the total is still counted
    assert s.transitions[-1].new == State.DOWN and s.transitions[-1].at == (FLOOD - 1) * 1e-4
    assert s.transitions[-2].new == State.INIT             # the newest ones are the ones kept
