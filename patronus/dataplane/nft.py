"""Steering without XDP: the policy table as nftables rules that mark each
policy's packets with its path (``mark_base + path slot``) at prerouting,
for ``ip rule fwmark`` to pick the path's table, exactly as the XDP + tc
pair does. The same rules apply each policy's QoS: DSCP rewrite and an
optional rate limit (packets over ``rate_kbps`` are dropped, a policer).

Rules keep the table's first-match order (lower priority number first):
every rule ends in a verdict, so the first policy that matches decides.
Moving a policy to another path replaces its one rule (``nft replace rule
... handle``), the other rules and the flows stay.

>>> from patronus import Policy, Match, PolicyTable, QoS
>>> t = PolicyTable([Policy("voip", Match(proto="udp", dst_ports=5060), priority=1, qos=QoS(dscp=46))])
>>> print(rule_text(t.policies[0], "lan0", 0x7003))
iifname "lan0" meta l4proto 17 th dport 5060 ip dscp set 46 meta mark set 0x7003 accept
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from typing import Any

from ..errors import ConfigError, DataplaneUnavailable
from ..model import Policy
from . import PATH_MARK

__all__ = ["NftSteering", "rule_text"]

NO_PATH = 0xFFFFFFFF


def _ports(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def rule_text(p: Policy, ifname: str, mark: int | None) -> str:
    """The nftables rule (inet family) of one policy: match, QoS, path mark, verdict."""
    m = p.match
    fam = None
    parts = [f'iifname "{ifname}"']
    for side, cidr in (("saddr", m.src), ("daddr", m.dst)):
        if cidr:
            net = ipaddress.ip_network(cidr)
            fam = "ip" if net.version == 4 else "ip6"
            parts.append(f"{fam} {side} {net}")
    if m.proto is not None:
        parts.append(f"meta l4proto {m.proto}")
    elif m.src_ports or m.dst_ports:
        parts.append("meta l4proto { 6, 17 }")
    if m.src_ports:
        parts.append(f"th sport {_ports(m.src_ports)}")
    if m.dst_ports:
        parts.append(f"th dport {_ports(m.dst_ports)}")
    if m.dscp is not None:
        parts.append(f"{fam or 'ip'} dscp {m.dscp}")
    if p.action == "drop":
        return " ".join(parts + ["drop"])
    if p.qos.rate_kbps:
        parts.append(f"limit rate over {max(1, p.qos.rate_kbps // 8)} kbytes/second drop")
        # the rule above drops the excess; the rule below marks what is within the rate
        return " ".join(parts)
    if p.qos.dscp is not None:
        parts.append(f"{fam or 'ip'} dscp set {p.qos.dscp}")
    if mark is not None:
        parts.append(f"meta mark set {mark:#x}")
    return " ".join(parts + ["accept"])


class NftSteering:
    """The policy rules of one LAN interface in their own table ``inet
    patronus_IFNAME`` (chain ``steer``, prerouting at mangle priority; a
    leftover table of an earlier run is replaced). ``netns`` runs nft inside
    a named namespace."""

    def __init__(self, table: Any, ifname: str, *, mark_base: int = PATH_MARK, netns: str | None = None) -> None:
        self.table, self.ifname, self.mark_base, self.netns = table, ifname, mark_base, netns
        self.nft_table = f"patronus_{re.sub(r'[^A-Za-z0-9_]', '_', ifname)}"
        self.paths: dict[int, int] = {}
        self.handles: dict[int, list[int]] = {}
        t = self.nft_table
        self._nft(f"add table inet {t}; delete table inet {t}; add table inet {t}; "
                  f"add chain inet {t} steer {{ type filter hook prerouting priority mangle; }}")
        for idx in sorted(range(len(table.policies)), key=lambda i: table.policies[i].priority):
            self._add(idx)

    def _nft(self, script: str, echo: bool = False) -> str:
        cmd = (["ip", "netns", "exec", self.netns] if self.netns else []) + ["nft"]
        if echo:
            cmd += ["--echo", "--handle"]
        r = subprocess.run(cmd + [script], capture_output=True, text=True)
        if r.returncode != 0:
            raise DataplaneUnavailable(f"nft {script[:120]}: {r.stderr.strip()[-300:]}",
                                       "is nftables installed and are we root?")
        return r.stdout

    def _rules(self, idx: int) -> list[str]:
        p = self.table.policies[idx]
        slot = self.paths.get(idx)
        mark = None if slot is None else self.mark_base + slot
        if p.qos.rate_kbps and p.action != "drop":
            unlimited = p.__class__(p.name, p.match, priority=p.priority, app=p.app,
                                    qos=p.qos.__class__(dscp=p.qos.dscp), prefer=p.prefer)
            return [rule_text(p, self.ifname, mark), rule_text(unlimited, self.ifname, mark)]
        return [rule_text(p, self.ifname, mark)]

    def _add(self, idx: int) -> None:
        self.handles[idx] = []
        for r in self._rules(idx):
            out = self._nft(f"add rule inet {self.nft_table} steer {r}", echo=True)
            h = re.search(r"# handle (\d+)", out)
            if h is None:
                raise DataplaneUnavailable(f"nft did not echo a rule handle: {out[-200:]}", "nftables >= 0.9")
            self.handles[idx].append(int(h.group(1)))

    def set_path(self, policy: str | int, path_id: int) -> None:
        """Point a policy at a path slot: its rule is replaced in place."""
        idx = self.table.index(policy) if isinstance(policy, str) else policy
        if not 0 <= idx < len(self.table.policies):
            raise ConfigError("policy", policy, "is not a policy of this table")
        self.paths[idx] = path_id
        for h, r in zip(self.handles[idx], self._rules(idx)):
            self._nft(f"replace rule inet {self.nft_table} steer handle {h} {r}")

    def close(self) -> None:
        self._nft(f"delete table inet {self.nft_table}")
