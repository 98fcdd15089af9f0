"""One site's network, realised on the host: a WireGuard tunnel per path
(wireguard-go or the kernel's), the marks and routing tables that send
each tunnel out of its uplink and each steered packet into its path, and
the site's signed announcement. The production agent and the lab both
use it; it knows nothing of either.
"""

from __future__ import annotations

from .realiser import (UPLINK_MARK, UPLINK_RULE_PRIORITY, UPLINK_TABLE, WIREGUARD_MODES, IpRunner, SiteRealiser,
                       announcement, ip_runner, path_table, uplink_index, uplink_route)

__all__ = ["SiteRealiser", "IpRunner", "UPLINK_MARK", "UPLINK_TABLE", "UPLINK_RULE_PRIORITY", "WIREGUARD_MODES",
           "announcement", "ip_runner", "path_table", "uplink_index", "uplink_route"]
