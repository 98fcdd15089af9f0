"""Path quality: probes, metrics, SLA scoring and selection.

``Monitor`` probes paths (UDP against a ``Responder``, or ICMP echo) and
keeps per-path metrics; ``Selector`` scores every path for every application
profile at once and picks one per site pair without flapping. The probe
codec, the statistics and the path MTU search are sans-I/O (``codec``,
``stats``, ``mtu``): tests and other event loops drive them with their own
bytes and clocks.
"""

from __future__ import annotations

from .codec import Probe, Reflector, decode, encode
from .monitor import DEFAULT_PORT, Monitor, Responder
from .mtu import MtuSearch
from .selector import Decision, Selector
from .stats import Metrics, PathStats, mos

__all__ = ["Monitor", "Responder", "Selector", "Decision", "Metrics", "PathStats", "Probe", "Reflector",
           "MtuSearch", "encode", "decode", "mos", "DEFAULT_PORT"]
