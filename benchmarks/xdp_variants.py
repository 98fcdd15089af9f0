"""Compare two builds of bpf/patronus_xdp.c, interleaved in one process.

On this VM a single run of the XDP benchmark swings by 30 %, so a change of
a few ns per packet only shows when both builds are loaded at once and run
in alternation, round after round; the per-round difference is what to read.
Variants are copies of the program with a change, or with an early
``return XDP_PASS`` to time a prefix of the path.

    .venv/bin/python benchmarks/xdp_variants.py hit  A.c B.c [--policies 1000]
    .venv/bin/python benchmarks/xdp_variants.py miss A.c B.c [--policies 10000] [--flows-log2 16]

"hit" repeats one frame of a known flow (20,000 runs a round, 61 rounds);
"miss" builds with PN_BENCH_NEW_FLOWS (every run a new flow) and runs each
of 30 frames 2,000 times, twice, flushing the flow table first. Needs root.
Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patronus.dataplane.xdp as xdp  # noqa: E402
from patronus._sources import source_dirs  # noqa: E402
from conftest import make_table, make_traffic  # noqa: E402


def load(src: Path, table, flows_log2: int, new_flows: bool) -> xdp.Xdp:
    """An Xdp built from ``src`` instead of bpf/patronus_xdp.c (through
    PATRONUS_SRC: a source tree whose bpf/ holds ``src``)."""
    d = Path(tempfile.mkdtemp(prefix="pn_variant_"))
    bpf_dir, csrc = source_dirs()
    (d / "bpf").mkdir()
    shutil.copy(src, d / "bpf" / "patronus_xdp.c")
    shutil.copy(bpf_dir / "patronus_tc.c", d / "bpf")
    (d / "csrc").symlink_to(csrc)
    saved = os.environ.get("PATRONUS_SRC")
    os.environ["PATRONUS_SRC"] = str(d)
    try:
        x = xdp.Xdp(table, flow_capacity=1 << flows_log2, _bench_new_flows=new_flows)
    finally:
        if saved is None:
            del os.environ["PATRONUS_SRC"]
        else:
            os.environ["PATRONUS_SRC"] = saved
    x.steering = False
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("hit", "miss"))
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--policies", type=int, default=None)
    ap.add_argument("--flows-log2", type=int, default=16)
    args = ap.parse_args()
    n = args.policies or (1_000 if args.mode == "hit" else 10_000)
    table = make_table(max(n, 10))
    frames = make_traffic(max(n, 10), 4000, 4000).frames
    a, b = (load(s, table, args.flows_log2, args.mode == "miss") for s in (args.a, args.b))
    rows = []
    try:
        if args.mode == "hit":
            hot = frames[0]
            a.test_run([hot])
            b.test_run([hot])
            a.steering = b.steering = False
            for _ in range(61):
                rows.append((a.bench(hot, 20_000, floor=True), a.bench(hot, 20_000), b.bench(hot, 20_000)))
        else:
            for f in frames[:30]:
                for _ in range(2):
                    floor = a.bench(f, 2_000, floor=True)
                    a.drain(flush=True)
                    ta = a.bench(f, 2_000)
                    b.drain(flush=True)
                    rows.append((floor, ta, b.bench(f, 2_000)))
    finally:
        a.close()
        b.close()
    r = np.array(rows)
    d = r[:, 2] - r[:, 1]
    print(f"{args.mode}, {n} policies: floor median {np.median(r[:, 0]):.0f} ns | "
          f"A {args.a.name} median {np.median(r[:, 1]):.0f} min {r[:, 1].min():.0f} | "
          f"B {args.b.name} median {np.median(r[:, 2]):.0f} min {r[:, 2].min():.0f} | "
          f"B - A per round: median {np.median(d):+.0f}, quartiles {np.percentile(d, 25):+.0f} "
          f"{np.percentile(d, 75):+.0f} ns")


if __name__ == "__main__":
    main()
