"""flows_to_pandas: readable addresses and policy names."""

from __future__ import annotations

import pytest

from patronus import Match, Policy, PolicyTable, flows_to_pandas, packets
from patronus.dataplane import Userspace

pd = pytest.importorskip("pandas")


def test_flows_to_pandas():
    table = PolicyTable([Policy("dns", Match(proto="udp", dst_ports=53), priority=1)])
    dp = Userspace(table, 16)
    dp.process([packets.udp("10.0.0.1", "10.0.0.2", 5353, 53), packets.tcp("2001:db8::1", "2001:db8::2", 1, 2)],
               ts_ns=[1_000_000_000, 2_000_000_000])
    df = flows_to_pandas(dp.flows(), table).sort_values("src").reset_index(drop=True)
    assert df["src"].tolist() == ["10.0.0.1", "2001:db8::1"]
    assert df["dst"].tolist() == ["10.0.0.2", "2001:db8::2"]
    assert df["policy_name"].tolist() == ["dns", "(default)"]
    assert df["bytes"].tolist() == [28, 60]
    assert str(df["first"][0]) == "1970-01-01 00:00:01"
