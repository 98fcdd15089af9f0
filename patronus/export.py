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
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .ipfix import END_REASONS

__all__ = ["export_capture", "end_reasons"]


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
