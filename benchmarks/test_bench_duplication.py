"""Voice loss with and without duplication over 20 cuts of the primary
uplink, side by side in one lab (2 sites x 2 uplinks, wireguard-go, XDP +
tc steering at s0, de-duplication at s1): voice at 200 packets/s, each cut
400 ms followed by 400 ms of health. Reported: packets lost and delivered
twice with duplication (goal: 0 and 0) and lost without it, in the same run.

Run: .venv/bin/python -m pytest benchmarks/test_bench_duplication.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from patronus.lab.net import Lab
from tests.netns import require_xdp, unique
from tests.test_duplication import CUT_S, HEAL_S, Helper, stream

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("wireguard-go"),
                                reason="needs root and wireguard-go")
CUTS = int(os.environ.get("PN_DUP_CUTS", "20"))


def test_voice_loss_with_and_without_duplication(benchmark, tmp_path):
    require_xdp()
    lab = Lab(unique("B")[:6], sites=2, uplinks=2, state_dir=tmp_path)
    steer = dedup = None
    try:
        lab.up()
        paths = lab.mesh.paths("s0", "s1")
        primary = next(p for p in paths if p.local_uplink == "u0" and p.remote_uplink == "u0")
        second = next(p for p in paths if p.local_uplink == "u1" and p.remote_uplink == "u1")
        lab.steer_tables(0, 1)
        lab.force_path(primary.id)
        steer = Helper(lab.site_ns(0), "steer_agent.py", f"{lab.tag}l0",
                       json.dumps({"voip": primary.index, "bulk": primary.index}))
        dedup = Helper(lab.site_ns(1), "dedup_agent.py",
                       lab.tunnels[("s1", primary.index)].ifname, lab.tunnels[("s1", second.index)].ifname)

        def cuts() -> None:
            time.sleep(0.5)
            for _ in range(CUTS):
                lab.set_loss(0, 0, 100)
                time.sleep(CUT_S)
                lab.set_loss(0, 0, 0)
                time.sleep(HEAL_S)

        seconds = 0.5 + CUTS * (CUT_S + HEAL_S) + 0.5
        out = {}
        for on in (True, False):
            assert steer.ask(f"dup voip {lab.tunnels[('s0', second.index)].ifname if on else '-'}") == "ok"
            sent, got = stream(lab, seconds, cuts)
            out["on" if on else "off"] = {"sent": sent, "lost": sent - len(set(got)), "twice": len(got) - len(set(got))}
        far = json.loads(dedup.ask("stats"))
    finally:
        for h in (steer, dedup):
            if h is not None:
                h.close()
        lab.down()
    benchmark.extra_info.update({f"{k}_{m}": v for k, d in out.items() for m, v in d.items()})
    benchmark.extra_info.update(far)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nvoice over {CUTS} cuts of {CUT_S * 1000:.0f} ms: with duplication {out['on']['sent']} sent, "
          f"{out['on']['lost']} lost, {out['on']['twice']} delivered twice; without {out['off']['sent']} sent, "
          f"{out['off']['lost']} lost (far end: {far})")
