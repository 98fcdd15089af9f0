"""Flow export rates, side by side with what feeds them: 1,000,000 new flows
are accounted by the userspace data plane (the rate flows begin, and so
end: the record rate a steady state produces) and drained (the rate at which
a table of records can be handed over at once), then the same records are
sent as IPFIX to a UDP socket on loopback (goal: at least the drain rate)
and written as a Parquet archive. Records per second; min of the rounds.

Run: .venv/bin/python -m pytest benchmarks/test_bench_export.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest

from patronus import PolicyTable
from patronus.dataplane import Userspace

N = int(os.environ.get("PN_EXPORT_FLOWS", "1000000"))
ROUNDS = int(os.environ.get("PN_EXPORT_ROUNDS", "3"))


def frames(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n Ethernet/IPv4/UDP frames of n different flows, as (buffer, offsets)."""
    tmpl = bytearray(b"\x04" * 6 + b"\x02" * 6 + b"\x08\x00")
    tmpl += bytes([0x45, 0, 0, 46, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 1, 0, 0])
    tmpl += bytes([0x30, 0x39, 0, 53, 0, 26, 0, 0]) + bytes(18)
    size = len(tmpl)
    buf = np.tile(np.frombuffer(bytes(tmpl), np.uint8), n).reshape(n, size)
    i = np.arange(n, dtype=np.uint32)
    buf[:, 28] = (i >> 16) & 0xFF          # destination 10.1.x.y and the source port spread the flows
    buf[:, 32] = (i >> 8) & 0xFF
    buf[:, 33] = i & 0xFF
    buf[:, 34] = (i >> 16) & 0xFF
    return buf.ravel().copy(), np.arange(0, (n + 1) * size, size, dtype=np.int64)


def test_ipfix_and_parquet_rates_against_the_drain(benchmark, tmp_path):
    from patronus.archive import FlowArchive
    from patronus.ipfix import IpfixExporter

    buf, off = frames(N)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))   # nobody reads: the kernel drops what overflows, the exporter's cost is the same
    times: dict[str, list[float]] = {"new_flows": [], "drain": [], "ipfix": [], "parquet": []}
    sent = 0

    def one_round() -> None:
        nonlocal sent
        with Userspace(PolicyTable([]), N + 16) as dp:
            t = time.perf_counter()
            dp.process((buf, off))
            times["new_flows"].append(time.perf_counter() - t)
            t = time.perf_counter()
            flows = dp.drain(flush=True)
            times["drain"].append(time.perf_counter() - t)
        assert len(flows) == N
        with IpfixExporter(sink.getsockname()) as exp:
            t = time.perf_counter()
            sent = exp.export(flows, "end")
            times["ipfix"].append(time.perf_counter() - t)
        arch = FlowArchive(tmp_path / f"arch{len(times['parquet'])}")
        t = time.perf_counter()
        arch.write(flows, [])
        times["parquet"].append(time.perf_counter() - t)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    sink.close()
    rates = {k: N / min(v) for k, v in times.items()}
    benchmark.extra_info.update({f"{k}_records_per_s": round(r) for k, r in rates.items()})
    print("\n" + json.dumps({"flows": N, **{f"{k}_s_min": round(min(v), 3) for k, v in times.items()},
                             **{f"{k}_records_per_s": round(r) for k, r in rates.items()},
                             "ipfix_vs_drain": round(rates["ipfix"] / rates["drain"], 2),
                             "ipfix_vs_new_flows": round(rates["ipfix"] / rates["new_flows"], 2), "ipfix_sent": sent}))
