"""Application profiles: the SLA targets and path-preference weights a policy uses.

Each built-in profile cites where its numbers come from (see docs/APPLICATIONS.md).
Round-trip time targets are twice the one-way figures the sources give, because
patronus probes measure round trips.

>>> from patronus.apps import BUILTIN_PROFILES
>>> BUILTIN_PROFILES["voip"].max_rtt_ms
300.0
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from . import _validate as v

__all__ = ["AppProfile", "BUILTIN_PROFILES"]


def _weight(field: str):
    return lambda value: v.number(field, value, 0.0, 1.0)


@attrs.frozen
class AppProfile:
    """SLA thresholds and the weights of each metric when paths are scored.

    A path that meets every threshold of the profile meets its SLA. Weights say
    how much each metric counts when paths are ranked (they need not sum to 1).

    >>> AppProfile("trading", max_rtt_ms=20, max_jitter_ms=5, max_loss_pct=0.1)
    AppProfile(name='trading', max_rtt_ms=20.0, max_jitter_ms=5.0, max_loss_pct=0.1, ...)
    """

    name: str = attrs.field(converter=lambda x: v.name("AppProfile.name", x))
    max_rtt_ms: float = attrs.field(converter=lambda x: v.number("AppProfile.max_rtt_ms", x, 0, lo_open=True))
    max_jitter_ms: float = attrs.field(converter=lambda x: v.number("AppProfile.max_jitter_ms", x, 0, lo_open=True))
    max_loss_pct: float = attrs.field(converter=lambda x: v.number("AppProfile.max_loss_pct", x, 0, 100))
    w_latency: float = attrs.field(default=0.4, converter=_weight("AppProfile.w_latency"))
    w_jitter: float = attrs.field(default=0.2, converter=_weight("AppProfile.w_jitter"))
    w_loss: float = attrs.field(default=0.4, converter=_weight("AppProfile.w_loss"))
    w_bandwidth: float = attrs.field(default=0.0, converter=_weight("AppProfile.w_bandwidth"))
    w_cost: float = attrs.field(default=0.0, converter=_weight("AppProfile.w_cost"))
    source: str = attrs.field(default="user defined", repr=False)

    def __repr__(self) -> str:  # short in notebooks: thresholds first, weights elided
        return (
            f"AppProfile(name={self.name!r}, max_rtt_ms={self.max_rtt_ms}, "
            f"max_jitter_ms={self.max_jitter_ms}, max_loss_pct={self.max_loss_pct}, ...)"
        )

    def violation(self, rtt_ms: float, jitter_ms: float, loss_pct: float, alive: bool = True) -> str | None:
        """The worst metric over its limit, as a reason (``'loss 2.1 % > 1 %'``),
        ``'no replies (dead)'``, or None when the SLA is met. NaN jitter or loss
        (not measured yet) count as zero.

        >>> BUILTIN_PROFILES["voip"].violation(40.0, 2.0, 2.1)
        'loss 2.1 % > 1 %'
        """
        if not alive or math.isnan(rtt_ms):
            return "no replies (dead)"
        jit = 0.0 if math.isnan(jitter_ms) else jitter_ms
        loss = 0.0 if math.isnan(loss_pct) else loss_pct
        over = [(rtt_ms / self.max_rtt_ms, f"rtt {rtt_ms:.1f} ms > {self.max_rtt_ms:g} ms"),
                (jit / self.max_jitter_ms, f"jitter {jit:.1f} ms > {self.max_jitter_ms:g} ms"),
                (loss / max(self.max_loss_pct, 1e-9), f"loss {loss:.1f} % > {self.max_loss_pct:g} %")]
        ratio, text = max(over, key=lambda o: o[0])
        return text if ratio > 1 else None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> AppProfile:
        fields = {f.name for f in attrs.fields(cls)}
        v.mapping("AppProfile", d, fields, {"name", "max_rtt_ms", "max_jitter_ms", "max_loss_pct"})
        return cls(**d)


BUILTIN_PROFILES: dict[str, AppProfile] = {
    p.name: p
    for p in (
        AppProfile(
            "voip", max_rtt_ms=300, max_jitter_ms=30, max_loss_pct=1.0,
            w_latency=0.3, w_jitter=0.3, w_loss=0.4,
            source="Cisco Enterprise QoS SRND: voice one-way latency <= 150 ms, jitter <= 30 ms, "
                   "loss <= 1 %; ITU-T G.114 one-way 150 ms",
        ),
        AppProfile(
            "video", max_rtt_ms=300, max_jitter_ms=30, max_loss_pct=1.0,
            w_latency=0.3, w_jitter=0.2, w_loss=0.4, w_bandwidth=0.1,
            source="Cisco Enterprise QoS SRND: interactive video one-way <= 150 ms, "
                   "jitter <= 30 ms, loss <= 1 %",
        ),
        AppProfile(
            "gaming", max_rtt_ms=200, max_jitter_ms=50, max_loss_pct=0.1,
            w_latency=0.5, w_jitter=0.3, w_loss=0.2,
            source="ITU-T Y.1541 QoS class 0 (real-time, jitter sensitive, highly interactive): "
                   "IPTD 100 ms, IPDV 50 ms, IPLR 1e-3",
        ),
        AppProfile(
            "bulk", max_rtt_ms=2000, max_jitter_ms=1000, max_loss_pct=5.0,
            w_latency=0.05, w_jitter=0.0, w_loss=0.35, w_bandwidth=0.5, w_cost=0.1,
            source="ITU-T Y.1541 class 4 (short transactions, bulk data): IPTD 1 s, IPLR 1e-3; "
                   "loss bound relaxed to 5 % because TCP recovers (patronus choice)",
        ),
        AppProfile(
            "voice", max_rtt_ms=50, max_jitter_ms=7, max_loss_pct=0.3,
            w_latency=0.3, w_jitter=0.3, w_loss=0.4,
            source="VMware VeloCloud SD-WAN quality score (VQS), voice 'good': one-way latency <= 25 ms, "
                   "loss <= 0.3 %, jitter <= 7 ms ('critical' beyond 65 ms / 1 % / 30 ms); Broadcom KB 312376",
        ),
        AppProfile(
            "realtime", max_rtt_ms=100, max_jitter_ms=20, max_loss_pct=1.0,
            w_latency=0.4, w_jitter=0.3, w_loss=0.3,
            source="Cisco SD-WAN application-aware routing, SLA class example SLA-REALTIME: latency 100 ms, "
                   "loss 1 %, jitter 20 ms (latency from BFD round trips, kept as is)",
        ),
        AppProfile(
            "transactional", max_rtt_ms=100, max_jitter_ms=200, max_loss_pct=1.0,
            w_latency=0.5, w_jitter=0.0, w_loss=0.4, w_bandwidth=0.1,
            source="VMware VeloCloud SD-WAN quality score (VQS), transactional 'good': one-way latency <= 50 ms, "
                   "loss <= 1 %, jitter <= 200 ms",
        ),
        AppProfile(
            "default", max_rtt_ms=800, max_jitter_ms=200, max_loss_pct=2.0,
            w_latency=0.4, w_jitter=0.1, w_loss=0.4, w_bandwidth=0.1,
            source="ITU-T Y.1541 class 2/3 (transaction data): IPTD 400 ms, IPLR 1e-3; "
                   "loss bound 2 % (patronus choice)",
        ),
    )
}
