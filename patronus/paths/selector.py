"""Path scoring and selection: every path scored for every application
profile at once (a compiled kernel, csrc/score.c; ``score_reference`` is the
same in numpy), one path chosen per (profile, group of paths), without
flapping.

Score of a path for a profile, in three bands so that the order between
bands never depends on weights:

* (1, 2]  meets every threshold of the profile: 1 + 1 / (1 + cost), where
  cost is the weighted mean of rtt / max_rtt, jitter / max_jitter and
  loss / max_loss, plus ``w_bandwidth`` x (1 - bw / (bw + 10 Mbit/s));
* (0, 1)  alive but violating: 1 / (1 + violation), the violation being the
  weighted sum of how far each metric is over its limit (relative), so the
  least bad path wins when none meets the SLA (best of worst);
* 0       dead (no reply among its last probes) or never measured.

Selection keeps the current path unless (a) there is none yet, (b) it is
dead or violates the SLA and the best one does not (moves at once), or (c)
the best scores ``margin`` more and the current one has been held for
``hold_down_s`` (an improvement, never a flap between near-equal paths).
Every change carries its reason.

>>> from patronus.paths import Selector, Metrics
>>> sel = Selector(["voip"], margin=0.05, hold_down_s=10)
>>> sel.set_paths(["hq.isp~br.isp", "hq.lte~br.isp"], groups=["hq~br", "hq~br"])
>>> good = Metrics(rtt_ms=20, jitter_ms=2, loss_pct=0, alive=True)
>>> lossy = Metrics(rtt_ms=15, jitter_ms=2, loss_pct=2.1, alive=True)
>>> [d.path for d in sel.update({"hq.isp~br.isp": lossy, "hq.lte~br.isp": good}, now=0)]
['hq.lte~br.isp']
>>> (d,) = sel.update({"hq.isp~br.isp": good, "hq.lte~br.isp": lossy}, now=1)
>>> d.reason
'hq.lte~br.isp: loss 2.1 % > 1 % for voip; moved to hq.isp~br.isp'
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..apps import BUILTIN_PROFILES, AppProfile
from ..errors import ConfigError
from .stats import Metrics

__all__ = ["Selector", "Decision"]

_BW_HALF = 10.0  # Mbit/s at which the bandwidth term is half way


@dataclass(frozen=True)
class Decision:
    """The path chosen for one application profile in one group of paths."""

    app: str
    group: str
    path: str | None
    previous: str | None
    score: float
    meets_sla: bool
    reason: str
    at: float


def _group_of(path: Any) -> str:
    ls, rs = getattr(path, "local_site", None), getattr(path, "remote_site", None)
    if ls is not None and rs is not None:
        return "~".join(sorted((ls, rs)))
    return "all"


class Selector:
    """Scores paths for application profiles and picks one per group.

    ``profiles``: AppProfile objects or names of built-in ones (default: all
    built-ins). ``margin``: score an alternative must gain to replace a path
    that still meets its SLA; ``hold_down_s``: minimum time between such
    improvement moves (a move forced by an SLA violation or a dead path is
    never held).
    """

    def __init__(self, profiles: Iterable[AppProfile | str] | Mapping[str, AppProfile] | None = None, *,
                 margin: float = 0.05, hold_down_s: float = 10.0) -> None:
        if profiles is None:
            profiles = BUILTIN_PROFILES.values()
        elif isinstance(profiles, Mapping):
            profiles = profiles.values()
        profs: list[AppProfile] = []
        for p in profiles:
            if isinstance(p, str):
                if p not in BUILTIN_PROFILES:
                    raise ConfigError("Selector.profiles", p, "is not a built-in profile")
                p = BUILTIN_PROFILES[p]
            if not isinstance(p, AppProfile):
                raise ConfigError("Selector.profiles", p, "is not an AppProfile")
            profs.append(p)
        if not profs or len({p.name for p in profs}) != len(profs):
            raise ConfigError("Selector.profiles", [p.name for p in profs], "must be non-empty and unique")
        if not 0 <= margin < 1:
            raise ConfigError("Selector.margin", margin, "is not in [0, 1)")
        if hold_down_s < 0:
            raise ConfigError("Selector.hold_down_s", hold_down_s, "is negative")
        self.profiles = profs
        self.margin = float(margin)
        self.hold_down_s = float(hold_down_s)
        col = lambda attr: np.array([getattr(p, attr) for p in profs], dtype=np.float64)  # noqa: E731
        lim = np.stack([col("max_rtt_ms"), col("max_jitter_ms"), np.maximum(col("max_loss_pct"), 1e-9)], axis=1)
        w = np.stack([col("w_latency"), col("w_jitter"), col("w_loss")], axis=1)
        wn = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)  # weights normalised per profile
        self._lim = lim.astype(np.float32)                         # [C, 3] limits
        self._wn = wn.astype(np.float32)
        self._inv_lim = (1 / lim).astype(np.float32)
        # cost = sum(wn * metric / limit) + w_bandwidth * bandwidth term, as one [C, 4] matrix
        self._wmat = np.concatenate([wn / lim, col("w_bandwidth")[:, None]], axis=1).astype(np.float32)
        self.set_paths([])

    # -- paths --------------------------------------------------------------

    def set_paths(self, paths: Sequence[Any], groups: Sequence[str] | None = None) -> None:
        """The paths to choose among (``patronus.Path`` objects or ids) and
        the group of each (default: the site pair of a Path). Resets choices."""
        ids = [getattr(p, "id", p) for p in paths]
        if len(set(ids)) != len(ids):
            raise ConfigError("Selector.set_paths", ids, "has duplicate path ids")
        grp = list(groups) if groups is not None else [_group_of(p) for p in paths]
        if len(grp) != len(ids):
            raise ConfigError("Selector.set_paths groups", len(grp), f"given for {len(ids)} paths")
        self.ids = ids
        self._index = {pid: i for i, pid in enumerate(ids)}
        names, gidx = np.unique(np.array(grp, dtype=object), return_inverse=True) if grp else ([], np.zeros(0, int))
        self.groups = [str(g) for g in names]
        self._gidx = np.asarray(gidx, dtype=np.int64)
        self._order = np.argsort(self._gidx, kind="stable")
        counts = np.bincount(self._gidx, minlength=len(self.groups)) if len(ids) else np.zeros(0, np.int64)
        self._gstart = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # CSR over self._order
        self._order = np.ascontiguousarray(self._order, dtype=np.int64)
        ng, nc = len(self.groups), len(self.profiles)
        self._cur = np.full((nc, ng), -1, dtype=np.int64)
        self._since = np.full((nc, ng), -np.inf)
        self._reasons: dict[tuple[int, int], str] = {}
        self._prev: dict[tuple[int, int], str | None] = {}
        self._metrics = _empty_arrays(len(ids))
        self._scores = np.zeros((nc, len(ids)), dtype=np.float32)

    # -- scoring --------------------------------------------------------------

    def score(self, rtt_ms: np.ndarray, jitter_ms: np.ndarray, loss_pct: np.ndarray, alive: np.ndarray,
              bandwidth_mbps: np.ndarray | None = None) -> np.ndarray:
        """Scores [profile, path] for metric arrays (NaN = unknown), float32,
        computed by the compiled kernel (csrc/score.c)."""
        return self._kernel(rtt_ms, jitter_ms, loss_pct, alive, bandwidth_mbps, groups=False)[0]

    def _kernel(self, rtt_ms: Any, jitter_ms: Any, loss_pct: Any, alive: Any, bandwidth_mbps: Any,
                groups: bool = True) -> tuple[np.ndarray, np.ndarray]:
        from .. import _fast

        f8 = np.float64
        n = len(rtt_ms)
        scores = np.empty((len(self.profiles), n), dtype=np.float32)
        if groups:
            gstart, members, ng = self._gstart, self._order, len(self.groups)
        else:
            gstart, members, ng = np.zeros(1, np.int64), np.arange(n, dtype=np.int64), 0
        best = np.empty((len(self.profiles), ng), dtype=np.int64)
        bw = None if bandwidth_mbps is None else np.ascontiguousarray(bandwidth_mbps, dtype=f8)
        _fast.score_select(np.ascontiguousarray(rtt_ms, dtype=f8), np.ascontiguousarray(jitter_ms, dtype=f8),
                           np.ascontiguousarray(loss_pct, dtype=f8),
                           np.ascontiguousarray(alive, dtype=bool).view(np.uint8), bw, self._wmat, self._lim,
                           self._wn, gstart, members, scores, best)
        return scores, best

    def score_reference(self, rtt_ms: np.ndarray, jitter_ms: np.ndarray, loss_pct: np.ndarray, alive: np.ndarray,
                        bandwidth_mbps: np.ndarray | None = None) -> np.ndarray:
        """The same scores in numpy, the specification of the compiled kernel.

        The weighted cost of every (profile, path) is one matrix product of
        the [profile, 4] weights (already divided by each limit) with the
        [4, path] metrics; the SLA test is three comparisons."""
        f = np.float32
        n = len(rtt_ms)
        x = np.empty((4, n), dtype=f)
        x[0] = rtt_ms
        ok = ~np.isnan(x[0])
        ok &= np.asarray(alive, dtype=bool)
        x[1] = jitter_ms
        x[2] = loss_pct
        np.fmax(x[:3], 0.0, out=x[:3])                           # NaN (unknown) -> 0; metrics are >= 0
        if bandwidth_mbps is None:
            x[3] = 0.0
        else:
            x[3] = bandwidth_mbps
            np.fmax(x[3], 0.0, out=x[3])
            x[3] += _BW_HALF
            np.divide(f(_BW_HALF), x[3], out=x[3])
        cost = self._wmat @ x                                    # [C, P]
        meets = x[0] <= self._lim[:, 0:1]
        meets &= x[1] <= self._lim[:, 1:2]
        meets &= x[2] <= self._lim[:, 2:3]
        out = np.add(cost, 1.0)
        np.reciprocal(out, out=out)
        out += 1.0                                               # (1, 2]: meets
        for c in range(out.shape[0]):                            # (0, 1): best of worst, for the few
            idx = np.flatnonzero(~meets[c])
            if not len(idx):
                continue
            over = np.ones(len(idx), dtype=f)
            for k in range(3):
                r = x[k, idx] * self._inv_lim[c, k] - 1
                np.maximum(r, 0.0, out=r)
                over += self._wn[c, k] * r
            over += f(1e-3) * cost[c, idx]
            out[c, idx] = f(0.999) / over
        out *= ok                                                # 0: dead or never measured
        return out

    @property
    def scores_(self) -> np.ndarray:
        """Scores of the last update, [profile, path] in ``set_paths`` order."""
        return self._scores

    # -- selection ------------------------------------------------------------

    def update_arrays(self, rtt_ms: np.ndarray, jitter_ms: np.ndarray, loss_pct: np.ndarray, alive: np.ndarray,
                      bandwidth_mbps: np.ndarray | None = None, now: float | None = None) -> np.ndarray:
        """Score and select from metric arrays (one entry per path, in
        ``set_paths`` order). Returns the [profile, group] mask of changed
        choices; read them with ``decision()``. For large meshes: no Python
        object per path."""
        now = time.monotonic() if now is None else now
        if not len(self.ids):
            return np.zeros((len(self.profiles), 0), dtype=bool)
        self._metrics = (np.asarray(rtt_ms, float), np.asarray(jitter_ms, float), np.asarray(loss_pct, float),
                         np.asarray(alive, bool))
        from .. import _fast

        sm, best = self._kernel(rtt_ms, jitter_ms, loss_pct, alive, bandwidth_mbps)
        self._scores = sm
        cur = self._cur
        change = np.empty(cur.shape, dtype=np.uint8)
        forced = np.empty(cur.shape, dtype=np.uint8)
        _fast.select_changes(sm, best, cur, self._since, self.margin, self.hold_down_s, now, change, forced)
        change = change.view(bool)
        if change.any():
            ci, gi = np.nonzero(change)
            for c, g in zip(ci.tolist(), gi.tolist()):
                old, new = int(cur[c, g]), int(best[c, g])
                sc = float(sm[c, old]) if old >= 0 else -1.0
                self._prev[(c, g)] = self.ids[old] if old >= 0 else None
                self._reasons[(c, g)] = self._why(c, old, new, sc, float(sm[c, new]), bool(forced[c, g]))
            self._cur = np.where(change, best, cur)
            self._since = np.where(change, now, self._since)
        return change

    def update(self, metrics: Mapping[str, Metrics], now: float | None = None) -> list[Decision]:
        """Score and select from per-path Metrics (paths missing from the
        mapping count as unknown); returns the decisions that changed."""
        n = len(self.ids)
        rtt, jit, loss = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        alive, bw = np.zeros(n, bool), np.full(n, np.nan)
        for pid, m in metrics.items():
            i = self._index.get(pid)
            if i is None:
                raise ConfigError("Selector.update", pid, "is not one of the paths (set_paths)")
            rtt[i], jit[i], loss[i], alive[i], bw[i] = m.rtt_ms, m.jitter_ms, m.loss_pct, m.alive, m.bandwidth_mbps
        now = time.monotonic() if now is None else now
        change = self.update_arrays(rtt, jit, loss, alive, bw, now)
        return [self._decision(int(c), int(g), now) for c, g in zip(*np.nonzero(change))]

    def decision(self, app: str, group: str) -> Decision:
        """The current choice for a profile name and a group name."""
        names = [p.name for p in self.profiles]
        if app not in names or group not in self.groups:
            raise ConfigError("Selector.decision", (app, group), "is not a known (profile, group)")
        return self._decision(names.index(app), self.groups.index(group), None)

    def decisions(self) -> list[Decision]:
        return [self._decision(c, g, None) for c in range(len(self.profiles)) for g in range(len(self.groups))]

    def _decision(self, c: int, g: int, now: float | None) -> Decision:
        i = int(self._cur[c, g])
        s = float(self._scores[c, i]) if i >= 0 else 0.0
        return Decision(self.profiles[c].name, self.groups[g], self.ids[i] if i >= 0 else None,
                        self._prev.get((c, g)), s, s > 1, self._reasons.get((c, g), "no path measured yet"),
                        float(self._since[c, g]) if now is None else now)

    # -- reasons --------------------------------------------------------------

    def _violation(self, c: int, i: int) -> str | None:
        """'loss 2.1 % > 1 % for voip' for the worst metric over its limit, or None."""
        p = self.profiles[c]
        rtt, jit, loss, alive = (m[i] for m in self._metrics)
        why = p.violation(float(rtt), float(jit), float(loss), bool(alive))
        if why is None or why.startswith("no replies"):
            return why
        return f"{why} for {p.name}"

    def _why(self, c: int, old: int, new: int, sc: float, sb: float, forced: bool) -> str:
        name = self.ids[new]
        if old < 0:
            v = self._violation(c, new)
            return f"first choice: {name} meets {self.profiles[c].name}" if v is None else \
                f"best of worst: {name} ({v})"
        if forced:
            v = self._violation(c, old) or "below the SLA"
            return f"{self.ids[old]}: {v}; moved to {name}"
        return (f"{name} scores {sb:.3f} vs {sc:.3f} for {self.ids[old]} (margin {self.margin:g}, "
                f"held {self.hold_down_s:g} s)")


def _empty_arrays(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool)
