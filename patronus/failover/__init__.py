"""Failover: BFD sessions (RFC 5880/5881/5883) that detect a dead path in
a few tens of milliseconds, and the engine that moves policies off it.

``bfd`` is the sans-I/O protocol (codec + state machine), ``transport`` runs
sessions on asyncio sockets.
"""

from __future__ import annotations

from .bfd import Auth, ControlPacket, Diag, Session, State, Transition
from .engine import DEFAULT_CLASS, Engine, Event, FailoverCore
from .transport import BfdSession

__all__ = ["BfdSession", "Session", "State", "Diag", "Auth", "ControlPacket", "Transition", "Engine", "FailoverCore",
           "Event", "DEFAULT_CLASS"]
