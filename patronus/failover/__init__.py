"""Failover: BFD sessions (RFC 5880/5881/5883) that detect a dead path in
a few tens of milliseconds, and the engine that moves policies off it.

``bfd`` is the sans-I/O protocol (codec + state machine), ``transport`` runs
sessions on asyncio sockets. ``engine.FailoverCore`` is the sans-I/O failover
decision logic (inputs in, moves and events out), ``engine.Engine`` applies
it to a data plane and a store and runs it on asyncio.
"""

from __future__ import annotations

from .bfd import Auth, ControlPacket, Diag, Session, State, Transition
from .engine import DEFAULT_CLASS, Engine, Event, FailoverCore, Move, Outcome
from .transport import BfdSession

__all__ = ["BfdSession", "Session", "State", "Diag", "Auth", "ControlPacket", "Transition", "Engine", "FailoverCore",
           "Event", "Move", "Outcome", "DEFAULT_CLASS"]
