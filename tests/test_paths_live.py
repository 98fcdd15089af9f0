"""Probes over real sockets: through the impairment relay on loopback and
across network namespaces, ICMP echo, path MTU, packet trains, and the
selector acting on what the monitor measured."""

from __future__ import annotations

import asyncio
import math
import os

import pytest

from patronus.lab import Impairment
from patronus.paths import Monitor, Responder, Selector

from .netns import sh, unique, veth_pair

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def wilson(k: int, n: int, z: float = 2.576) -> tuple[float, float]:
    """99 % Wilson score interval of a binomial proportion."""
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


async def sample_jitter(mon, pid, seconds, every=0.05):
    """RFC 3550's estimator follows each sample with gain 1/16; its average
    over time is what converges on the mean |delay difference|."""
    vals = []
    for _ in range(int(seconds / every)):
        await asyncio.sleep(every)
        j = mon.metrics(pid).jitter_ms
        if j == j:
            vals.append(j)
    return sum(vals[len(vals) // 4:]) / len(vals[len(vals) // 4:])  # skip the warm-up quarter


@pytest.fixture(params=["loopback", "netns"])
def wan(request):
    """Where the probes run: all on loopback, or monitor and relay in one
    namespace and the responder in another, across a veth pair."""
    if request.param == "loopback":
        yield {"ns_mon": None, "ns_resp": None, "mon_addr": "127.0.0.1", "resp_addr": "127.0.0.1"}
        return
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with veth_pair(unique("pw"), "10.93.0.1/24", "10.93.0.2/24") as v:
        yield {"ns_mon": v["ns_a"], "ns_resp": v["ns_b"], "mon_addr": v["addr_a"], "resp_addr": v["addr_b"]}


def test_delay_jitter_and_loss_through_the_relay(wan):
    async def main():
        async with Responder((wan["resp_addr"], 0), netns=wan["ns_resp"]) as resp:
            target = (wan["resp_addr"], resp.address[1])
            ns, here = wan["ns_mon"], (wan["mon_addr"], 0)
            async with Monitor(interval_ms=10, window=200) as mon:
                mon.add("base", remote=target, netns=ns)
                async with Impairment(here, target, delay_ms=30, netns=ns) as d, \
                        Impairment(here, target, delay_ms=20, jitter_ms=8, direction="forward", seed=3,
                                   netns=ns) as j, \
                        Impairment(here, target, loss_pct=10, direction="forward", seed=7, netns=ns) as lo:
                    mon.add("delay", remote=d.address, netns=ns)
                    mon.add("jitter", remote=j.address, netns=ns)
                    mon.add("loss", remote=lo.address, interval_ms=4, netns=ns)
                    jit = await sample_jitter(mon, "jitter", 4.0)
                    return mon.all_metrics(), jit, lo.stats()

    m, jit, lstats = run(main())
    base = m["base"].rtt_ms
    # 30 ms each way: 60 ms on top of the unimpaired round trip
    # a relay never delivers early (a timer may fire a millisecond or two
    # soon); a loaded VM only adds, so the upper bounds leave room
    assert -4 <= m["delay"].rtt_ms - base - 60 <= 30, (m["delay"].rtt_ms, base)
    assert 0.75 * 8 <= jit <= 8 * 1.75, jit
    assert m["jitter"].jitter_rev_ms < 4.0  # only the forward way was jittered (8 ms)
    lo = m["loss"]
    n = lo.received + lo.lost
    k = lo.lost
    assert n > 500 and lstats["forward"]["lost"] >= k  # every probe lost was dropped by the relay
    low, high = wilson(k, n)
    assert low <= 0.10 <= high, (k, n)


def test_impairment_changes_at_run_time_and_the_selector_follows():
    async def main():
        async with Responder(("127.0.0.1", 0)) as resp:
            async with Impairment(("127.0.0.1", 0), resp.address, delay_ms=5, seed=1) as a, \
                    Impairment(("127.0.0.1", 0), resp.address, delay_ms=15, seed=2) as b:
                async with Monitor(interval_ms=10, window=50) as mon:
                    mon.add("hq.a~br.x", remote=a.address)
                    mon.add("hq.b~br.x", remote=b.address)
                    sel = Selector(["voip"], hold_down_s=60)
                    sel.set_paths(["hq.a~br.x", "hq.b~br.x"], groups=["g", "g"])
                    await asyncio.sleep(0.6)
                    first = sel.update(mon.all_metrics())
                    a.set(loss_pct=20)  # path a turns lossy for voice
                    moved = []
                    for _ in range(40):
                        await asyncio.sleep(0.05)
                        moved += sel.update(mon.all_metrics())
                        if moved:
                            break
                    return first, moved, mon.metrics("hq.a~br.x")

    first, moved, ma = run(main())
    assert [d.path for d in first] == ["hq.a~br.x"]
    assert [d.path for d in moved] == ["hq.b~br.x"], ma
    assert moved[0].reason.startswith("hq.a~br.x: loss") and "> 1 % for voip" in moved[0].reason


def test_packet_train_sees_the_rate_limit_and_the_queue_drops_are_counted():
    async def main():
        async with Responder(("127.0.0.1", 0)) as resp:
            async with Impairment(("127.0.0.1", 0), resp.address, rate_kbps=4000, queue_ms=30,
                                  direction="forward") as wan:
                async with Monitor(interval_ms=100) as mon:
                    mon.add("p", remote=wan.address)
                    await asyncio.sleep(0.2)
                    est = [await mon.packet_train("p", count=20, size=1200) for _ in range(3)]
                    burst = await mon.packet_train("p", count=60, size=1200)
                    return sorted(est)[1], burst, wan.stats()

    est, burst, stats = run(main())
    assert abs(est - 4.0) <= 0.25 * 4.0, est
    # 60 x 1200 bytes need 144 ms at 4 Mbit/s; the 30 ms queue holds about 13
    assert stats["forward"]["queue_drops"] > 30 and burst == burst


@needs_root
def test_probes_and_icmp_across_namespaces_and_path_mtu():
    tag = unique("pq")
    with veth_pair(tag, "10.91.0.1/24", "10.91.0.2/24") as v:
        # a path whose MTU is 1400 somewhere in the middle and that drops
        # bigger packets silently (a PMTUD black hole: only DF probing finds it)
        sh("nft", "add table inet pmtu; add chain inet pmtu in { type filter hook prerouting priority -300; }; "
           "add rule inet pmtu in ip length > 1400 drop", ns=v["ns_b"])

        async def main():
            async with Responder(("0.0.0.0", 0), netns=v["ns_b"]) as resp:
                target = (v["addr_b"], resp.address[1])
                async with Impairment((v["addr_a"], 0), target, delay_ms=10, netns=v["ns_a"]) as wan:
                    async with Monitor(interval_ms=20, window=50) as mon:
                        mon.add("udp", remote=wan.address, netns=v["ns_a"])
                        mon.add("direct", remote=target, netns=v["ns_a"])
                        mon.add("icmp", remote=(v["addr_b"], 0), method="icmp", netns=v["ns_a"])
                        await asyncio.sleep(1.0)
                        mtu = await mon.probe_mtu("direct", lo=576, hi=1500)
                        return mon.all_metrics(), mtu, resp.answered

        m, mtu, answered = run(main())
    assert -2 <= m["udp"].rtt_ms - m["direct"].rtt_ms - 20 <= 20  # 10 ms each way, loose above (load)
    assert m["icmp"].received >= 30 and m["icmp"].loss_pct == 0 and m["icmp"].rtt_ms < 50
    assert answered >= 60
    assert mtu == 1400 == m["direct"].mtu and m["udp"].mtu is None


@needs_root
def test_unprivileged_icmp_datagram_socket_when_the_group_is_allowed():
    tag = unique("pi")
    with veth_pair(tag, "10.92.0.1/24", "10.92.0.2/24") as v:
        sh("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647", ns=v["ns_a"])

        async def main():
            async with Monitor(interval_ms=20) as mon:
                mon.add("icmp", remote=(v["addr_b"], 0), method="icmp", netns=v["ns_a"])
                await asyncio.sleep(0.5)
                raw = mon._icmp[(v["ns_a"], 2)].raw
                return mon.metrics("icmp"), raw

        m, raw = run(main())
    assert not raw and m.received >= 10 and m.loss_pct == 0


def test_duplicates_and_reordering_are_counted_as_the_relay_made_them():
    async def main():
        async with Responder(("127.0.0.1", 0)) as resp:
            async with Impairment(("127.0.0.1", 0), resp.address, duplicate_pct=20, reorder_pct=15,
                                  direction="reverse", seed=11) as wan:
                async with Monitor(interval_ms=5, window=500) as mon:
                    mon.add("p", remote=wan.address)
                    await asyncio.sleep(1.5)
                    m = mon.metrics("p")
                    return m, wan.stats()["reverse"]

    m, st = run(main())
    assert st["duplicated"] > 20 and st["reordered"] > 15
    # every duplicate the relay sent reaches the monitor as one; a held packet
    # arrives after the next one and is counted reordered by its sequence
    assert st["forwarded"] == st["received"] + st["duplicated"]
    assert m.duplicates == st["duplicated"]
    assert abs(m.reordered - st["reordered"]) <= 2 and m.lost == 0


def test_ipv6_udp_and_icmp_probes_on_loopback():
    async def main():
        async with Responder(("::1", 0)) as resp:
            async with Monitor(interval_ms=20) as mon:
                mon.add("v6", remote=("::1", resp.address[1]))
                mon.add("v6icmp", remote=("::1", 0), method="icmp")
                await asyncio.sleep(0.5)
                return mon.metrics("v6"), mon.metrics("v6icmp")

    try:
        u, i = run(main())
    except Exception as e:  # a machine without IPv6 on loopback
        if "Cannot assign requested address" in str(e) or "Address family" in str(e):
            pytest.skip(f"no IPv6 here: {e}")
        raise
    assert u.received >= 10 and u.loss_pct == 0
    assert i.received >= 10 and i.loss_pct == 0
