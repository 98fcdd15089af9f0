"""The lab: what lets patronus run for real on one machine.

``Impairment`` is a UDP relay that makes a link bad on demand (delay,
jitter, loss, duplication, reordering, rate); this kernel has no netem.
"""

from __future__ import annotations

from .impairment import Impairment, ImpairmentConfig

__all__ = ["Impairment", "ImpairmentConfig"]
