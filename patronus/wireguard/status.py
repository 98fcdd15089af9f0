"""Site status from what the tunnels say: a path is up while its peer's
latest handshake is recent (WireGuard re-handshakes every 2 minutes while
traffic flows, and keepalives keep NATed paths busy), and optionally while
the path monitor sees it alive.

>>> from patronus.wireguard.uapi import DeviceState, PeerState
>>> from patronus.wireguard.keys import PrivateKey
>>> pk = PrivateKey.generate().public_key()
>>> fresh = DeviceState(peers={pk: PeerState(pk, last_handshake_ns=950 * 10**9)})
>>> stale = DeviceState(peers={pk: PeerState(pk, last_handshake_ns=1 * 10**9)})
>>> site_status({"br": {"p1": fresh, "p2": stale}}, now_s=1000.0)
{'br': 'Degraded'}
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["path_up", "site_status", "HANDSHAKE_FRESH_S"]

HANDSHAKE_FRESH_S = 180.0  # REKEY_AFTER_TIME (120 s) + REKEY_TIMEOUT margin


def path_up(dev: object, now_s: float, fresh_s: float = HANDSHAKE_FRESH_S) -> bool:
    peers = getattr(dev, "peers", {})
    return any(p.last_handshake_ns and now_s - p.last_handshake_ns / 1e9 <= fresh_s for p in peers.values())


def site_status(devices: Mapping[str, Mapping[str, object]], now_s: float, alive: Mapping[str, bool] | None = None,
                fresh_s: float = HANDSHAKE_FRESH_S) -> dict[str, str]:
    """{remote site: Active | Degraded | Inactive} from each path's device
    state ({site: {path_id: DeviceState}}); ``alive`` (path id -> bool, from
    the path monitor) can mark a path down even with a fresh handshake."""
    out = {}
    for site, paths in devices.items():
        ups = [path_up(d, now_s, fresh_s) and (alive or {}).get(pid, True) for pid, d in paths.items()]
        out[site] = "Active" if ups and all(ups) else "Degraded" if any(ups) else "Inactive"
    return out
