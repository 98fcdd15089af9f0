"""FRR's bfdd as a real BFD peer inside a test's network namespace: zebra
and bfdd started from /usr/lib/frr with their sockets in a private
directory owned by user frr (the recipe in shared DESIGN.md), always
stopped again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

FRR = Path("/usr/lib/frr")


def available() -> str | None:
    """Why FRR cannot run here, or None."""
    if os.geteuid() != 0:
        return "FRR in a namespace needs root"
    if not (FRR / "bfdd").exists() or not shutil.which("vtysh"):
        return "FRR is not installed (apt-get install frr)"
    return None


class Bfdd:
    def __init__(self, ns: str, workdir: Path) -> None:
        self.ns, self.dir = ns, workdir

    def vtysh(self, *cmds: str) -> str:
        args = ["vtysh", "--vty_socket", str(self.dir), "-d", "bfdd"]
        for c in cmds:
            args += ["-c", c]
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout
        except subprocess.TimeoutExpired:  # bfdd busy (e.g. loading hundreds of peers)
            return ""

    def peers(self) -> list[dict]:
        out = self.vtysh("show bfd peers json")
        return json.loads(out) if out.strip() else []

    def peer(self, addr: str) -> dict | None:
        return next((p for p in self.peers() if p.get("peer") == addr), None)

    def status(self, addr: str) -> str | None:
        p = self.peer(addr)
        return p.get("status") if p else None

    def wait_status(self, addr: str, want: str, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.status(addr) == want:
                return True
            time.sleep(0.05)
        return False

    def cpu_seconds(self) -> float:
        """bfdd's CPU time so far (user + system), from /proc."""
        pid = int((self.dir / "bfdd.pid").read_text().strip())
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def configure(self, *lines: str) -> None:
        self.vtysh("configure terminal", *lines)


def peer_config(peer: str, local: str, tx_ms: int = 50, rx_ms: int = 50, mult: int = 3) -> str:
    return (f"bfd\n peer {peer} local-address {local}\n  receive-interval {rx_ms}\n"
            f"  transmit-interval {tx_ms}\n  detect-multiplier {mult}\n !\n!\n")


@contextlib.contextmanager
def bfdd(ns: str, config: str) -> Iterator[Bfdd]:
    """zebra + bfdd in namespace ``ns`` with bfdd configuration ``config``."""
    work = Path(tempfile.mkdtemp(prefix="pn-frr-"))
    shutil.chown(work, "frr", "frr")
    (work / "zebra.conf").write_text("")
    (work / "bfdd.conf").write_text(config)
    for f in work.iterdir():
        shutil.chown(f, "frr", "frr")
    common = ["-d", "-P", "0", "--vty_socket", str(work), "-z", str(work / "zserv.api")]
    try:
        subprocess.run(["ip", "netns", "exec", ns, str(FRR / "zebra"), *common, "-f", str(work / "zebra.conf"),
                        "-i", str(work / "zebra.pid")], check=True, capture_output=True, timeout=20)
        for _ in range(100):
            if (work / "zserv.api").exists():
                break
            time.sleep(0.05)
        subprocess.run(["ip", "netns", "exec", ns, str(FRR / "bfdd"), *common, "-f", str(work / "bfdd.conf"),
                        "-i", str(work / "bfdd.pid"), "--bfdctl", str(work / "bfdd.sock")],
                       check=True, capture_output=True, timeout=20)
        d = Bfdd(ns, work)
        end = time.monotonic() + 60
        while time.monotonic() < end and not d.vtysh("show bfd peers").strip():
            time.sleep(0.05)
        yield d
    finally:
        for name in ("bfdd.pid", "zebra.pid"):
            with contextlib.suppress(Exception):
                os.kill(int((work / name).read_text().strip()), signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
