"""The controller's desired state for a 1,000-site full mesh (499,500 site
pairs): computed for every site and diffed after a policy change, next to
the baseline it cannot avoid, enumerating the mesh's paths once
(``Mesh.paths()``). Goal (issue 17): computed and diffed in under 1 s.

Run: .venv/bin/python -m pytest benchmarks/test_bench_controller.py --benchmark-only
"""

from __future__ import annotations

import time

import pytest

from patronus import Match, Mesh, Policy, Site, Uplink
from patronus.agent import diff

agents = pytest.importorskip("patronus.controller.agents")

SITES = 1000


def big_mesh(n: int = SITES) -> Mesh:
    m = Mesh("big")
    for i in range(n):
        m.add_site(Site(f"s{i}", subnets=[f"10.{i // 250}.{i % 250}.0/24"],
                        uplinks=[Uplink("isp", f"100.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}")]))
    m.add_policy(Policy("voip", Match(proto="udp", dst_ports=5060), priority=10, app="voip"))
    return m


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return big_mesh()


def test_desired_state_all_sites(benchmark, mesh):
    states = benchmark.pedantic(agents.desired_states, args=(mesh,), rounds=3, iterations=1)
    assert len(states) == SITES and len(states["s0"]["paths"]) == SITES - 1
    # baseline, measured in the same run: every path of the mesh, once, from the mesh itself
    t0 = time.perf_counter()
    n = len(mesh.paths())
    benchmark.extra_info["baseline_mesh_paths_s"] = round(time.perf_counter() - t0, 3)
    assert n == SITES * (SITES - 1) // 2


def test_policy_change_diffed_for_all_sites(benchmark, mesh):
    before = agents.desired_states(mesh)
    changed = big_mesh()
    changed.add_policy(Policy("web", Match(proto="tcp", dst_ports=443), priority=20))

    def recompute_and_diff():
        after = agents.desired_states(changed)
        return [diff(before[s], after[s]) for s in after]

    deltas = benchmark.pedantic(recompute_and_diff, rounds=3, iterations=1)
    assert all(len(d) == 1 and d[0]["item"] == "web" for d in deltas)
