"""Steering, tc half: bpf/patronus_tc.c at clsact ingress of an interface
copies the path the XDP program wrote into the packet metadata into
``skb->mark`` (and writes the policy's DSCP), for ``ip rule fwmark`` to pick
the path's routing table, and clones the packets of duplicating (policy,
site) pairs to a second tunnel. Attached with iproute2's tc through a pinned
program, since BCC attaches only XDP and kprobes natively.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._sources import source_dirs
from ..errors import DataplaneUnavailable
from ._bpf import Libbpf, captured_stderr, import_bcc, mount_bpffs

__all__ = ["TcSteering", "load_sched_cls", "attach_ingress", "detach_ingress", "DUP_ENTRIES"]

DUP_ENTRIES = 65536   # (policy, site) pairs that may duplicate at once


class TcSteering:
    """The tc program of one interface: loaded, pinned on bpffs and attached
    at clsact ingress (direct action); ``close()`` detaches and unpins it.
    ``mark_base`` + path slot is the mark; ``npol`` is policies + 1."""

    def __init__(self, lib: Libbpf, ifname: str, mark_base: int, npol: int,
                 compiled: tuple[Any, Any] | None = None) -> None:
        """``compiled``: what :meth:`compile` made for the same ``mark_base`` and ``npol`` (the
        compile is the slow part: about a second)."""
        self.ifname, self._npol = ifname, npol
        self._prog, fn = compiled or self.compile(mark_base, npol)
        self._pin = attach_ingress(lib, self._prog, fn, ifname, "patronus_tc")
        self._dups: dict[tuple[int, int], int] = {}

    @staticmethod
    def compile(mark_base: int, npol: int) -> tuple[Any, Any]:
        """The program compiled and loaded, not attached: (BCC module, function)."""
        return load_sched_cls("patronus_tc.c", "pn_tc_mark", "tc steering program",
                              [f"-DPN_MARK_BASE={mark_base}", f"-DPN_NPOL={npol}", f"-DPN_DUP_ENTRIES={DUP_ENTRIES}"])

    def write_dscp(self, values: Sequence[int]) -> None:
        """DSCP + 1 to write per policy + 1 (0: leave the packet's own)."""
        m: Any = self._prog[b"pn_dscp_map"]
        for i in range(self._npol):
            m[m.Key(i)] = m.Leaf(int(values[i]))

    def write_dups(self, dups: dict[tuple[int, int], int]) -> None:
        """(policy + 1, site column) -> ifindex of the tunnel that gets a
        copy; pairs not given stop duplicating."""
        m: Any = self._prog[b"pn_dup_map"]
        for key in set(self._dups) - set(dups):
            del m[m.Key(*key)]
        for key, ifindex in dups.items():
            if self._dups.get(key) != ifindex:
                m[m.Key(*key)] = m.Leaf(ifindex)
        self._dups = dict(dups)

    def dup_counts(self) -> Any:
        """Per policy + 1: (copies sent, copies the kernel refused), summed over CPUs."""
        m: Any = self._prog[b"pn_dup_count"]
        out = []
        for i in range(self._npol):
            vals = m[m.Key(i)]
            out.append((sum(v.packets for v in vals), sum(v.bytes for v in vals)))
        return out

    def close(self) -> None:
        detach_ingress(self.ifname, self._pin)
        self._prog.cleanup()


def load_sched_cls(source: str, func: str, what: str, cflags: list[str]) -> tuple[Any, Any]:
    """Compile bpf/``source`` with BCC and load ``func`` as a tc classifier."""
    bcc = import_bcc()
    bpf_dir, csrc = source_dirs()
    with captured_stderr() as log:
        try:
            prog = bcc.BPF(text=(bpf_dir / source).read_text().encode(), cflags=[f"-I{csrc}", *cflags])
            fn = prog.load_func(func.encode(), bcc.BPF.SCHED_CLS)
        except Exception as e:
            raise DataplaneUnavailable(f"the {what} did not load: {e} {log.read()[-500:]}",
                                       "check the verifier log") from None
    return prog, fn


def attach_ingress(lib: Libbpf, prog: Any, fn: Any, ifname: str, name: str, *, cleanup: bool = True) -> Path:
    """Pin ``fn`` on bpffs and attach it at clsact ingress of ``ifname``
    (direct action); the pin path, for ``detach_ingress``. On failure the
    error names the command (and with ``cleanup`` the program is unloaded)."""
    mount_bpffs()
    pin = Path(f"/sys/fs/bpf/{name}_{os.getpid()}_{ifname}")
    pin.unlink(missing_ok=True)
    try:
        lib.pin(fn.fd, pin)
    except DataplaneUnavailable:
        if cleanup:
            prog.cleanup()
        raise
    for cmd in (["tc", "qdisc", "replace", "dev", ifname, "clsact"],
                ["tc", "filter", "replace", "dev", ifname, "ingress", "prio", "1", "handle", "1", "bpf", "da",
                 "object-pinned", str(pin)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            pin.unlink(missing_ok=True)
            if cleanup:
                prog.cleanup()
            raise DataplaneUnavailable(f"{' '.join(cmd)}: {r.stderr.strip()}", "is iproute2's tc installed?")
    return pin


def detach_ingress(ifname: str, pin: Path) -> None:
    subprocess.run(["tc", "filter", "del", "dev", ifname, "ingress", "prio", "1", "handle", "1", "bpf"],
                   capture_output=True)
    subprocess.run(["tc", "qdisc", "del", "dev", ifname, "clsact"], capture_output=True)
    pin.unlink(missing_ok=True)
