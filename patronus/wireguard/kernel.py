"""The kernel WireGuard backend: the same reconcile as the UAPI backend
(``uapi.diff`` decides what changes), sent over generic netlink with
pyroute2's ``WireGuard``. Use it where the wireguard module is loaded;
``Backend.for_interface`` picks UAPI when a wireguard-go socket exists.

Verified here: the translation of the reconcile into pyroute2's calls
(``to_netlink``) and the named error when the kernel has no wireguard
module (this machine has none, so the netlink exchange itself is exercised
only where the module exists).

>>> from patronus.wireguard.keys import PrivateKey
>>> k, p = PrivateKey.generate(), PrivateKey.generate().public_key()
>>> dev, peers = to_netlink([f"private_key={k.hex}", "listen_port=51820", f"public_key={p.hex}",
...                          "endpoint=192.0.2.1:51820", "replace_allowed_ips=true", "allowed_ip=10.0.0.0/24"])
>>> dev["listen_port"], peers[0]["endpoint_addr"], peers[0]["allowed_ips"]
(51820, '192.0.2.1', ['10.0.0.0/24'])
"""

from __future__ import annotations

import base64
import os
from typing import Any

from .config import InterfaceConfig, parse_endpoint
from .uapi import SOCKET_DIR, DeviceState, PeerState, Uapi, UapiError, diff
from .keys import PresharedKey, PublicKey

__all__ = ["Kernel", "Backend", "to_netlink"]


def _b64(hexkey: str) -> str:
    return base64.b64encode(bytes.fromhex(hexkey)).decode()


def to_netlink(lines: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """UAPI ``set`` lines -> (device kwargs, peer dicts) for pyroute2's WireGuard.set."""
    dev: dict[str, Any] = {}
    peers: list[dict[str, Any]] = []
    for line in lines:
        key, _, value = line.partition("=")
        if key == "public_key":
            peers.append({"public_key": _b64(value)})
        elif not peers:
            if key == "private_key":
                dev["private_key"] = _b64(value)
            elif key in ("listen_port", "fwmark"):
                dev[key] = int(value)
        else:
            p = peers[-1]
            if key in ("remove", "update_only", "replace_allowed_ips"):
                p[key] = value == "true"
            elif key == "preshared_key":
                p["preshared_key"] = _b64(value)
            elif key == "endpoint":
                host, port = parse_endpoint(value)
                p["endpoint_addr"], p["endpoint_port"] = host, port
            elif key == "persistent_keepalive_interval":
                p["persistent_keepalive"] = int(value)
            elif key == "allowed_ip":
                p.setdefault("allowed_ips", []).append(value)
    return dev, peers


class Kernel:
    """One kernel WireGuard interface, read and reconciled over netlink."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        try:
            from pyroute2 import WireGuard
        except ImportError:
            raise UapiError("the kernel backend needs pyroute2 (pip install pyroute2)") from None
        try:
            self._wg = WireGuard()
        except Exception as e:  # no 'wireguard' generic netlink family: no module
            raise UapiError(f"the kernel has no WireGuard support ({e}): modprobe wireguard, or use wireguard-go "
                            "and the UAPI backend") from None

    _available: bool | None = None

    @classmethod
    def available(cls) -> bool:
        """Whether this kernel serves WireGuard interfaces (pyroute2 and the
        module are there); asked once per process."""
        if cls._available is None:
            try:
                cls("").close()
                cls._available = True
            except UapiError:
                cls._available = False
        return cls._available

    def close(self) -> None:
        """Close the netlink socket."""
        self._wg.close()

    def get(self) -> DeviceState:
        """The interface's configuration and peers; UapiError when it is not a WireGuard interface."""
        try:
            (msg,) = self._wg.info(self.ifname)
        except UapiError:
            raise
        except Exception as e:  # pyroute2's NetlinkError: no such interface, or not WireGuard
            raise UapiError(f"{self.ifname}: {e}") from None
        dev = DeviceState()
        pk = msg.get_attr("WGDEVICE_A_PRIVATE_KEY")
        dev.private_key_hex = base64.b64decode(pk).hex() if pk else None
        dev.listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or 0
        dev.fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or 0
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            pub = PublicKey(base64.b64decode(peer.get_attr("WGPEER_A_PUBLIC_KEY")))
            st = PeerState(pub)
            ep = peer.get_attr("WGPEER_A_ENDPOINT")
            if ep:
                st.endpoint = f"[{ep['addr']}]:{ep['port']}" if ":" in ep["addr"] else f"{ep['addr']}:{ep['port']}"
            psk = peer.get_attr("WGPEER_A_PRESHARED_KEY")
            if psk and any(base64.b64decode(psk)):
                st.preshared_key = PresharedKey(base64.b64decode(psk))
            st.persistent_keepalive = peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0
            st.allowed_ips = tuple(f"{a['addr']}" for a in (peer.get_attr("WGPEER_A_ALLOWEDIPS") or []))
            dev.peers[pub] = st
        return dev

    def apply(self, cfg: InterfaceConfig) -> list[str]:
        """Reconcile the interface with ``cfg`` (only what differs); returns the UAPI lines it amounted to."""
        lines = diff(self.get(), cfg)
        dev, peers = to_netlink(lines)
        if dev:
            self._wg.set(self.ifname, **dev)
        for p in peers:
            self._wg.set(self.ifname, peer=p)
        return lines


class Backend:
    """The interface both backends share: ``get()`` and ``apply(cfg)``."""

    @staticmethod
    def for_interface(ifname: str) -> Uapi | Kernel:
        """UAPI when a userspace implementation serves the interface, else the kernel."""
        if os.path.exists(os.path.join(SOCKET_DIR, f"{ifname}.sock")):
            return Uapi(ifname)
        return Kernel(ifname)

    @staticmethod
    def exists(ifname: str, *, kernel: bool = True) -> bool:
        """Whether a working WireGuard interface ``ifname`` is there: wireguard-go
        answering on its socket, or (with ``kernel``, where the kernel has
        WireGuard) a kernel interface."""
        if not os.path.exists(os.path.join(SOCKET_DIR, f"{ifname}.sock")) and not (kernel and Kernel.available()):
            return False
        try:
            backend = Backend.for_interface(ifname)
        except UapiError:
            return False
        try:
            backend.get()
            return True
        except UapiError:
            return False
        finally:
            if isinstance(backend, Kernel):
                backend.close()
