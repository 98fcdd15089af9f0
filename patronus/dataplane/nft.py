"""Steering without XDP: the policy table as nftables rules that mark each
packet with the path of (its class, its destination site) (``mark_base +
path slot``) at prerouting, for ``ip rule fwmark`` to pick the path's
table, exactly as the XDP + tc pair does. The same rules apply each
policy's QoS: DSCP rewrite and an optional rate limit (packets over
``rate_kbps`` are dropped, a policer).

Layout (one table per LAN interface): chain ``steer`` holds one rule per
policy in the table's first-match order (lower priority number first),
each ending in ``goto cK`` (K = policy id + 1; ``c0`` is the default class,
the chain's last rule). Chain ``cK`` marks by destination: per family, an
interval set of the site subnets the class has no path to (accepted, the
mark left as it is, as tc leaves it), an interval map from the others to
the mark of the class's path there, then one rule for destinations outside
every site. Moving (class, site) rewrites that site's elements in one nft
transaction; no rule is replaced and flows stay. Site subnets must not
overlap (a Mesh guarantees it; nft interval sets refuse overlaps).

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

import numpy as np

from ..errors import ConfigError, DataplaneUnavailable
from ..model import Policy
from .. import abi
from .base import PATH_MARK
from ._routes import resolve_moves

__all__ = ["NftSteering", "rule_text", "QOS_COMMENT"]

QOS_COMMENT = "patronus qos drop "   # + the policy's name: the comment of its rate limit's drop rule

NO_PATH = abi.NO_PATH


def _ports(ranges: tuple[tuple[int, int], ...]) -> str:
    """'5060', '5060-5061', or an anonymous set '{ 5060-5061, 10000-20000 }'."""
    items = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def rule_text(p: Policy, ifname: str, mark: int | None, verdict: str = "accept") -> str:
    """The nftables rule (inet family) of one policy: match, QoS, path mark, verdict.

    Several port ranges or protocols become anonymous sets:

    >>> from patronus import Match
    >>> print(rule_text(Policy("sip", Match(proto="tcp/udp", dst_ports="5060-5061,10000-20000"), priority=1),
    ...                 "lan0", None))
    iifname "lan0" meta l4proto { 6, 17 } th dport { 5060-5061, 10000-20000 } accept
    """
    m = p.match
    fam = None
    parts = [f'iifname "{ifname}"']
    for side, cidr in (("saddr", m.src), ("daddr", m.dst)):
        if cidr:
            net = ipaddress.ip_network(cidr)
            fam = "ip" if net.version == 4 else "ip6"
            parts.append(f"{fam} {side} {net}")
    if len(m.protos) == 1:
        parts.append(f"meta l4proto {m.protos[0]}")
    elif m.protos:
        parts.append("meta l4proto { " + ", ".join(map(str, m.protos)) + " }")
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
        # counted, and named by a comment so qos_drops() finds each policy's count
        parts.append(f"limit rate over {max(1, p.qos.rate_kbps // 8)} kbytes/second counter drop "
                     f"comment \"{QOS_COMMENT}{p.name}\"")
        # the rule above drops the excess; the rule below marks what is within the rate
        return " ".join(parts)
    if p.qos.dscp is not None:
        parts.append(f"{fam or 'ip'} dscp set {p.qos.dscp}")
    if mark is not None:
        parts.append(f"meta mark set {mark:#x}")
    return " ".join(parts + [verdict])


class NftSteering:
    """The steering rules of one LAN interface in their own table ``inet
    patronus_IFNAME`` (prerouting at mangle priority; a leftover table of an
    earlier run is replaced). ``netns`` runs nft inside a named namespace.
    ``set_path`` / ``set_paths`` take the same (class, site, path) moves as
    the data planes."""

    def __init__(self, table: Any, ifname: str, *, mark_base: int = PATH_MARK, netns: str | None = None) -> None:
        self.table, self.ifname, self.mark_base, self.netns = table, ifname, mark_base, netns
        self.nft_table = t = f"patronus_{re.sub(r'[^A-Za-z0-9_]', '_', ifname)}"
        nets = sorted(((ipaddress.ip_network(n), site) for site in table.sites for n in table.site_subnets[site]),
                      key=lambda x: (x[0].version, x[0]))
        for (a, sa), (b, sb) in zip(nets, nets[1:]):
            if a.version == b.version and a.overlaps(b):
                raise ConfigError("NftSteering.table", f"{a} of site {sa!r}, {b} of site {sb!r}",
                                  "overlap: nftables interval maps need disjoint site subnets (a Mesh has them)")
        # (class + 1, site column) -> path slot, the state the maps hold
        self.routes = np.full((len(table.policies) + 1, len(table.sites) + 1), NO_PATH, dtype=np.uint32)
        self._outside: dict[int, int] = {}   # class + 1 -> handle of its "outside every site" rule
        script = [f"add table inet {t}", f"delete table inet {t}", f"add table inet {t}",
                  f"add chain inet {t} steer {{ type filter hook prerouting priority mangle; }}"]
        for k in range(len(table.policies) + 1):
            script.append(f"add chain inet {t} c{k}")
            for fam, typ in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
                els = self._subnets(None, fam)
                elements = f" elements = {{ {', '.join(els)} }};" if els else ""
                script.append(f"add set inet {t} n{k}v{fam} {{ type {typ}; flags interval;{elements} }}")
                script.append(f"add map inet {t} m{k}v{fam} {{ type {typ} : mark; flags interval; }}")
            for fam, ip in (("4", "ip"), ("6", "ip6")):
                script.append(f"add rule inet {t} c{k} {ip} daddr @n{k}v{fam} accept")
                script.append(f"add rule inet {t} c{k} meta mark set {ip} daddr map @m{k}v{fam} accept")
        for idx in sorted(range(len(table.policies)), key=lambda i: table.policies[i].priority):
            for r in self._policy_rules(idx):
                script.append(f"add rule inet {t} steer {r}")
        script.append(f'add rule inet {t} steer iifname "{ifname}" goto c0')
        self._nft("; ".join(script))
        for k in range(len(table.policies) + 1):
            out = self._nft(f"add rule inet {t} c{k} accept", echo=True)
            h = re.search(r"# handle (\d+)", out)
            if h is None:
                raise DataplaneUnavailable(f"nft did not echo a rule handle: {out[-200:]}", "nftables >= 0.9")
            self._outside[k] = int(h.group(1))

    def _subnets(self, col: int | None, fam: str) -> list[str]:
        """Subnets of site column ``col`` (None: every site) of one family."""
        sites = self.table.sites if col is None else [self.table.sites[col - 1]]
        v = 4 if fam == "4" else 6
        return [n for s in sites for n in self.table.site_subnets[s] if ipaddress.ip_network(n).version == v]

    def _nft(self, script: str, echo: bool = False, json_out: bool = False) -> str:
        cmd = (["ip", "netns", "exec", self.netns] if self.netns else []) + ["nft"] + (["-j"] if json_out else [])
        if echo:
            cmd += ["--echo", "--handle"]
        r = subprocess.run(cmd + [script], capture_output=True, text=True)
        if r.returncode != 0:
            raise DataplaneUnavailable(f"nft {script[:120]}: {r.stderr.strip()[-300:]}",
                                       "is nftables installed and are we root?")
        return r.stdout

    def _policy_rules(self, idx: int) -> list[str]:
        p = self.table.policies[idx]
        goto = f"goto c{idx + 1}"
        if p.qos.rate_kbps and p.action != "drop":
            unlimited = p.__class__(p.name, p.match, priority=p.priority, app=p.app,
                                    qos=p.qos.__class__(dscp=p.qos.dscp), prefer=p.prefer)
            return [rule_text(p, self.ifname, None), rule_text(unlimited, self.ifname, None, goto)]
        return [rule_text(p, self.ifname, None, goto)]

    def qos_drops(self) -> dict[str, dict[str, int]]:
        """Packets and bytes each rate-limited policy's rule dropped (its nft counter)."""
        import json

        out: dict[str, dict[str, int]] = {}
        doc = json.loads(self._nft(f"list chain inet {self.nft_table} steer", json_out=True))
        for item in doc.get("nftables", []):
            rule = item.get("rule")
            if not rule or not str(rule.get("comment", "")).startswith(QOS_COMMENT):
                continue
            for e in rule.get("expr", []):
                if "counter" in e:
                    out[rule["comment"][len(QOS_COMMENT):]] = {"packets": int(e["counter"]["packets"]),
                                                                "bytes": int(e["counter"]["bytes"])}
        return out

    def set_path(self, policy: str | int | None, path_id: int | None, site: str | int | None = None) -> None:
        """Point (class, destination site) at a path slot (see ``Userspace.set_path``)."""
        self.set_paths([(policy, site, path_id)])

    def set_paths(self, moves: Any) -> None:
        """Several (class, site, path) moves, the element updates in one nft
        transaction (the last move of a (class, site) pair wins)."""
        final: dict[tuple[int, int], int] = {}
        for cls, cols, slot in resolve_moves(self.table, moves):
            for c in cols:
                final[(cls + 1, c)] = slot
        t, script = self.nft_table, []
        for (k, c), slot in final.items():
            was = int(self.routes[k, c])
            if slot == was:
                continue
            mark = 0 if slot == NO_PATH else self.mark_base + slot
            if c == 0:
                rule = "accept" if slot == NO_PATH else f"meta mark set {mark:#x} accept"
                script.append(f"replace rule inet {t} c{k} handle {self._outside[k]} {rule}")
                continue
            for fam in ("4", "6"):
                nets = self._subnets(c, fam)
                if not nets:
                    continue
                els = ", ".join(nets)
                # each subnet sits in the class's no-path set or its map, never both
                script.append(f"delete element inet {t} {'n' if was == NO_PATH else 'm'}{k}v{fam} {{ {els} }}")
                if slot == NO_PATH:
                    script.append(f"add element inet {t} n{k}v{fam} {{ {els} }}")
                else:
                    marks = ", ".join(f"{n} : {mark:#x}" for n in nets)
                    script.append(f"add element inet {t} m{k}v{fam} {{ {marks} }}")
        if script:
            self._nft("; ".join(script))  # one transaction: all or nothing
        for (k, c), slot in final.items():
            self.routes[k, c] = slot

    def path_of(self, policy: str | int | None, site: str | int = 0) -> int | None:
        cls, cols, _ = resolve_moves(self.table, [(policy, site, None)])[0]
        v = int(self.routes[cls + 1, cols[0]])
        return None if v == NO_PATH else v

    def close(self) -> None:
        self._nft(f"delete table inet {self.nft_table}")
