"""The Parquet flow archive read back by engines that know nothing of
patronus: pandas (pyarrow) and DuckDB, 1,000,000 flow records over three
hours, equal to what was written; and `patronus flows --pcap --parquet`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patronus import abi
from patronus.archive import FlowArchive
from patronus.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
N = 1_000_000
T0_NS = 1_796_040_000 * 10**9   # 2026-11-30 12:00 UTC


def random_flows(n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.zeros(n, abi.FLOW_DTYPE)
    f["family"] = np.where(rng.random(n) < 0.2, 6, 4)
    f["src"] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    f["dst"] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    v4 = f["family"] == 4
    f["src"][v4, 4:] = 0
    f["dst"][v4, 4:] = 0
    f["src"][v4, 0] = 10
    f["sport"], f["dport"] = rng.integers(0, 65536, n), rng.integers(0, 65536, n)
    f["proto"] = rng.choice([6, 17, 1], n)
    f["packets"] = rng.integers(1, 10**6, n)
    f["bytes"] = f["packets"] * rng.integers(40, 1500, n)
    f["first_ns"] = T0_NS + rng.integers(0, 3 * 3600 * 10**9, n)
    f["last_ns"] = f["first_ns"] + rng.integers(0, 60 * 10**9, n)
    f["policy"] = rng.integers(-1, 3, n)
    f["path"] = np.where(rng.random(n) < 0.1, abi.NO_PATH, rng.integers(0, 8, n))
    f["dscp"], f["tcp_flags"], f["site"] = rng.integers(0, 64, n), rng.integers(0, 256, n), rng.integers(0, 5, n)
    return f


def expected(f: np.ndarray, names: list[str]) -> pd.DataFrame:
    def text(raw: np.ndarray, fam: np.ndarray) -> list[str]:
        return [socket.inet_ntop(socket.AF_INET, bytes(r[:4])) if a == 4 else socket.inet_ntop(socket.AF_INET6, bytes(r))
                for r, a in zip(raw, fam)]

    pol = f["policy"].astype(np.int64)
    return pd.DataFrame({
        "first_ms": (f["first_ns"] // 1_000_000).astype(np.int64), "last_ms": (f["last_ns"] // 1_000_000).astype(np.int64),
        "src": text(f["src"], f["family"]), "dst": text(f["dst"], f["family"]),
        "sport": f["sport"].astype(np.int64), "dport": f["dport"].astype(np.int64), "proto": f["proto"].astype(np.int64),
        "packets": f["packets"].astype(np.int64), "bytes": f["bytes"].astype(np.int64),
        "policy": [names[p] if p >= 0 else None for p in pol],
        "path": [None if p == abi.NO_PATH else int(p) for p in f["path"]],
        "dscp": f["dscp"].astype(np.int64), "site": f["site"].astype(np.int64),
    })


def canonical(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["first_ms", "last_ms", "src", "dst", "sport", "dport", "proto", "packets", "bytes", "policy", "path",
            "dscp", "site"]
    df = df[cols].copy()
    df["path"] = df["path"].astype("Int64")
    df["policy"] = df["policy"].astype(object).where(df["policy"].notna(), None)
    return df.sort_values(cols[:9]).reset_index(drop=True)


def test_a_million_records_read_back_equal_in_pandas_and_duckdb(tmp_path):
    import duckdb

    names = ["voip", "video", "bulk"]
    flows = random_flows(N)
    arch = FlowArchive(tmp_path / "arch")
    for part in np.array_split(flows, 4):   # four drains
        assert arch.write(part, names) == len(part)
    hours = sorted(p.name for p in (tmp_path / "arch").iterdir())
    assert hours == ["hour=2026-11-30T12", "hour=2026-11-30T13", "hour=2026-11-30T14"]
    want = canonical(expected(flows, names))

    df = pd.read_parquet(tmp_path / "arch")
    df["first_ms"] = df["first"].astype("int64") // 10**6 if df["first"].dt.unit == "ns" else \
        df["first"].dt.as_unit("ms").astype("int64")
    df["last_ms"] = df["last"].dt.as_unit("ms").astype("int64")
    got = canonical(df)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)

    con = duckdb.connect()
    q = con.execute(f"""SELECT epoch_ms("first") AS first_ms, epoch_ms("last") AS last_ms, src, dst, sport, dport, proto,
                               packets, bytes, policy, path, dscp, site, hour
                        FROM read_parquet('{tmp_path / "arch"}/*/*.parquet', hive_partitioning = true)""").df()
    # the partition column agrees with each record's start
    assert (pd.to_datetime(q["first_ms"], unit="ms").dt.strftime("%Y-%m-%dT%H") == q["hour"].astype(str)).all()
    pd.testing.assert_frame_equal(canonical(q), want, check_dtype=False)


def test_a_capture_becomes_an_archive_through_the_command(tmp_path):
    from .test_ipfix import drained, write_capture

    pcap = tmp_path / "flows.pcap"
    write_capture(pcap, 1_796_040_000.0)
    want = drained(pcap, 256, 15.0, 60.0)
    r = subprocess.run([sys.executable, "-m", "patronus.cli", "flows", "--pcap", str(pcap), "--parquet",
                        str(tmp_path / "arch"), "--capacity", "256"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(tmp_path / "arch")
    got = sorted(zip(df["src"], df["dst"], df["sport"].astype(int), df["dport"].astype(int), df["proto"].astype(int),
                     df["packets"].astype(int), df["bytes"].astype(int),
                     df["first"].dt.as_unit("ms").astype("int64"), df["last"].dt.as_unit("ms").astype("int64")))
    assert got == sorted(want)
    assert df["policy"].isna().all()   # no state file: every flow in the default class


def test_the_command_needs_a_destination_and_a_readable_capture(tmp_path):
    from patronus.export import export_capture

    with pytest.raises(ConfigError, match="destination"):
        export_capture(tmp_path / "x.pcap")
    (tmp_path / "bad.pcap").write_bytes(b"not a capture at all")
    r = subprocess.run([sys.executable, "-m", "patronus.cli", "flows", "--pcap", str(tmp_path / "bad.pcap"),
                        "--parquet", str(tmp_path / "a")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "not a readable capture" in r.stderr, r.stderr


def test_the_ipv4_and_ipv6_zero_addresses_stay_apart(tmp_path):
    f = np.zeros(2, abi.FLOW_DTYPE)       # 0.0.0.0 (a DHCP discover) and :: (duplicate address detection)
    f["family"] = [4, 6]
    f["packets"] = 1
    FlowArchive(tmp_path / "a").write(f, [])
    df = pd.read_parquet(tmp_path / "a").sort_values("family")
    assert df["src"].tolist() == ["0.0.0.0", "::"] and df["dst"].tolist() == ["0.0.0.0", "::"]
