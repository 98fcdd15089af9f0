"""The cross-platform WireGuard UAPI (wireguard-go, boringtun): read the
device over its unix socket and reconcile it with a wanted configuration,
changing only the difference.

Protocol (https://www.wireguard.com/xplatform/): ``get=1\\n\\n`` returns
``key=value`` lines (keys in hex; a peer block starts at ``public_key=``)
ending in ``errno=0`` and a blank line; ``set=1\\n...\\n\\n`` applies
changes, ``errno=0`` on success.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, PatronusError
from .config import InterfaceConfig, PeerConfig, format_endpoint, parse_endpoint
from .keys import PresharedKey, PublicKey

__all__ = ["Uapi", "DeviceState", "PeerState", "WireguardGo", "UapiError", "SOCKET_DIR"]

SOCKET_DIR = "/var/run/wireguard"


class UapiError(PatronusError):
    """The device refused a request, or its socket is gone."""


@dataclass
class PeerState:
    public_key: PublicKey
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] = ()
    persistent_keepalive: int = 0
    preshared_key: PresharedKey | None = None
    last_handshake_ns: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass
class DeviceState:
    private_key_hex: str | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[PublicKey, PeerState] = field(default_factory=dict)


def _errno_text(value: str) -> str:
    """``-98`` -> ``errno=-98 EADDRINUSE, address in use``: UAPI replies carry
    a negated errno."""
    try:
        n = abs(int(value))
    except ValueError:
        return f"errno={value}"
    name = errno.errorcode.get(n)
    text = os.strerror(n).lower().replace("already ", "")
    return f"errno={value} {name}, {text}" if name else f"errno={value}"


def _parse_get(text: str) -> DeviceState:
    dev = DeviceState()
    peer: PeerState | None = None
    for line in text.splitlines():
        if not line:
            continue
        key, _, value = line.partition("=")
        if key == "errno":
            if value != "0":
                raise UapiError(f"get failed ({_errno_text(value)})")
            continue
        if key == "public_key":
            peer = PeerState(PublicKey(bytes.fromhex(value)))
            dev.peers[peer.public_key] = peer
        elif peer is None:
            if key == "private_key":
                dev.private_key_hex = value
            elif key == "listen_port":
                dev.listen_port = int(value)
            elif key == "fwmark":
                dev.fwmark = int(value)
        elif key == "preshared_key":
            peer.preshared_key = None if set(value) == {"0"} else PresharedKey(bytes.fromhex(value))
        elif key == "endpoint":
            peer.endpoint = format_endpoint(*parse_endpoint(value))
        elif key == "allowed_ip":
            peer.allowed_ips += (value,)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = int(value)
        elif key == "last_handshake_time_sec":
            peer.last_handshake_ns += int(value) * 1_000_000_000
        elif key == "last_handshake_time_nsec":
            peer.last_handshake_ns += int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
    return dev


class Uapi:
    """One device's UAPI socket (``SOCKET_DIR/IFNAME.sock``)."""

    def __init__(self, ifname: str, sock_dir: str = SOCKET_DIR) -> None:
        self.ifname = ifname
        self.path = os.path.join(sock_dir, f"{ifname}.sock")

    def _talk(self, request: str) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(self.path)
                s.sendall(request.encode())
                buf = b""
                while not buf.endswith(b"\n\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:
            raise UapiError(f"{self.ifname}: UAPI socket {self.path}: {e.strerror or e}") from None
        return buf.decode()

    def get(self) -> DeviceState:
        return _parse_get(self._talk("get=1\n\n"))

    def set(self, lines: list[str]) -> None:
        if not lines:
            return
        reply = self._talk("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")
        if "errno=0" not in reply:
            m = re.search(r"errno=(-?\d+)", reply)
            if m is None:
                raise UapiError(f"{self.ifname}: set refused ({reply.strip() or 'no reply'})")
            why = _errno_text(m.group(1))
            if abs(int(m.group(1))) == errno.EADDRINUSE:
                port = next((x.partition("=")[2] for x in lines if x.startswith("listen_port=")), None)
                why += (f": listen port {port} is taken by another socket in this network namespace"
                        if port else ": its listen port is taken")
                why += (" (another WireGuard device? a lab with tunnels of its own holds the ports its site "
                        "agents need: `patronus lab up --agents` makes none)")
            raise UapiError(f"{self.ifname}: set refused ({why})")

    def apply(self, cfg: InterfaceConfig) -> list[str]:
        """Reconcile the device with ``cfg``: only what differs is sent, stale
        peers are removed, nothing is sent when nothing differs (the tunnel is
        never bounced). Returns the UAPI lines sent (private key redacted)."""
        have = self.get()
        lines = diff(have, cfg)
        self.set(lines)
        return [("private_key=<redacted>" if x.startswith("private_key=") else
                 "preshared_key=<redacted>" if x.startswith("preshared_key=") else x) for x in lines]


def diff(have: DeviceState, want: InterfaceConfig) -> list[str]:
    """The UAPI ``set`` lines that turn ``have`` into ``want``."""
    out: list[str] = []
    if have.private_key_hex != want.private_key.hex:
        out.append(f"private_key={want.private_key.hex}")
    if want.listen_port is not None and have.listen_port != want.listen_port:
        out.append(f"listen_port={want.listen_port}")
    if have.fwmark != want.fwmark:
        out.append(f"fwmark={want.fwmark}")
    wanted = {p.public_key: p for p in want.peers}
    for key in have.peers:
        if key not in wanted:
            out += [f"public_key={key.hex}", "remove=true"]
    for key, p in wanted.items():
        cur = have.peers.get(key)
        changes = _peer_changes(cur, p)
        if cur is None:
            out += [f"public_key={key.hex}", *changes]
        elif changes:
            out += [f"public_key={key.hex}", "update_only=true", *changes]
    return out


def _peer_changes(cur: PeerState | None, p: PeerConfig) -> list[str]:
    out = []
    psk = p.preshared_key
    if cur is None or cur.preshared_key != psk:
        out.append(f"preshared_key={psk.hex if psk else '0' * 64}")
    if p.endpoint and (cur is None or cur.endpoint != p.endpoint):
        out.append(f"endpoint={p.endpoint}")
    if cur is None or cur.persistent_keepalive != p.persistent_keepalive:
        out.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
    if cur is None or sorted(cur.allowed_ips) != sorted(p.allowed_ips):
        out.append("replace_allowed_ips=true")
        out += [f"allowed_ip={a}" for a in p.allowed_ips]
    return out


class WireguardGo:
    """A wireguard-go process serving one interface (in a network namespace),
    run in the foreground so it is ours to stop. Interface names must be
    unique across namespaces: the UAPI sockets share one directory."""

    def __init__(self, ifname: str, netns: str | None = None) -> None:
        if len(ifname) > 15:
            raise ConfigError("ifname", ifname, "is longer than 15 characters")
        self.ifname, self.netns = ifname, netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.uapi = Uapi(ifname)

    def start(self, timeout: float = 10.0) -> WireguardGo:
        exe = shutil.which("wireguard-go")
        if exe is None:
            raise UapiError("wireguard-go is not installed (apt-get install wireguard-go)")
        if os.path.exists(self.uapi.path):
            raise ConfigError("ifname", self.ifname, f"is in use ({self.uapi.path} exists)")
        cmd = (["ip", "netns", "exec", self.netns] if self.netns else []) + [exe, "-f", self.ifname]
        env = {**os.environ, "LOG_LEVEL": "error"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        end = time.monotonic() + timeout
        while not os.path.exists(self.uapi.path):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise UapiError(f"wireguard-go {self.ifname} exited: {err.strip()[-300:]}")
            if time.monotonic() > end:
                self.stop()
                raise UapiError(f"wireguard-go {self.ifname}: no UAPI socket after {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        try:
            os.unlink(self.uapi.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> WireguardGo:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
