"""Steering, tc half: bpf/patronus_tc.c at clsact ingress of an interface
copies the path the XDP program wrote into the packet metadata into
``skb->mark`` (and writes the policy's DSCP), for ``ip rule fwmark`` to pick
the path's routing table. Attached with iproute2's tc through a pinned
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

__all__ = ["TcSteering"]


class TcSteering:
    """The tc program of one interface: loaded, pinned on bpffs and attached
    at clsact ingress (direct action); ``close()`` detaches and unpins it.
    ``mark_base`` + path slot is the mark; ``npol`` is policies + 1."""

    def __init__(self, lib: Libbpf, ifname: str, mark_base: int, npol: int) -> None:
        bcc = import_bcc()
        bpf_dir, csrc = source_dirs()
        self.ifname, self._npol = ifname, npol
        with captured_stderr() as log:
            try:
                self._prog = bcc.BPF(text=(bpf_dir / "patronus_tc.c").read_text().encode(),
                                     cflags=[f"-I{csrc}", f"-DPN_MARK_BASE={mark_base}", f"-DPN_NPOL={npol}"])
                fn = self._prog.load_func(b"pn_tc_mark", bcc.BPF.SCHED_CLS)
            except Exception as e:
                raise DataplaneUnavailable(f"the tc steering program did not load: {e} {log.read()[-500:]}",
                                           "check the verifier log") from None
        mount_bpffs()
        self._pin = Path(f"/sys/fs/bpf/patronus_tc_{os.getpid()}_{ifname}")
        self._pin.unlink(missing_ok=True)
        try:
            lib.pin(fn.fd, self._pin)
        except DataplaneUnavailable:
            self._prog.cleanup()
            raise
        for cmd in (["tc", "qdisc", "replace", "dev", ifname, "clsact"],
                    ["tc", "filter", "replace", "dev", ifname, "ingress", "prio", "1", "handle", "1", "bpf", "da",
                     "object-pinned", str(self._pin)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                self._pin.unlink(missing_ok=True)
                self._prog.cleanup()
                raise DataplaneUnavailable(f"{' '.join(cmd)}: {r.stderr.strip()}", "is iproute2's tc installed?")

    def write_dscp(self, values: Sequence[int]) -> None:
        """DSCP + 1 to write per policy + 1 (0: leave the packet's own)."""
        m: Any = self._prog[b"pn_dscp_map"]
        for i in range(self._npol):
            m[m.Key(i)] = m.Leaf(int(values[i]))

    def close(self) -> None:
        subprocess.run(["tc", "filter", "del", "dev", self.ifname, "ingress", "prio", "1", "handle", "1", "bpf"],
                       capture_output=True)
        subprocess.run(["tc", "qdisc", "del", "dev", self.ifname, "clsact"], capture_output=True)
        self._pin.unlink(missing_ok=True)
        self._prog.cleanup()
