"""Flows out of patronus: a capture's flows, classified by the policies of a
state file, to an IPFIX collector (``patronus.ipfix``) and/or a Parquet
archive (``patronus.archive``). The ``patronus flows`` command.

Every flow the data plane gives up is exported once, as it goes: those it
evicted or expired while the capture was read (a full table evicts the
least recently used flow into the export buffer, never silently), those the
active timeout cut (a long flow becomes several records whose counts add up
to its total), and at the end every flow still live.

>>> from patronus.export import end_reasons
>>> import numpy as np
>>> from patronus import abi
>>> f = np.zeros(2, abi.FLOW_DTYPE); f["last_ns"] = [10**9, 70 * 10**9]
>>> end_reasons(f, "idle", active_timeout_s=60).tolist()
[1, 2]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .ipfix import END_REASONS

__all__ = ["export_capture", "end_reasons", "FlowMeter"]


def end_reasons(flows: np.ndarray, reason: str, *, active_timeout_s: float | None) -> np.ndarray:
    """The flowEndReason of each drained record: ``active`` where the record
    spans the active timeout (the flow goes on), else ``reason``."""
    out = np.full(len(flows), END_REASONS[reason], np.uint8)
    if active_timeout_s:
        span = flows["last_ns"].astype(np.int64) - flows["first_ns"].astype(np.int64)
        out[span >= int(active_timeout_s * 1e9)] = END_REASONS["active"]
    return out


def export_capture(pcap: str | os.PathLike[str], *, state: str | os.PathLike[str] | None = None,
                   ipfix: str | None = None, parquet: str | os.PathLike[str] | None = None,
                   idle_timeout_s: float = 15.0, active_timeout_s: float = 60.0,
                   capacity: int = 1 << 20, netns: str | None = None) -> dict[str, Any]:
    """Account ``pcap`` with the userspace data plane (the policies of
    ``state``'s mesh, or none: every flow in the default class) and export
    every flow record to ``ipfix`` (HOST:PORT) and/or ``parquet`` (a
    directory). Returns what was done: packets, records, flows and the
    totals, per destination."""
    from .dataplane.userspace import Userspace
    from .ipfix import IpfixExporter
    from .policy import PolicyTable

    if ipfix is None and parquet is None:
        raise ConfigError("flows", "--ipfix/--parquet", "name at least one destination")
    if state is not None:
        from .store import Store

        with Store(state, create=False) as st:
            table = st.load_mesh().policy_table()
    else:
        table = PolicyTable([])
    names = [p.name for p in table.policies]
    exporter = IpfixExporter(ipfix, clock_offset_ns=0, netns=netns) if ipfix is not None else None
    archive = None
    if parquet is not None:
        from .archive import FlowArchive

        archive = FlowArchive(Path(parquet))
    totals = {"records": 0, "packets": 0, "bytes": 0}
    try:
        with Userspace(table, capacity, idle_timeout_s=idle_timeout_s, active_timeout_s=active_timeout_s) as dp:
            dp.process_pcap(pcap)

            def out(flows: np.ndarray, reason: str) -> None:
                if not len(flows):
                    return
                totals["records"] += len(flows)
                totals["packets"] += int(flows["packets"].sum())
                totals["bytes"] += int(flows["bytes"].sum())
                if exporter is not None:
                    exporter.export(flows, end_reasons(flows, reason, active_timeout_s=active_timeout_s))
                if archive is not None:
                    archive.write(flows, names)

            out(dp.drain(), "idle")                 # evicted, expired and cut by the active timeout
            out(dp.drain(flush=True), "end")        # the rest: the capture ended
            info = dict(dp.last_capture or {})
            counters = dp.counters()
    finally:
        if exporter is not None:
            exporter.close()
    return {"capture": info, **totals, "evicted": int(counters.get("evicted", 0)),
            "malformed": int(sum(counters["malformed"].values())),
            "ipfix": exporter.stats() if exporter is not None else None,
            "parquet": archive.stats() if archive is not None else None}


class FlowMeter:
    """Every flow of a running data plane, exported once and on time, to
    ``sinks`` (callables taking ``(flows, flowEndReason codes)``, e.g.
    ``IpfixExporter.export``):

    * a flow idle for ``idle_timeout_s`` is drained from the table and its
      last record exported (``idle``); one the full table evicted, as soon as
      the next ``poll`` finds it (``lack_of_resources`` if it was still busy);
    * a flow that lives on is exported every ``active_timeout_s`` (``active``),
      each record holding what it counted since the one before, so the
      records of a flow that lives for hours add up to its totals;
    * ``close()`` exports every live flow (``forced``).

    Records carry deltas: ``packets``/``bytes`` since the flow's previous
    record, starting where that one ended. Both backends give flow times
    as Unix time (XDP converts its kernel clock), and so does ``poll``'s
    ``now_ns``; given, it is also the data plane's "now" for the idle test
    (a data plane replaying a capture); by default each backend uses its own
    clock for that.

    >>> from patronus import PolicyTable
    >>> from patronus.dataplane import Userspace
    >>> got = []
    >>> dp = Userspace(PolicyTable([]), 16)
    >>> m = FlowMeter(dp, [lambda f, r: got.append(len(f))])
    >>> m.poll(), m.close(), got
    (0, 0, [])
    """

    def __init__(self, dp: Any, sinks: list[Any], *, idle_timeout_s: float = 15.0,
                 active_timeout_s: float = 60.0) -> None:
        if not 0 < idle_timeout_s <= 86_400 or not 0 < active_timeout_s <= 86_400:
            raise ConfigError("FlowMeter timeouts", (idle_timeout_s, active_timeout_s), "are not 0 to 86,400 s")
        self.dp, self.sinks = dp, list(sinks)
        self.idle_ns, self.active_ns = int(idle_timeout_s * 1e9), int(active_timeout_s * 1e9)
        # per live flow already exported in part: its key -> (packets, bytes, last_ns) of the records so far
        self._sent: dict[bytes, tuple[int, int, int]] = {}
        self.records = 0
        self.inconsistent = 0    # records whose counts went backwards (exported as nothing)

    @staticmethod
    def _keys(flows: np.ndarray) -> list[bytes]:
        from numpy.lib import recfunctions

        # repacked: a multi-field view keeps the record's size, with the other fields' bytes in between
        cols = recfunctions.repack_fields(flows[["src", "dst", "sport", "dport", "proto", "family", "first_ns"]])
        return [bytes(k) for k in np.ascontiguousarray(cols).view(np.dtype((np.void, cols.dtype.itemsize)))]

    def _emit(self, flows: np.ndarray, codes: np.ndarray) -> int:
        if not len(flows):
            return 0
        for sink in self.sinks:
            sink(flows, codes)
        self.records += len(flows)
        return len(flows)

    def _deltas(self, flows: np.ndarray, *, forget: bool, keys: list[Any] | None = None) -> np.ndarray:
        """The records of ``flows``: less what earlier records of each flow
        held (``forget``: the flow is gone, drop what is remembered). A
        count below what was already exported (two live records of one key:
        two CPUs creating one flow in the same clock tick) exports nothing
        for that record rather than a wrapped count; it is counted in
        ``inconsistent``."""
        out = flows.copy()
        for i, key in enumerate(self._keys(flows) if keys is None else keys):
            prev = self._sent.pop(key, None) if forget else self._sent.get(key)
            if prev is not None:
                packets, octets = int(flows["packets"][i]) - prev[0], int(flows["bytes"][i]) - prev[1]
                if packets < 0 or octets < 0:
                    self.inconsistent += 1
                    packets = octets = 0
                out["packets"][i], out["bytes"][i] = packets, octets
                out["first_ns"][i] = prev[2]
        return out

    def poll(self, now_ns: int | None = None) -> int:
        """Drain what ended, export what has been active too long; returns the records sent."""
        now = time.time_ns() if now_ns is None else now_ns
        sent = 0
        gone = self.dp.drain(idle_timeout_s=self.idle_ns / 1e9, now_ns=now_ns)
        if len(gone):
            recs = self._deltas(gone, forget=True)
            busy = gone["last_ns"].astype(np.int64) > now - self.idle_ns   # evicted, not idle
            codes = np.where(busy, END_REASONS["lack_of_resources"], END_REASONS["idle"]).astype(np.uint8)
            keep = recs["packets"] > 0      # nothing new since its last active record: nothing to say
            sent += self._emit(recs[keep], codes[keep])
        live = self.dp.flows()
        if len(live):
            # candidates: begun an active timeout ago (their own, or their last record's, start)
            old = live[live["first_ns"].astype(np.int64) <= now - self.active_ns]
            due, due_keys = [], []
            for i, key in enumerate(self._keys(old)):
                prev = self._sent.get(key)
                since = prev[2] if prev is not None else int(old["first_ns"][i])
                if now - since >= self.active_ns and (prev is None or int(old["packets"][i]) > prev[0]):
                    due.append(i)
                    due_keys.append(key)
            if due:
                flows = old[due]
                recs = self._deltas(flows, forget=False, keys=due_keys)
                keep = recs["packets"] > 0
                sent += self._emit(recs[keep], np.full(int(keep.sum()), END_REASONS["active"], np.uint8))
                for key, f in zip(due_keys, flows):   # once sent: a sink that raised loses nothing
                    self._sent[key] = (int(f["packets"]), int(f["bytes"]), int(f["last_ns"]))
        return sent

    def close(self) -> int:
        """Export every flow still live (``forced``) and what was drained since the last poll."""
        gone = self.dp.drain(flush=True)
        recs = self._deltas(gone, forget=True)
        keep = recs["packets"] > 0
        self._sent.clear()
        return self._emit(recs[keep], np.full(int(keep.sum()), END_REASONS["forced"], np.uint8))
