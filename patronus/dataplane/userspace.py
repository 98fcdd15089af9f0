"""The userspace data plane: parse, classify and account in the Cython extension."""

from __future__ import annotations

import mmap
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _fast, abi
from ..errors import ConfigError
from ..policy import PolicyTable, is_buffer
from ._routes import check_routes, remap_routes, resolve_moves
from .base import PATH_MARK, QOS_DSCP, QOS_RATE, STEER

if TYPE_CHECKING:
    from .nft import NftSteering

__all__ = ["Userspace"]




class Userspace:
    """Flow accounting and classification for frames given by Python, a
    contiguous buffer, or a pcap/pcapng file.

    ``flow_capacity`` bounds the flow table; when it is full the least
    recently used flow is evicted into the export buffer (``drain()``) and
    counted. ``idle_timeout_s`` exports flows silent for that long;
    ``active_timeout_s`` exports a running flow's counters every period (the
    flow stays, its counters restart). Timestamps come from the frames'
    capture times, or from ``ts_ns``.

    ``steer(ifname)`` (root, nftables) marks what arrives on an interface
    with its class's path, enforcing each policy's DSCP and rate limit; the
    marks follow every ``set_path``. ``max_policies``, ``max_sites`` and
    ``max_site_prefixes`` are accepted so that both backends take the same
    arguments: userspace tables have no compiled sizes.
    """

    capabilities = frozenset({STEER, QOS_DSCP, QOS_RATE})

    def __init__(self, table: PolicyTable, flow_capacity: int = 1 << 20, *,
                 idle_timeout_s: float | None = None, active_timeout_s: float | None = None,
                 max_policies: int | None = None, max_sites: int | None = None,
                 max_site_prefixes: int | None = None) -> None:
        if not isinstance(table, PolicyTable):
            raise ConfigError("Userspace.table", table, "is not a PolicyTable")
        if isinstance(flow_capacity, bool) or not isinstance(flow_capacity, int) or not 1 <= flow_capacity <= 1 << 30:
            raise ConfigError("Userspace.flow_capacity", flow_capacity, "is not an integer in [1, 2**30]")
        for name, v in (("idle_timeout_s", idle_timeout_s), ("active_timeout_s", active_timeout_s)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ConfigError(f"Userspace.{name}", v, "is not a positive number of seconds")
        check_routes("Userspace.table", len(table.policies), len(table.sites))
        self.table = table
        self.flow_capacity = flow_capacity
        self._steering: dict[str, NftSteering] = {}
        self._dp = _fast.Dataplane(
            table.classifier, table.site_index, len(table.policies), flow_capacity,
            int((idle_timeout_s or 0) * 1e9), int((active_timeout_s or 0) * 1e9), abi.FLOW_DTYPE,
        )
        self.last_capture: dict[str, Any] | None = None

    def __enter__(self) -> Userspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the steering rules of every interface (idempotent)."""
        while self._steering:
            self._steering.popitem()[1].close()

    def steer(self, ifname: str, mark_base: int = PATH_MARK) -> None:
        """Mark what arrives on ``ifname`` (in this network namespace) with
        ``mark_base`` + the path of its class and destination site, with
        nftables (``NftSteering``): the same decisions as the classifier
        here, made by the kernel on the live packets."""
        from .nft import NftSteering

        if ifname in self._steering:
            raise ConfigError("steer", ifname, "is steered already")
        nft = NftSteering(self.table, ifname, mark_base=mark_base)
        moves = self._moves()
        try:
            if moves:
                nft.set_paths(moves)
        except BaseException:
            nft.close()
            raise
        self._steering[ifname] = nft

    def _moves(self) -> list[tuple[int, int, int | None]]:
        """Every (class, site, path) that has a path, as set_paths takes them."""
        r = self._dp.routes()
        return [(int(k) - 1, int(c), int(r[k, c])) for k, c in zip(*np.nonzero(r != abi.NO_PATH))]

    # -- input ---------------------------------------------------------------

    def process(self, frames: Sequence[bytes] | tuple[Any, np.ndarray], ts_ns: Any = None, *,
                detail: bool = False) -> np.ndarray:
        """Account frames; returns each frame's policy id (-1: default or malformed).

        ``frames``: a list of bytes-like objects, or ``(buffer, offsets)``
        with frame i = ``buffer[offsets[i]:offsets[i+1]]``. ``ts_ns``: one
        timestamp per frame (ns), or None for "now" for the whole batch.
        A flow's policy and destination site are decided by its first packet
        and kept (flows are pinned; see docs/ARCHITECTURE.md).
        ``detail=True`` returns ``abi.DETAIL_DTYPE`` rows instead: policy,
        destination site and path slot of each frame.
        """
        if is_buffer(frames):
            buf, offsets = frames
            offsets = np.ascontiguousarray(offsets, np.int64)
            n = max(len(offsets) - 1, 0)
        else:
            if not isinstance(frames, list):
                frames = list(frames)
            n = len(frames)
        ts = self._timestamps(ts_ns, n)
        out = np.empty(n, dtype=np.int32)
        where = np.empty((n, 2), dtype=np.uint32) if detail else None
        w = None if where is None else where.reshape(-1)
        if isinstance(frames, list):
            self._dp.process_list(frames, ts, out, w)
        else:
            self._dp.process_buffer(np.frombuffer(buf, np.uint8), offsets, ts, out, w)
        if not detail:
            return out
        res = np.empty(n, dtype=abi.DETAIL_DTYPE)
        res["policy"], res["site"], res["path"] = out, where[:, 0], where[:, 1]
        return res

    @staticmethod
    def _timestamps(ts_ns: Any, n: int) -> np.ndarray:
        if ts_ns is None:
            return np.full(n, time.time_ns(), dtype=np.uint64)
        ts = np.ascontiguousarray(ts_ns, dtype=np.uint64)
        if ts.shape != (n,):
            raise ConfigError("ts_ns", f"{ts.shape[0] if ts.ndim else 'scalar'} timestamps", f"given for {n} frames")
        return ts

    def process_pcap(self, path: str | os.PathLike[str], *, threads: int | None = None) -> np.ndarray:
        """Account every packet of a pcap or pcapng file (read in C, from an mmap).

        Capture timestamps drive the timeouts. A file cut short keeps every
        packet before the cut and reports it in ``last_capture`` (and a warning).
        ``threads``: 2 reads the records on a second thread while this one
        accounts them (same result as 1, about 1.3x faster on a big file);
        None (default): 2 for files from 4 MiB up. Returns each packet's
        policy id (-1: default class or not accounted).
        """
        if threads is not None and threads not in (1, 2):
            raise ConfigError("process_pcap threads", threads, "is not 1, 2 or None")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ConfigError("process_pcap", os.fspath(path), "is an empty file, not a capture")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                ids, info = self._dp.process_capture(mm, threads)
        self.last_capture = info
        if info["error"]:
            if info["format"] is None:  # the file header itself is not a capture
                raise ConfigError("process_pcap", os.fspath(path), f"is not a readable capture: {info['error']}")
            warnings.warn(f"{os.fspath(path)}: {info['error']} after {info['packets']} packets; "
                          "those packets were processed", RuntimeWarning, stacklevel=2)
        return ids

    # -- steering ------------------------------------------------------------

    def set_path(self, policy: str | int | None, path_id: int | None, site: str | int | None = None) -> None:
        """Point a class (a policy by name or id; None or -1: the default
        class) at a path slot for one destination site (name or number; 0:
        outside every site), or for every destination when ``site`` is None.
        ``path_id`` None: no path (the local routing table decides).

        One array write per site: flows keep their records; their next
        packet carries the new path.
        """
        self.set_paths([(policy, site, path_id)])

    def set_paths(self, moves: Iterable[tuple[str | int | None, str | int | None, int | None]]) -> None:
        """Several (class, site, path) moves at once (``set_path`` for each;
        all are checked before any is applied)."""
        moves = list(moves)
        resolved = resolve_moves(self.table, moves)
        for nft in self._steering.values():  # the kernel's marks first: it may refuse
            nft.set_paths(moves)
        for cls, cols, slot in resolved:
            for c in cols:
                self._dp.set_path(cls, c, slot)

    def path_of(self, policy: str | int | None, site: str | int = 0) -> int | None:
        """The path slot of (class, destination site); None: no path."""
        cls, cols, _ = resolve_moves(self.table, [(policy, site, None)])[0]
        p = self._dp.path_of(cls, cols[0])
        return None if p == abi.NO_PATH else p

    def routes(self) -> np.ndarray:
        """Path slot per (class, site): a (policies + 1, sites + 1) uint32
        array, row 0 the default class, column 0 outside every site."""
        return self._dp.routes()

    def set_table(self, table: PolicyTable) -> None:
        """Swap the rule table atomically. Flow records stay; each flow is
        re-classified on its next packet (its destination site too). The
        policy list must keep its length (counters are per policy index);
        routes follow site names: a site kept keeps its paths, a new site
        starts with none."""
        if not isinstance(table, PolicyTable):
            raise ConfigError("set_table", table, "is not a PolicyTable")
        if len(table.policies) != len(self.table.policies):
            raise ConfigError("set_table", len(table.policies),
                              f"policies given; this data plane counts {len(self.table.policies)}")
        routes = None
        check_routes("set_table", len(table.policies), len(table.sites))
        if table.sites != self.table.sites:
            routes = remap_routes(self._dp.routes(), self.table.sites, table.sites)
        self._dp.set_classifier(table.classifier, table.site_index, len(table.policies), routes)
        self.table = table
        for ifname, old in list(self._steering.items()):  # rules and sets follow the new table
            mark_base = old.mark_base
            old.close()
            del self._steering[ifname]
            self.steer(ifname, mark_base)

    # -- output --------------------------------------------------------------

    def flows(self) -> np.ndarray:
        """Live flows (``abi.FLOW_DTYPE``), most recently used first."""
        return self._dp.flows()

    def drain(self, flush: bool = False, *, idle_timeout_s: float | None = None,
              now_ns: int | None = None) -> np.ndarray:
        """Return and clear the export buffer: flows evicted or expired since
        the last drain. ``flush=True`` first exports every live flow too;
        ``idle_timeout_s`` those idle that long at ``now_ns`` (default: now,
        wall clock, the time base of the flows)."""
        if idle_timeout_s is not None and not flush:
            if isinstance(idle_timeout_s, bool) or not isinstance(idle_timeout_s, (int, float)) or idle_timeout_s < 0:
                raise ConfigError("drain.idle_timeout_s", idle_timeout_s, "is not a number of seconds >= 0")
            self._dp.expire_idle(time.time_ns() if now_ns is None else int(now_ns), int(idle_timeout_s * 1e9))
        return self._dp.drain(flush)

    def counters(self) -> dict[str, Any]:
        """Per-policy packets/bytes, malformed frames by reason, flow table
        occupancy, evictions, expiries and cache hits."""
        raw = self._dp.raw_counters()
        pol = raw.pop("policy")
        raw["default"] = {"packets": pol[0][0], "bytes": pol[0][1]}
        raw["policies"] = {p.name: {"packets": pk, "bytes": by} for p, (pk, by) in zip(self.table.policies, pol[1:])}
        raw["malformed"] = dict(zip(abi.MALFORMED_REASONS, raw["malformed"]))
        # what the rate limits dropped: enforced by nftables while steering, so counted there
        drops: dict[str, dict[str, int]] = {p.name: {"packets": 0, "bytes": 0}
                                            for p in self.table.policies if p.qos.rate_kbps}
        for nft in self._steering.values():
            for name, d in nft.qos_drops().items():
                if name in drops:
                    drops[name] = {k: drops[name][k] + d[k] for k in d}
        raw["qos_dropped"] = drops
        return raw

    def __repr__(self) -> str:
        c = self._dp.raw_counters()
        return f"Userspace({len(self.table.policies)} policies, {c['flows']}/{c['capacity']} flows)"
