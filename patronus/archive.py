"""Flow records as a Parquet archive (pyarrow), one directory an hour, readable
by pandas, DuckDB, Spark or anything else that reads Parquet, without
patronus installed.

Layout (Hive-style partitions, so readers filter hours without opening files):
``DIR/hour=2026-11-30T15/part-<n>-<random>.parquet``, the hour (UTC) of the
record's flow start. Columns: ``first``, ``last`` (timestamp, ms, UTC),
``src``, ``dst`` (text), ``sport``, ``dport`` (uint16), ``proto``, ``family``,
``dscp``, ``tcp_flags`` (uint8), ``packets``, ``bytes`` (uint64), ``policy``
(the policy's name; null for the default class), ``path`` (the path slot;
null for none), ``site`` (the destination site's column, 0 outside every
site). Each ``write`` adds files, never rewrites one: a crash loses at most
the batch being written.

>>> import numpy as np, tempfile, pandas as pd
>>> from patronus import abi
>>> f = np.zeros(2, abi.FLOW_DTYPE); f["family"] = 4; f["packets"] = [3, 4]
>>> d = tempfile.mkdtemp()
>>> FlowArchive(d).write(f, [])
2
>>> int(pd.read_parquet(d)["packets"].sum())
7
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["FlowArchive"]


def _addresses(raw: np.ndarray, family: np.ndarray) -> list[str]:
    """Text of 16-byte address rows (IPv4 in the first 4), each distinct one formatted once."""
    # keyed by family and bytes: IPv4 0.0.0.0 and IPv6 :: have the same 16 bytes
    both = np.empty((len(raw), 17), np.uint8)
    both[:, 0] = family
    both[:, 1:] = raw
    keyed = both.view(np.dtype((np.void, 17))).ravel()
    uniq, inverse = np.unique(keyed, return_inverse=True)
    text = []
    for u in uniq:
        b = u.tobytes()
        text.append(socket.inet_ntop(socket.AF_INET, b[1:5]) if b[0] == 4 else socket.inet_ntop(socket.AF_INET6, b[1:]))
    return [text[i] for i in inverse.ravel()]


class FlowArchive:
    """Append flow records (``abi.FLOW_DTYPE``) to ``directory`` as Parquet.
    ``clock_offset_ns`` makes the flows' times Unix time (0 for capture
    timestamps; a live data plane's are CLOCK_MONOTONIC: pass
    ``time.time_ns() - time.monotonic_ns()``)."""

    def __init__(self, directory: str | os.PathLike[str], *, clock_offset_ns: int = 0,
                 compression: str = "zstd") -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("FlowArchive", "pyarrow", "is not installed (pip install patronus[archive])") from None
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.offset_ns, self.compression = int(clock_offset_ns), compression
        self.records = self.files = 0
        self._n = 0

    def write(self, flows: np.ndarray, policy_names: list[str]) -> int:
        """Write ``flows`` (names for their policy indexes from ``policy_names``);
        returns how many records were written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not len(flows):
            return 0
        first_ms = (flows["first_ns"].astype(np.int64) + self.offset_ns) // 1_000_000
        last_ms = (flows["last_ns"].astype(np.int64) + self.offset_ns) // 1_000_000
        pol = flows["policy"].astype(np.int64)
        names = np.array([*policy_names, None], dtype=object)
        pol_idx = np.where((pol >= 0) & (pol < len(policy_names)), pol, len(policy_names))
        from .abi import NO_PATH

        path = flows["path"].astype(np.int64)
        table = pa.table({
            "first": pa.array(first_ms, pa.timestamp("ms", tz="UTC")),
            "last": pa.array(last_ms, pa.timestamp("ms", tz="UTC")),
            "src": pa.array(_addresses(flows["src"], flows["family"]), pa.string()),
            "dst": pa.array(_addresses(flows["dst"], flows["family"]), pa.string()),
            "sport": pa.array(flows["sport"], pa.uint16()), "dport": pa.array(flows["dport"], pa.uint16()),
            "proto": pa.array(flows["proto"], pa.uint8()), "family": pa.array(flows["family"], pa.uint8()),
            "dscp": pa.array(flows["dscp"], pa.uint8()), "tcp_flags": pa.array(flows["tcp_flags"], pa.uint8()),
            "packets": pa.array(flows["packets"], pa.uint64()), "bytes": pa.array(flows["bytes"], pa.uint64()),
            "policy": pa.array(names[pol_idx], pa.string()),
            "path": pa.array(path, pa.uint32(), mask=path == NO_PATH),
            "site": pa.array(flows["site"], pa.uint32()),
        })
        hours = first_ms // 3_600_000
        for hour in np.unique(hours):
            part = table.filter(pa.array(hours == hour))
            label = time.strftime("%Y-%m-%dT%H", time.gmtime(int(hour) * 3600))
            d = self.dir / f"hour={label}"
            d.mkdir(exist_ok=True)
            self._n += 1
            tmp = d / f".part-{self._n:06d}-{uuid.uuid4().hex[:8]}.parquet.tmp"
            pq.write_table(part, tmp, compression=self.compression)
            tmp.rename(d / tmp.name[1:-4])   # whole files only: readers never see one half written
            self.files += 1
        self.records += len(flows)
        return len(flows)

    def stats(self) -> dict[str, Any]:
        return {"records": self.records, "files": self.files, "directory": str(self.dir)}
