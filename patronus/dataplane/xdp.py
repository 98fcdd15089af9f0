"""The XDP data plane: bpf/patronus_xdp.c compiled by BCC, maps read into numpy.

Import this module only through ``patronus.dataplane.Xdp`` or
``patronus.dataplane.open``: it needs root, Debian's BCC binding and kernel
headers, and says which one is missing (``DataplaneUnavailable``). The
table layout it loads is computed in ``_layout`` (pure, testable without
root), the system calls are in ``_bpf``, tc steering in ``_tc``.

Example (needs root, BCC and kernel headers; tests/test_xdp.py runs the same):

>>> from patronus import Policy, Match, PolicyTable, packets   # doctest: +SKIP
>>> with Xdp(PolicyTable([Policy("dns", Match(dst_ports=53), priority=1)])) as xdp:  # doctest: +SKIP
...     xdp.test_run([packets.udp("10.0.0.1", "10.0.0.2", 1, 53)]).tolist()
[0]
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import socket
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .. import _fast, abi
from .._sources import source_dirs
from ..errors import ConfigError, DataplaneUnavailable
from ..policy import PolicyTable, is_buffer
from ._bpf import Libbpf, captured_stderr, possible_cpus, preflight
from ._clock import calibrate
from ._layout import (EVICT_PAGES, FIELDS, V4_DIRS, V4_L1, Capacity, lpm6_key, lpm_entries, pow2, room,
                      site_entries, table_layout)
from ._routes import check_routes, remap_routes, resolve_moves
from ._tc import TcSteering
from .base import DUPLICATE, QOS_DSCP, QOS_RATE, REDIRECT, STEER
from .base import PATH_MARK

__all__ = ["Xdp"]

XDP_FLAGS = {"native": 1 << 2, "generic": 1 << 1, "offload": 1 << 3}
XDP_PASS, XDP_DROP = 2, 1
CFG_META = abi.CONSTANTS["CFG_META"]
TX_SLOTS = abi.CONSTANTS["TX_SLOTS"]
PORTS = abi.CONSTANTS["PORTS"]
TAKE_COPY, TAKE_ALL, TAKE_IDLE = (abi.CONSTANTS[k] for k in ("TAKE_COPY", "TAKE_ALL", "TAKE_IDLE"))
OUT_BYTES = 65536 + 256  # test-run output: the largest frame and room for metadata in front
RATE_BURST_S = 0.05      # a policer's burst: 50 ms of its rate (at least RATE_BURST_MIN bytes)
RATE_BURST_MIN = 3028    # two full Ethernet frames: a rate far below the MTU still passes whole packets


class Xdp:
    """Classification and flow accounting in an XDP program.

    ``flow_capacity`` sizes the flow table: twice as many slots, rounded up
    to a power of two, in buckets of four (114 bytes a slot: 1,048,576 flows
    take 228 MiB). A flow lives in one of 32 slots from its hash; when all
    32 are taken the one idle longest is evicted, counted and exported by
    ``drain()`` (at the full nominal capacity, about 1 flow in 100,000);
    ``idle_timeout_s``: what ``drain()`` takes out besides evictions when
    not told otherwise (the kernel program never expires flows by itself).
    ``max_policies``, ``max_sites`` and ``max_site_prefixes`` leave room
    for bigger tables than ``table`` in later ``set_table`` calls
    (``max_policies`` counts compiled rules: a policy with several port
    ranges or protocols takes one rule per combination, ``table.rules``) (the program's sizes are fixed when it is compiled). Use as a
    context manager, or call ``close()``: attached interfaces are detached on
    close and at interpreter exit.
    """

    capabilities = frozenset({STEER, QOS_DSCP, QOS_RATE, REDIRECT, DUPLICATE})

    def __init__(self, table: PolicyTable, flow_capacity: int = 1 << 20, *, max_policies: int | None = None,
                 max_sites: int | None = None, max_site_prefixes: int | None = None,
                 idle_timeout_s: float | None = None, _bench_new_flows: bool = False) -> None:
        if not isinstance(table, PolicyTable):
            raise ConfigError("Xdp.table", table, "is not a PolicyTable")
        if isinstance(flow_capacity, bool) or not isinstance(flow_capacity, int) or not 1 <= flow_capacity <= 1 << 26:
            raise ConfigError("Xdp.flow_capacity", flow_capacity, "is not an integer in [1, 2**26]")
        if idle_timeout_s is not None and (isinstance(idle_timeout_s, bool) or
                                           not isinstance(idle_timeout_s, (int, float)) or not idle_timeout_s > 0):
            raise ConfigError("Xdp.idle_timeout_s", idle_timeout_s, "is not a positive number of seconds")
        self.idle_timeout_s = idle_timeout_s
        bcc = preflight()
        self._lib = Libbpf()
        bpf_dir, csrc = source_dirs()
        self.table = table
        self.flow_capacity = flow_capacity
        self._npol = len(table.policies) + 1
        self._scols = max(max_sites or 0, len(table.sites)) + 1
        check_routes("Xdp.table", self._npol - 1, self._scols - 1)
        self._site_lpm = 2 * max(max_site_prefixes or 0, 2 * len(table.site_prefixes), 256)
        export = table.classifier.export()
        layout = table_layout(table, export, room(export, max_policies)[1])
        self._cap = Capacity(export, max_policies, len(layout[2]), len(layout[0].chunks),
                              site_prefixes=max(max_site_prefixes or 0, max_sites or 0, len(table.site_prefixes)))
        self._attached: dict[str, int] = {}
        self._steering: dict[str, TcSteering] = {}
        self._tc_compiled: dict[int, tuple[Any, Any]] = {}   # mark_base -> prepare_steering's program
        self._bpf = None
        self._closed = False
        text = (bpf_dir / "patronus_xdp.c").read_text()
        self._slots = pow2(2 * flow_capacity, 64)
        cflags = [f"-I{csrc}", *self._cap.cflags(self._npol, self._slots),
                  f"-DPN_SCOLS={self._scols}", f"-DPN_SITE_LPM={self._site_lpm}"]
        if _bench_new_flows:  # benchmarks only: every run of a frame is a new flow
            cflags.append("-DPN_BENCH_NEW_FLOWS")
        with captured_stderr() as log:
            try:
                self._bpf = bcc.BPF(text=text.encode(), cflags=cflags)
                self._fn = self._bpf.load_func(b"pn_xdp", bcc.BPF.XDP)
                # the miss path's tail calls (bpf/patronus_xdp.c, pn_progs)
                progs = self._bpf[b"pn_progs"]
                for i, name in enumerate((b"pn_cls", b"pn_fin")):
                    progs[ctypes.c_int(i)] = ctypes.c_int(self._bpf.load_func(name, bcc.BPF.XDP).fd)
                self._floor = self._bpf.load_func(b"pn_floor", bcc.BPF.XDP)
                clock = self._bpf.load_func(b"pn_clock", bcc.BPF.XDP)
            except Exception as e:
                tail = "\n".join(log.read().strip().splitlines()[-15:])
                raise DataplaneUnavailable(f"the XDP program did not load: {e}\n{tail}",
                                           "see the verifier log above; smaller max_policies may help") from None
        self._maps = {name: self._bpf[name.encode()] for name in (
            "pn_cfg_map", "pn_v4l1_map", "pn_v4chunk_map", "pn_lpm6_map", "pn_lut_map", "pn_port_map", "pn_rpol_map", "pn_rows_map", "pn_chunks_map",
            "pn_route_map", "pn_pcount_map", "pn_malformed_map", "pn_stats_map", "pn_ftab_map",
            "pn_tx_map", "pn_rate_map", "pn_qdrop_map")}
        # the flow table, mapped: flows() and drain() scan it in place
        size = self._slots // abi.BUCKET_DTYPE["s"].shape[0] * abi.BUCKET_DTYPE.itemsize
        self._mm = mmap.mmap(self._fd("pn_ftab_map"), (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE,
                             mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._table_mem = np.frombuffer(self._mm, dtype=np.uint8, count=size)
        self._evicted: list[bytes] = []
        self._bpf[b"pn_evict_rb"].open_ring_buffer(self._on_evict)
        self._ncpu = len(possible_cpus())
        self._set = 0
        self._generation = 1
        self._clock = 0
        self._tick_ns, self._clock_base = self._calibrate(clock.fd)
        # (packets, bytes) by policy + 1 of the flows drains took out of the
        # table; with pn_pcount_map and the live flows, the policy counters
        self._gone = np.zeros((self._npol, 2), dtype=np.uint64)
        self._replayed = False  # flows stamped by test_run's ts_ns, not the kernel clock
        self.last_verdicts = np.zeros(0, dtype=np.int32)  # of the last test_run, one per frame
        self._dups: dict[tuple[int, int], int] = {}   # (class + 1, site column) -> ifindex of the copy's tunnel
        self._meta = False  # write pn_meta (path, policy) before each frame: steering and test runs
        self._lpm_keys: list[list[bytes]] = [[], []]
        self._site_keys: list[list[bytes]] = [[], []]
        self._load_table(table, 0, layout)
        self._write_cfg()
        self._init_paths(table)
        self._write_rates()
        self._mono_to_real = time.time_ns() - time.monotonic_ns()
        _live.add(self)

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Xdp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach from every interface and free the program and maps."""
        if self._closed:
            return
        self._closed = True
        for dev in list(self._steering):
            self._disable_steering(dev)
        for prog, _ in self._tc_compiled.values():
            prog.cleanup()
        self._tc_compiled.clear()
        for dev, flags in list(self._attached.items()):
            self._detach(dev, flags)
        if getattr(self, "_mm", None) is not None:
            self._table_mem = None
            self._mm.close()
        if self._bpf is not None:
            self._bpf.cleanup()
        _live.discard(self)

    def attach(self, ifname: str, mode: str = "native") -> None:
        """Attach to an interface of the current network namespace. A flow
        table holding replayed flows (``test_run(ts_ns=...)``) must be
        flushed first: their times are the capture's, live flows' the
        kernel's, and the two do not mix in one table."""
        if mode not in XDP_FLAGS:
            raise ConfigError("mode", mode, f"is not one of {', '.join(XDP_FLAGS)}")
        if self._replayed:
            if _fast.xdp_count(self._table_mem):
                raise ConfigError("attach", ifname, "the flow table holds replayed flows (test_run with ts_ns); "
                                  "drain(flush=True) first")
            self._replayed = False
        try:
            socket.if_nametoindex(ifname)
        except OSError:
            raise DataplaneUnavailable(f"interface {ifname!r} does not exist in this network namespace",
                                       "create it, or attach from the namespace that holds it") from None
        with captured_stderr() as log:
            try:
                self._bpf.attach_xdp(ifname.encode(), self._fn, XDP_FLAGS[mode])
            except Exception as e:
                raise DataplaneUnavailable(f"attaching to {ifname!r} in {mode} mode failed: {e} "
                                           f"{log.read().strip()}", "try mode='generic'") from None
        self._attached[ifname] = XDP_FLAGS[mode]

    def steer(self, ifname: str, mark_base: int = PATH_MARK) -> None:
        """Steer what arrives on ``ifname``: attach the program (native mode)
        unless it is attached already, then ``enable_steering``."""
        if ifname not in self._attached:
            self.attach(ifname, mode="native")
        self.enable_steering(ifname, mark_base)

    def prepare_steering(self, mark_base: int = PATH_MARK) -> None:
        """Compile and load the tc steering program now, so that :meth:`steer`
        only attaches (the compile takes about a second: a caller with an
        event loop does this in a thread, then steers on the loop)."""
        if mark_base not in self._tc_compiled:
            self._tc_compiled[mark_base] = TcSteering.compile(mark_base, self._npol)

    def enable_steering(self, ifname: str, mark_base: int = PATH_MARK) -> None:
        """Steer packets into paths: a tc program at clsact ingress of
        ``ifname`` (bpf/patronus_tc.c) copies the path slot this program
        wrote into the packet metadata into ``skb->mark = mark_base + path``,
        for ``ip rule fwmark`` to pick the path's routing table. Attach the
        XDP program to the same interface first. Undone by ``close()``."""
        if ifname not in self._attached:
            raise ConfigError("enable_steering", ifname, "has no XDP program of this Xdp attached")
        if not 0 <= mark_base <= 0xFFFF0000:
            raise ConfigError("mark_base", mark_base, "leaves no room for path slots in a 32-bit mark")
        self._steering[ifname] = TcSteering(self._lib, ifname, mark_base, self._npol,
                                            self._tc_compiled.pop(mark_base, None))
        self._write_dscp()
        self._steering[ifname].write_dups(self._dups)
        if not self._meta:
            self.steering = True

    def _write_dscp(self) -> None:
        """Each policy's QoS DSCP into every steering program (0: leave as is)."""
        vals = np.zeros(self._npol, dtype=np.uint8)
        for i, p in enumerate(self.table.policies):
            if p.qos.dscp is not None:
                vals[i + 1] = p.qos.dscp + 1
        for tc in self._steering.values():
            tc.write_dscp(vals)

    def _write_rates(self) -> None:
        """Each policy's QoS rate into its policer (bpf/patronus_xdp.c,
        ``pn_police``): ps_per_byte 0 for no limit. Rewriting restarts every
        bucket full."""
        vals = np.zeros(self._npol, dtype=abi.RATE_DTYPE)
        for i, p in enumerate(self.table.policies):
            if p.qos.rate_kbps:
                ps_per_byte = 8_000_000_000 // p.qos.rate_kbps      # 8 bits a byte at rate_kbps * 1000 bit/s
                vals[i + 1]["ps_per_byte"] = ps_per_byte
                vals[i + 1]["burst_ns"] = max(int(RATE_BURST_S * 1e9), RATE_BURST_MIN * ps_per_byte // 1000)
        self._update_batch("pn_rate_map", np.arange(self._npol, dtype=np.uint32), vals)

    def qos_drops(self) -> dict[str, dict[str, int]]:
        """Packets and bytes each rate-limited policy's policer dropped.

        >>> x.qos_drops()["bulk"]  # doctest: +SKIP
        {'packets': 812, 'bytes': 1218000}
        """
        d = self._percpu_sum("pn_qdrop_map", self._npol, 2)
        return {p.name: {"packets": int(d[i + 1, 0]), "bytes": int(d[i + 1, 1])}
                for i, p in enumerate(self.table.policies) if p.qos.rate_kbps}

    def _disable_steering(self, ifname: str) -> None:
        self._steering.pop(ifname).close()

    def detach(self, ifname: str) -> None:
        if ifname not in self._attached:
            raise ConfigError("detach", ifname, "is not attached")
        self._detach(ifname, self._attached.pop(ifname))

    def _detach(self, ifname: str, flags: int) -> None:
        try:
            self._bpf.remove_xdp(ifname.encode(), flags)
        except Exception:  # the interface may be gone already (namespace deleted)
            pass
        self._attached.pop(ifname, None)

    # -- tables and paths ----------------------------------------------------

    def _load_table(self, table: PolicyTable, s: int,
                    layout: tuple[BitmapChunks, np.ndarray, np.ndarray] | None = None) -> None:
        cap = self._cap
        export, rules = table.classifier.export(), table.rules
        why = cap.fits(export, 0)  # rules and rows first: the layout needs the width to hold them
        if not why:
            bitmaps, l1, chunks = layout or table_layout(table, export, cap.nsum)
            why = cap.fits(export, len(chunks), len(bitmaps.chunks))
        if why:
            raise ConfigError("Xdp.set_table", why, "create a new Xdp with a larger max_policies (it counts compiled "
                              "rules: len(table.rules)), or max_site_prefixes for more site subnets")
        row_base = bitmaps.base
        nrows = len(bitmaps.sums)
        self._update_batch("pn_rows_map", np.arange(s * cap.rows, s * cap.rows + nrows, dtype=np.uint32),
                           bitmaps.row_values())
        self._update_batch("pn_chunks_map", np.arange(s * cap.chunks, s * cap.chunks + len(bitmaps.chunks),
                                                      dtype=np.uint32), bitmaps.chunks)
        # IPv4 prefixes and destination sites: the 16-8-8 stride tables of this set
        self._update_batch("pn_v4l1_map", np.arange(s * V4_DIRS * V4_L1, (s + 1) * V4_DIRS * V4_L1, dtype=np.uint32),
                           l1.ravel())
        self._update_batch("pn_v4chunk_map", np.arange(s * cap.v4_chunks, s * cap.v4_chunks + len(chunks),
                                                       dtype=np.uint32), chunks)
        # IPv6 prefixes: an LPM trie shared by both sets (the tag tells them apart)
        self._lpm_keys[s] = self._lpm_replace(self._maps["pn_lpm6_map"], self._lpm_keys[s], [
            (s * 2 + (k % 2), plen, value, int(row) + row_base[FIELDS[k]])
            for k in (2, 3) for (plen, value), row in lpm_entries(rules, export, k).items()])
        ports = np.concatenate([export["sport"]["row_of"] + row_base["sport"],
                                export["dport"]["row_of"] + row_base["dport"]]).astype(np.uint32)
        self._update_batch("pn_port_map", np.arange(s * 2 * PORTS, (s + 1) * 2 * PORTS, dtype=np.uint32), ports)
        lut = np.zeros(1, dtype=abi.LUT_DTYPE)
        lut["proto"] = export["proto"]["row_of"] + row_base["proto"]
        lut["dscp"] = export["dscp"]["row_of"] + row_base["dscp"]
        lut["noport"] = (export["noport_row"][0] + row_base["sport"], export["noport_row"][1] + row_base["dport"])
        self._set_value("pn_lut_map", s, lut)
        rp = np.full(cap.rules, -1, dtype=np.int32)  # power-of-two slots
        rp[: export["nrules"]] = export["rule_policy"]
        self._set_value("pn_rpol_map", s, rp)
        self._load_sites(table, s)

    def _write_cfg(self) -> None:
        cfg = np.zeros(1, dtype=abi.CFG_DTYPE)
        cfg["set"], cfg["generation"] = self._set, self._generation
        # now = jiffies * tick_ns + clock_base; replaying, the replayed time
        cfg["clock_base"] = self._clock if self._clock else self._clock_base
        cfg["tick_ns"] = 0 if self._clock else self._tick_ns
        cfg["flags"] = CFG_META if self._meta else 0
        self._set_value("pn_cfg_map", 0, cfg)

    def _calibrate(self, fd: int) -> tuple[int, int]:
        """The kernel tick and the CLOCK_MONOTONIC time of jiffy 0 (``_clock.calibrate``)."""
        m = self._bpf[b"pn_clock_map"]
        obuf = ctypes.create_string_buffer(256)

        def read() -> tuple[int, int]:
            for _ in range(100):
                self._lib.test_run(fd, bytes(64), 1, obuf)
                j0, t, j1 = (m[m.Key(i)].value for i in range(3))
                if j0 == j1:  # no tick between the two reads
                    return j0, t
            raise DataplaneUnavailable("the kernel clock did not hold still for a microsecond",
                                       "retry on a less loaded machine")

        return calibrate(read)

    @staticmethod
    def _lpm_replace(m: Any, old: list[bytes], entries: list[tuple[int, int, int, int]]) -> list[bytes]:
        """Replace one set's entries of an IPv6 LPM trie (struct pn_lpm6
        keys): delete the ``old`` keys, insert (tag, prefix length, prefix
        value, value) ``entries``; returns the keys now held."""
        for key in old:
            try:
                del m[m.Key.from_buffer_copy(key)]
            except KeyError:
                pass
        keys = []
        for tag, plen, value, leaf in entries:
            raw = lpm6_key(tag, plen, value)
            m[m.Key.from_buffer_copy(raw)] = m.Leaf(leaf)
            keys.append(raw)
        return keys

    def _load_sites(self, table: PolicyTable, s: int) -> None:
        """The IPv6 destination-site LPM entries of table set ``s`` (tag = s * 2
        + 1; IPv4 sites are in the stride table)."""
        if self._scols == 1:
            return
        v6 = table.site_prefixes[table.site_prefixes["family"] == 6]
        if len(v6) * 2 > self._site_lpm:
            raise ConfigError("Xdp.set_table", f"{len(table.site_prefixes)} site subnets",
                              f"exceed the {self._site_lpm // 2} compiled in: create a new Xdp with a larger "
                              "max_site_prefixes")
        self._site_keys[s] = self._lpm_replace(self._bpf[b"pn_site_map"], self._site_keys[s], [
            (s * 2 + 1, plen, value, site) for (plen, value), site in site_entries(v6, 6).items()])

    def _init_paths(self, table: PolicyTable) -> None:
        # pn_route_map mirrored here: (class, site) -> (path slot, XDP action)
        self._routes = np.zeros((self._npol, self._scols), dtype=abi.ROUTE_DTYPE)
        self._routes["path"] = abi.NO_PATH
        self._write_actions(table, self._set)

    def _write_actions(self, table: PolicyTable, s: int) -> None:
        """Every route with ``table``'s verdicts into map set ``s``."""
        acts = [XDP_PASS] + [XDP_DROP if p.action == "drop" else XDP_PASS for p in table.policies]
        self._routes["action"] = np.asarray(acts, dtype=np.uint32)[:, None]
        base = s * self._routes.size
        self._update_batch("pn_route_map", np.arange(base, base + self._routes.size, dtype=np.uint32),
                           self._routes.ravel())

    def set_table(self, table: PolicyTable) -> None:
        """Swap the rule table atomically: fill the idle map set, then flip
        the live set and bump the generation in one map write. The program
        stays attached and flows keep their counters; each flow is
        re-classified on its next packet."""
        if not isinstance(table, PolicyTable):
            raise ConfigError("set_table", table, "is not a PolicyTable")
        if len(table.policies) + 1 != self._npol:
            raise ConfigError("set_table", len(table.policies),
                              f"policies given; this program counts {self._npol - 1}")
        if len(table.sites) >= self._scols:
            raise ConfigError("set_table", f"{len(table.sites)} sites",
                              f"exceed the {self._scols - 1} compiled in: create a new Xdp with a larger max_sites")
        idle = 1 - self._set
        self._load_table(table, idle)
        if table.sites != self.table.sites:  # routes follow site names
            self._routes = remap_routes(self._routes, self.table.sites, table.sites, self._scols)
        self._write_actions(table, idle)
        self._set = idle
        self._generation += 1
        self._write_cfg()
        old, self.table = self.table, table
        self._write_dscp()
        self._write_rates()
        if self._dups:   # copies follow policy and site names; those of a policy or site gone stop
            named = [(None if k == 0 else old.policies[k - 1].name, c and old.site_name(c), ifi)
                     for (k, c), ifi in self._dups.items()]
            self._dups = {}
            for pname, sname, ifi in named:
                names = [p.name for p in table.policies]
                k = 0 if pname is None else (names.index(pname) + 1 if pname in names else None)
                c = 0 if not sname else (table.sites.index(sname) + 1 if sname in table.sites else None)
                if k is not None and c is not None:
                    self._dups[(k, c)] = ifi
            for tc in self._steering.values():
                tc.write_dups(self._dups)

    @property
    def steering(self) -> bool:
        """Whether the program writes (path, policy) into each frame's XDP
        metadata for tc to turn into skb->mark. Off until a path is set or a
        test run needs it: it costs a helper call per packet."""
        return self._meta

    @steering.setter
    def steering(self, on: bool) -> None:
        self._meta = bool(on)
        self._write_cfg()

    def set_path(self, policy: str | int | None, path_id: int | None, site: str | int | None = None) -> None:
        """Point a class (a policy by name or id; None or -1: the default
        class) at a path slot for one destination site (name or number; 0:
        outside every site), or for every destination when ``site`` is None;
        ``path_id`` None: no path. One map write per (class, site); flows
        keep their records."""
        self.set_paths([(policy, site, path_id)])

    def set_paths(self, moves: Iterable[tuple[str | int | None, str | int | None, int | None]]) -> None:
        """Several (class, site, path) moves in one batched map update (all
        checked before any is applied)."""
        keys = []
        for cls, cols, slot in resolve_moves(self.table, moves):
            for c in cols:
                self._routes[cls + 1, c]["path"] = slot
                keys.append((cls + 1) * self._scols + c)
        base = self._set * self._routes.size  # the live set's routes
        if len(keys) == 1:
            self._set_value("pn_route_map", base + keys[0], self._routes.ravel()[keys[0]])
        elif keys:
            k = np.unique(np.asarray(keys, dtype=np.uint32))
            self._update_batch("pn_route_map", base + k, self._routes.ravel()[k])
        if not self._meta:
            self.steering = True

    def set_duplicate(self, policy: str | int | None, ifname: str | None, site: str | int | None = None) -> None:
        """Send a copy of each packet of a class (a policy by name or id) to
        one destination site (every site when ``site`` is None) out of
        tunnel ``ifname`` too, besides its path; None stops the copies. One
        map write; the far end drops the second copy (``Dedup``). Needs
        steering (the tc program clones the packet).

        >>> x.set_duplicate("voip", "s0w1", site="s1")  # doctest: +SKIP
        """
        if ifname is None:
            ifindex = 0
        else:
            try:
                ifindex = socket.if_nametoindex(ifname)
            except OSError:
                raise ConfigError("ifname", ifname, "is no interface here") from None
        for cls, cols, _ in resolve_moves(self.table, [(policy, site, None)]):
            for c in cols:
                if ifindex:
                    self._dups[(cls + 1, c)] = ifindex
                else:
                    self._dups.pop((cls + 1, c), None)
        for tc in self._steering.values():
            tc.write_dups(self._dups)

    def duplicates(self) -> dict[str, dict[str, int]]:
        """Copies each policy sent over a second path, and copies the kernel
        refused to send (the second tunnel gone or down), over every steered
        interface."""
        out: dict[str, dict[str, int]] = {}
        for tc in self._steering.values():
            for i, (sent, refused) in enumerate(tc.dup_counts()):
                if (sent or refused) and i > 0:
                    name = self.table.policies[i - 1].name
                    d = out.setdefault(name, {"sent": 0, "refused": 0})
                    d["sent"] += sent
                    d["refused"] += refused
        return out

    def path_of(self, policy: str | int | None, site: str | int = 0) -> int | None:
        """The path slot of (class, destination site), read from the map; None: no path."""
        cls, cols, _ = resolve_moves(self.table, [(policy, site, None)])[0]
        m = self._maps["pn_route_map"]
        v = m[m.Key(self._set * self._routes.size + (cls + 1) * self._scols + cols[0])].path
        return None if v == abi.NO_PATH else v

    def routes(self) -> np.ndarray:
        """Path slot per (class, site), as ``Userspace.routes``."""
        return self._routes["path"].copy()

    def set_redirect(self, path_id: int, ifname: str) -> None:
        """Send packets of ``path_id`` (< 256) out of ``ifname`` with XDP_REDIRECT."""
        if not 0 <= path_id < TX_SLOTS:
            raise ConfigError("path_id", path_id, f"redirect slots are 0..{TX_SLOTS - 1}")
        try:
            ifindex = socket.if_nametoindex(ifname)
        except OSError:
            raise DataplaneUnavailable(f"interface {ifname!r} does not exist", "create it first") from None
        m = self._maps["pn_tx_map"]
        m[m.Key(path_id)] = m.Leaf(ifindex)

    # -- packets without an interface ----------------------------------------

    def test_run(self, frames: Sequence[bytes] | tuple[Any, np.ndarray], ts_ns: Any = None, *,
                 detail: bool = False) -> np.ndarray:
        """Run the program on each frame with BPF_PROG_TEST_RUN (no interface
        needed); returns each frame's policy index, like Userspace.process
        (``detail=True``: ``abi.DETAIL_DTYPE`` rows, policy, destination site
        and path, read back from the metadata the program wrote).
        ``ts_ns`` (one per frame) replaces the kernel clock for these frames.
        Each frame's XDP verdict (``XDP_PASS`` 2, ``XDP_DROP`` 1, ``XDP_REDIRECT``
        4) is left in ``last_verdicts``."""
        if is_buffer(frames):
            buf, offsets = frames
            frames = [bytes(buf[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)]
        frames = list(frames)
        short = [i for i, f in enumerate(frames) if len(f) < 14]
        if short:
            raise ConfigError("test_run", f"frame {short[0]} ({len(frames[short[0]])} bytes)",
                              "is shorter than an Ethernet header: the kernel refuses to test-run it "
                              "(and no such frame reaches XDP from a link)")
        if ts_ns is not None and self._attached:
            raise ConfigError("test_run", "ts_ns", "replayed times would stamp the live packets of "
                              f"{', '.join(self._attached)} too; replay with a program that is not attached")
        ts = None if ts_ns is None else np.asarray(ts_ns, dtype=np.uint64)
        if ts is not None and ts.shape != (len(frames),):
            raise ConfigError("ts_ns", len(ts), f"timestamps given for {len(frames)} frames")
        out = np.zeros(len(frames), dtype=abi.DETAIL_DTYPE)
        out["policy"], out["path"] = -1, abi.NO_PATH
        meta = abi.META_DTYPE.itemsize
        obuf = ctypes.create_string_buffer(OUT_BYTES)
        if not self._meta:  # the policy comes back in the metadata
            self.steering = True
        self.last_verdicts = np.zeros(len(frames), dtype=np.int32)
        for i, f in enumerate(frames):
            if ts is not None:
                self._clock = int(ts[i])
                self._replayed = True
                self._write_cfg()
            retval, data_out = self._lib.test_run(self._fn.fd, f, 1, obuf)[:2]
            self.last_verdicts[i] = retval
            if len(data_out) == len(f) + meta:
                m = np.frombuffer(data_out[:meta], dtype=abi.META_DTYPE)[0]
                out[i] = (m["policy"], m["site"], m["path"])
        if ts is not None:
            self._clock = 0
            self._write_cfg()
        return out if detail else out["policy"].copy()

    def process(self, frames: Sequence[bytes] | tuple[Any, np.ndarray], ts_ns: Any = None, *,
                detail: bool = False) -> np.ndarray:
        """Same as ``Userspace.process``: run frames given by Python through the
        program (with BPF_PROG_TEST_RUN), so both backends take offline input."""
        return self.test_run(frames, ts_ns=ts_ns, detail=detail)

    def bench(self, frame: bytes, repeat: int = 100_000, floor: bool = False) -> float:
        """ns per run of the program (or of the floor program) on one frame, measured by the kernel."""
        obuf = ctypes.create_string_buffer(OUT_BYTES)
        fd = (self._floor if floor else self._fn).fd
        return float(self._lib.test_run(fd, frame, repeat, obuf)[2])

    # -- reading maps ----------------------------------------------------------

    def flows(self) -> np.ndarray:
        """Live flows (``abi.FLOW_DTYPE``), read in place from the mapped flow
        table (one pass over its memory, no syscall per flow)."""
        return self._take(TAKE_COPY)

    def drain(self, flush: bool = False, *, idle_timeout_s: float | None = None,
              now_ns: int | None = None) -> np.ndarray:
        """Export and remove flows: the ones evicted to make room since the
        last drain, plus every live flow (``flush``) or those idle for
        ``idle_timeout_s``. Each slot is claimed with a compare-and-swap
        first, so a drain under traffic never tears a record a CPU is
        writing. ``now_ns`` is "now" for the idle test (default: the kernel's
        clock; pass the replay time for flows stamped by ``test_run(ts_ns=...)``)."""
        parts = [self._take_evicted()]
        if idle_timeout_s is None:
            idle_timeout_s = self.idle_timeout_s
        if flush:
            parts.append(self._take(TAKE_ALL))
            self._replayed = False  # nothing replayed is left: flows are the kernel clock's again
        elif idle_timeout_s is not None:
            now = now_ns if now_ns is not None else self._clock or time.monotonic_ns()
            parts.append(self._take(TAKE_IDLE, now, int(idle_timeout_s * 1e9)))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def counters(self) -> dict[str, Any]:
        """Per-policy packets/bytes, malformed frames by reason, flow counts.

        A hit counts only in its flow record, so a policy's count is summed
        here from its live flows (one pass over the mapped table: about 20 ms
        at a million flows), what left the table and packets without a record
        (bpf/patronus_xdp.c, ``pn_pcount_map``). Under eviction churn a reading
        can miss the flows evicted while it runs; the next reading has them.

        Besides the keys ``Userspace.counters()`` has: ``evicted`` and
        ``export_lost`` (flows pushed out of a full probe window, and those the
        eviction ring had no room for), ``insert_failed`` (lost a slot race:
        counted, no record), ``reclassified`` (known flows classified again
        after a table swap), ``unaccounted`` (passed without a policy because
        a tail call failed; never expected), ``class_cache_hits`` (new flows
        the classifier cache answered) and ``generation``.

        >>> x.counters()["policies"]["voip"]["packets"]  # doctest: +SKIP
        4
        """
        pc, live = self._policy_counts()
        mal = self._percpu_sum("pn_malformed_map", len(abi.MALFORMED_REASONS) + 1, 1)[:, 0]
        st = dict(zip(abi.STATS, (int(x) for x in self._percpu_sum("pn_stats_map", len(abi.STATS), 1)[:, 0])))
        return {
            "default": {"packets": int(pc[0, 0]), "bytes": int(pc[0, 1])},
            "policies": {p.name: {"packets": int(pc[i + 1, 0]), "bytes": int(pc[i + 1, 1])}
                         for i, p in enumerate(self.table.policies)},
            "malformed": dict(zip(abi.MALFORMED_REASONS, (int(x) for x in mal[1:]))),
            "flows": live, "capacity": self._slots,
            # every parsed packet is in one policy's count; hits are the packets
            # that were none of the other cases (the program does not count them)
            "new_flows": st["new_flows"],
            "cache_hits": int(pc[:, 0].sum()) - st["new_flows"] - st["reclassified"] - st["insert_failed"],
            "cache_misses": st["new_flows"] + st["reclassified"] + st["insert_failed"],
            "reclassified": st["reclassified"],
            "insert_failed": st["insert_failed"], "evicted": st["evicted"], "export_lost": st["export_lost"],
            "unaccounted": st["unaccounted"], "class_cache_hits": st["class_cache_hits"],
            "generation": self._generation, "qos_dropped": self.qos_drops(),
        }

    def _policy_counts(self) -> tuple[np.ndarray, int]:
        """(packets, bytes) by policy + 1 and the live flow count. A policy's
        count is what no live record holds (pn_pcount_map), what drains took
        (_gone) and its live flows' totals. The map is read before the scan
        of the table: a flow evicted or re-stamped while the scan runs then
        shows at most once (the next reading has it), where reading the map
        after could show it twice, or a re-stamp's (wrapping) subtraction
        without the record it balances. A reading where the map moved during
        the scan is retried, twice at most."""
        for _ in range(3):
            before = self._percpu_sum("pn_pcount_map", self._npol, 2)
            pc = self._gone + before
            live = _fast.xdp_sums(self._table_mem, pc)
            if np.array_equal(before, self._percpu_sum("pn_pcount_map", self._npol, 2)):
                break
        # under eviction churn a policy can still read a moment low; never as
        # a wrapped "negative" count
        return np.maximum(pc.view(np.int64), 0).astype(np.uint64), live

    def _take(self, mode: int, now_ns: int = 0, idle_ns: int = 0) -> np.ndarray:
        live = _fast.xdp_count(self._table_mem)
        room = live + 1024 if mode == TAKE_COPY else self._slots  # flows arriving during the scan
        out = np.empty(min(room, self._slots), dtype=abi.FLOW_DTYPE)
        n = _fast.xdp_take(self._table_mem, out.view(np.uint8), mode, now_ns, idle_ns)
        out = out[:n].copy() if n < len(out) // 2 else out[:n]
        if mode != TAKE_COPY and n:  # their counts leave the table: the policy counters keep them
            slot = out["policy"].astype(np.int64) + 1
            for col, field in enumerate(("packets", "bytes")):  # exact in uint64 (bincount sums in float)
                np.add.at(self._gone[:, col], slot, out[field])
        return self._to_wall(out)

    def _on_evict(self, ctx: Any, data: Any, size: int) -> None:
        self._evicted.append(ctypes.string_at(data, size))

    def _take_evicted(self) -> np.ndarray:
        self._bpf.ring_buffer_consume()
        raw, self._evicted = b"".join(self._evicted), []
        # ring buffer copies are whole slots, taken while busy
        out = np.empty(len(raw) // abi.XSLOT_DTYPE.itemsize, dtype=abi.FLOW_DTYPE)
        _fast.xdp_fold(raw, out.view(np.uint8))
        return self._to_wall(out)

    # -- low-level map helpers ------------------------------------------------

    def _fd(self, name: str) -> int:
        return self._maps[name].map_fd

    def _set_value(self, name: str, key: int, value: np.ndarray) -> None:
        m = self._maps[name]
        raw = np.ascontiguousarray(value).tobytes()
        if len(raw) != ctypes.sizeof(m.Leaf):
            raise AssertionError(f"{name}: value of {len(raw)} bytes, map wants {ctypes.sizeof(m.Leaf)}")
        m[m.Key(key)] = m.Leaf.from_buffer_copy(raw)

    def _update_batch(self, name: str, keys: np.ndarray, values: np.ndarray) -> None:
        self._lib.update_batch(self._fd(name), name, keys, values)

    def _to_wall(self, out: np.ndarray) -> np.ndarray:
        if not self._replayed and len(out):
            # the kernel stamps CLOCK_MONOTONIC; Userspace and captures use wall time
            out["first_ns"] += np.uint64(self._mono_to_real)
            out["last_ns"] += np.uint64(self._mono_to_real)
        return out

    def _percpu_sum(self, name: str, n: int, words: int) -> np.ndarray:
        return self._lib.percpu_sum(self._fd(name), name, n, words, self._ncpu)

    def __repr__(self) -> str:
        return (f"Xdp({self._npol - 1} policies, flows<={self.flow_capacity}, "
                f"attached={list(self._attached)}, generation={self._generation})")


_live: weakref.WeakSet[Xdp] = weakref.WeakSet()


@atexit.register
def _detach_all() -> None:
    for x in list(_live):
        x.close()
