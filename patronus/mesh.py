"""The mesh: sites, the paths between them, policies and failover settings.

A Mesh is the desired state a controller works toward. Every mutating call
validates first and changes nothing when it raises. ``to_dict`` and
``from_dict`` are its whole serialised form; ``patronus.store`` keeps it in
a state file (``save_mesh(mesh, path)``, ``load_mesh(path)``).

>>> from patronus import Mesh, Site, Uplink
>>> mesh = Mesh("acme")
>>> mesh.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp1", "192.0.2.1"), Uplink("lte", "198.51.100.7")]))
>>> mesh.add_site(Site("br1", subnets=["10.2.0.0/24"], uplinks=[Uplink("isp1", "203.0.113.9")]))
>>> [str(p) for p in mesh.paths("hq", "br1")]
['hq.isp1 -> br1.isp1', 'hq.lte -> br1.isp1']
"""

from __future__ import annotations

import bisect
import ipaddress
from typing import TYPE_CHECKING, Any

import attrs

from . import _validate as v
from .apps import BUILTIN_PROFILES, AppProfile
from .errors import ConfigError
from .model import Failover, Path, Policy, Site

if TYPE_CHECKING:
    from .policy import PolicyTable

__all__ = ["Mesh"]

SCHEMA_KEYS = {"name", "sites", "policies", "failover", "profiles"}


def _failover(value: Any) -> Failover:
    if not isinstance(value, Failover):
        raise ConfigError("Mesh.failover", value, "is not a Failover")
    return value


def _reaches(dst: str, site: Site) -> bool:
    """Does destination prefix ``dst`` overlap one of the site's subnets?"""
    net = ipaddress.ip_network(dst)
    return any(net.version == sn.version and net.overlaps(sn) for sn in map(ipaddress.ip_network, site.subnets))


@attrs.define(eq=True)
class Mesh:
    """A named set of sites joined by paths, with policies and failover settings.

    Equality compares everything ``to_dict`` holds (and a state file
    stores), so ``Mesh.from_dict(mesh.to_dict()) == mesh``. Files are the
    store's job: ``patronus.save_mesh(mesh, path)`` and
    ``patronus.load_mesh(path)``.
    """

    name: str = attrs.field(converter=lambda x: v.name("Mesh.name", x), on_setattr=attrs.setters.convert)
    failover: Failover = attrs.field(
        factory=Failover, converter=_failover, on_setattr=attrs.setters.convert
    )
    _sites: dict[str, Site] = attrs.field(factory=dict, init=False, repr=False)
    _policies: list[Policy] = attrs.field(factory=list, init=False, repr=False)
    _profiles: dict[str, AppProfile] = attrs.field(factory=dict, init=False, repr=False)
    # indexes for add_site's checks (O(log n) per site, not O(n)): uplink
    # address -> (site, uplink); per IP version, the sites' subnets as sorted,
    # disjoint (first, last, prefix, site) intervals
    _addrs: dict[str, tuple[str, str]] = attrs.field(factory=dict, init=False, repr=False, eq=False)
    _nets: dict[int, list[tuple[int, int, str, str]]] = attrs.field(factory=dict, init=False, repr=False, eq=False)

    def __repr__(self) -> str:
        return (
            f"Mesh(name={self.name!r}, sites={list(self._sites)!r}, "
            f"policies={[p.name for p in self._policies]!r}, paths={len(self.paths())})"
        )

    # -- sites ---------------------------------------------------------------

    @property
    def sites(self) -> tuple[Site, ...]:
        """The sites, in the order they were added."""
        return tuple(self._sites.values())

    def site(self, name: str) -> Site:
        """The site called ``name``; ConfigError when there is none."""
        try:
            return self._sites[name]
        except (KeyError, TypeError):
            raise ConfigError("site", name, f"is not a site of mesh {self.name!r}") from None

    def add_site(self, site: Site) -> None:
        """Add a site; its subnets must not overlap another site's, and its
        uplink addresses must not be another site's."""
        if not isinstance(site, Site):
            raise ConfigError("Mesh.add_site", site, "is not a Site")
        if site.name in self._sites:
            raise ConfigError("Site.name", site.name, "is a duplicate site name")
        for u in site.uplinks:
            if u.address in self._addrs:
                other_site, other_uplink = self._addrs[u.address]
                raise ConfigError("Uplink.address", u.address,
                                  f"of uplink {u.name!r} at site {site.name!r} is already the address of uplink "
                                  f"{other_uplink!r} at site {other_site!r}")
        mine = [ipaddress.ip_network(s) for s in site.subnets]
        for m in mine:
            hit = self._overlap(m)
            if hit is not None:
                raise ConfigError("Site.subnets", str(m), f"overlaps {hit[0]} of site {hit[1]!r}")
        self._sites[site.name] = site
        for u in site.uplinks:
            self._addrs[u.address] = (site.name, u.name)
        for m in mine:
            bisect.insort(self._nets.setdefault(m.version, []),
                          (int(m.network_address), int(m.broadcast_address), str(m), site.name))

    def _overlap(self, net: Any) -> tuple[str, str] | None:
        """(prefix, site) of a stored subnet overlapping ``net``, or None. The
        stored ones are disjoint prefixes, so only the last one starting at or
        before ``net``'s end can reach into it."""
        spans = self._nets.get(net.version, [])
        first, last = int(net.network_address), int(net.broadcast_address)
        i = bisect.bisect_right(spans, (last, 1 << 129)) - 1
        if i >= 0 and spans[i][1] >= first:
            return spans[i][2], spans[i][3]
        return None

    def remove_site(self, name: str) -> Site:
        """Remove and return a site. Path indexes of later sites shift.

        Refused (ConfigError naming the policy) while a forwarding policy's
        ``match.dst`` reaches this site and no other (it would send to
        nowhere), or while a policy prefers an uplink name only this site
        has: change or remove the policy first.
        """
        site = self.site(name)
        rest = [s for s in self._sites.values() if s.name != name]
        left = {u.name for s in rest for u in s.uplinks}
        for p in self._policies:
            dst = p.match.dst
            if p.action != "drop" and dst is not None and _reaches(dst, site) \
                    and not any(_reaches(dst, s) for s in rest):
                raise ConfigError("Mesh.remove_site", name,
                                  f"cannot be removed: policy {p.name!r} sends match.dst {dst} to this site and "
                                  "no other; remove or change the policy first")
            for n in p.prefer:
                if n not in left:
                    raise ConfigError("Mesh.remove_site", name,
                                      f"cannot be removed: policy {p.name!r} prefers uplink {n!r}, which no other "
                                      "site has; remove or change the policy first")
        del self._sites[name]
        for u in site.uplinks:
            self._addrs.pop(u.address, None)
        for version, spans in self._nets.items():
            self._nets[version] = [x for x in spans if x[3] != name]
        return site

    # -- paths ---------------------------------------------------------------

    def paths(self, a: str | None = None, b: str | None = None) -> list[Path]:
        """Paths of the full mesh: one per (uplink of a, uplink of b) pair.

        With no argument, every path of the mesh; with ``a`` alone, every path
        touching ``a`` (seen from ``a``); with both, the paths between them,
        seen from ``a``. Indexes run site pair by site pair in the order the
        later site was added, so adding a site only appends paths.
        """
        for n in (a, b):
            if n is not None:
                self.site(n)
        if a is not None and a == b:
            raise ConfigError("paths", b, "is the same site on both ends")
        out: list[Path] = []
        idx = 0
        sites = list(self._sites.values())
        for j, sj in enumerate(sites):
            for si in sites[:j]:
                for ui in si.uplinks:
                    for uj in sj.uplinks:
                        p = Path(idx, si.name, ui.name, sj.name, uj.name)
                        idx += 1
                        if a is None or (a == si.name and b in (None, sj.name)):
                            out.append(p)
                        elif a == sj.name and b in (None, si.name):
                            out.append(p.reverse())
        if a is not None:
            pos = {n: i for i, n in enumerate(self._sites)}
            out.sort(key=lambda p: (pos[p.remote_site], p.index))
        return out

    def path(self, path_id: str) -> Path:
        """The path with this id (e.g. "br1.isp1~hq.lte")."""
        for p in self.paths():
            if p.id == path_id:
                return p
        raise ConfigError("path", path_id, "is not a path of this mesh")

    # -- policies ------------------------------------------------------------

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The policies in the order they were added (evaluation follows priority)."""
        return tuple(self._policies)

    @property
    def profiles(self) -> dict[str, AppProfile]:
        """Built-in application profiles overlaid with this mesh's own."""
        return {**BUILTIN_PROFILES, **self._profiles}

    def add_profile(self, profile: AppProfile) -> None:
        """Add (or replace) an application profile policies can name in ``app``."""
        if not isinstance(profile, AppProfile):
            raise ConfigError("Mesh.add_profile", profile, "is not an AppProfile")
        self._profiles[profile.name] = profile

    def add_policy(self, policy: Policy) -> None:
        """Add a policy; names and priorities are unique within a mesh, and
        every ``prefer`` name is the name of an uplink of some site."""
        if not isinstance(policy, Policy):
            raise ConfigError("Mesh.add_policy", policy, "is not a Policy")
        for p in self._policies:
            if p.name == policy.name:
                raise ConfigError("Policy.name", policy.name, "is a duplicate policy name")
            if p.priority == policy.priority:
                raise ConfigError("Policy.priority", policy.priority, f"is already used by policy {p.name!r}")
        if policy.app not in self.profiles:
            raise ConfigError("Policy.app", policy.app, f"is not a known profile ({', '.join(sorted(self.profiles))})")
        uplinks = sorted({u.name for s in self._sites.values() for u in s.uplinks})
        for n in policy.prefer:
            if n not in uplinks:
                known = ", ".join(uplinks[:20]) + (", ..." if len(uplinks) > 20 else "") if uplinks else "none"
                raise ConfigError("Policy.prefer", n, f"of policy {policy.name!r} is not the name of an uplink of "
                                  f"any site (uplinks: {known}); add the sites first")
        self._policies.append(policy)

    def remove_policy(self, name: str) -> Policy:
        for i, p in enumerate(self._policies):
            if p.name == name:
                return self._policies.pop(i)
        raise ConfigError("policy", name, "is not a policy of this mesh")

    def policy_table(self) -> PolicyTable:
        """Compile the policies into the data plane's rule table, with the
        sites (their subnets decide each packet's destination site)."""
        from .policy import PolicyTable

        return PolicyTable(self._policies, sites=self.sites)

    # -- serialisation -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``Mesh.from_dict(m.to_dict()) == m``."""
        return {
            "name": self.name,
            "sites": [s.to_dict() for s in self._sites.values()],
            "policies": [p.to_dict() for p in self._policies],
            "failover": self.failover.to_dict(),
            "profiles": [p.to_dict() for p in self._profiles.values()],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Mesh:
        """Build and validate a mesh; ConfigError on any invalid part."""
        v.mapping("Mesh", d, SCHEMA_KEYS, {"name"})
        mesh = cls(d["name"])
        if d.get("failover") is not None:
            mesh.failover = Failover.from_dict(d["failover"])
        for p in v.sequence("Mesh.profiles", d.get("profiles", [])):
            mesh.add_profile(AppProfile.from_dict(p))
        for s in v.sequence("Mesh.sites", d.get("sites", [])):
            mesh.add_site(Site.from_dict(s))
        for p in v.sequence("Mesh.policies", d.get("policies", [])):
            mesh.add_policy(Policy.from_dict(p))
        return mesh
