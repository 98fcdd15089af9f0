"""The operator's reconcile handlers against a real controller (``patronus
controller run`` over TLS on loopback, tests/controller_server.py), called
with the keyword arguments kopf passes (spec, meta, status, name, namespace,
patch=kopf.Patch(), logger, retry), the resulting status patches asserted
exactly: create, update, adoption, delete (twice; a site a policy still
needs), a validation error, a controller outage and its end, the status
timer with no agent and with one that reports. The API key is an
``operator`` one, the least role that may write sites and policies.
"""

from __future__ import annotations

import copy
import itertools
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

kopf = pytest.importorskip("kopf")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from patronus import client as pc  # noqa: E402
from patronus.operator import reconcile as rc  # noqa: E402
from patronus.operator.pool import ControllerPool, routes_from_events  # noqa: E402
from patronus.operator.reconcile import CONDITION_TYPES, Reconciler, set_conditions  # noqa: E402

from .controller_server import Controller, running_controller  # noqa: E402

pytestmark = pytest.mark.slow

PREFIX = "/api/v1"
LOG = logging.getLogger("test.operator")
T0, T1, T2 = "2025-01-01T00:00:00Z", "2025-01-01T00:01:00Z", "2025-01-01T00:02:00Z"
_n = itertools.count(1)


# -- fixtures ----------------------------------------------------------------------------------------


def make_keys(ctl: Controller) -> Controller:
    """An API key of role operator for the reconciler (``ctl.key``) and an admin one for the test's own
    checks (``ctl.admin_key``), made with one admin login."""
    token = ctl.login("admin", ctl.admin_password)["access_token"]
    with ctl.client(token) as c:
        for attr, role in (("key", "operator"), ("admin_key", "admin")):
            r = c.post(f"{PREFIX}/api-keys", json={"name": f"{role}-{next(_n)}", "role": role})
            assert r.status_code == 201, r.text
            setattr(ctl, attr, str(r.json()["secret"]))
    return ctl


def admin(ctl: Controller) -> pc.Controller:
    return pc.Controller(ctl.url, api_key=ctl.admin_key, verify=ctl.cert)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    with running_controller(tmp_path_factory.mktemp("operator") / "ctl") as s:
        yield make_keys(s)


class Clock:
    """The conditions' time: set by the test (lastTransitionTime is then exact)."""

    def __init__(self, now: str = T0) -> None:
        self.now = now

    def __call__(self) -> str:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rec(srv: Controller, clock: Clock) -> Iterator[Reconciler]:
    pool = ControllerPool(srv.url, api_key=srv.key, verify=srv.cert)  # type: ignore[attr-defined]
    r = Reconciler(pool, clock=clock, live_ttl_s=0.0)
    yield r
    pool.close()


def body(name: str, spec: dict[str, Any], *, generation: int = 1, status: dict[str, Any] | None = None,
         retry: int = 0, kind: str = "Site", reason: str | None = None) -> dict[str, Any]:
    """The keyword arguments kopf passes a handler for this resource."""
    meta = {"name": name, "namespace": "default", "generation": generation, "uid": f"uid-{name}",
            "resourceVersion": str(next(_n))}
    st_ = copy.deepcopy(status or {})
    full = {"apiVersion": "sdwan.patronus.dev/v1", "kind": kind, "metadata": meta, "spec": spec, "status": st_}
    return {"body": full, "spec": spec, "meta": meta, "status": st_, "name": name, "namespace": "default",
            "uid": meta["uid"], "patch": kopf.Patch(), "logger": LOG, "retry": retry, "param": None,
            "reason": reason}


def site_spec(n: int, *, uplinks: int = 1) -> dict[str, Any]:
    """A site's spec in the model's dict form, without the name."""
    return {"subnets": [f"10.{60 + n // 250}.{n % 250}.0/24"],
            "uplinks": [{"name": f"isp{u}", "address": f"198.{18 + u}.{60 + n // 250}.{n % 250 + 1}", "mtu": 1500,
                         "port": None, "nat": False, "bandwidth_mbps": None, "cost": 0} for u in range(uplinks)]}


def policy_spec(n: int, **kw: Any) -> dict[str, Any]:
    d = {"match": {"src": None, "dst": None, "src_ports": None, "dst_ports": f"{10000 + n}-{10100 + n}", "proto": 17,
                   "dscp": None},
         "priority": 1000 + n, "app": "voip", "qos": {"dscp": 46, "rate_kbps": None, "duplicate": False},
         "prefer": [], "action": "forward"}
    d.update(kw)
    return d


def conditions(statuses: dict[str, tuple[str, str, str]], when: dict[str, str] | str, gen: int) -> list[dict[str, Any]]:
    times = when if isinstance(when, dict) else dict.fromkeys(CONDITION_TYPES, when)
    return [{"type": t, "status": statuses[t][0], "reason": statuses[t][1], "message": statuses[t][2],
             "lastTransitionTime": times[t], "observedGeneration": gen} for t in CONDITION_TYPES]


def ok(reason: str, msg: str) -> dict[str, tuple[str, str, str]]:
    return {"Ready": ("True", "Reconciled", msg), "Synced": ("True", reason, msg),
            "Degraded": ("False", "NoErrors", "the last reconciliation succeeded")}


def status_after(kw: dict[str, Any]) -> dict[str, Any]:
    """The status the object has once kopf applied the handler's patch (a merge patch)."""
    out = copy.deepcopy(kw["status"])
    for k, v in kw["patch"].get("status", {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = copy.deepcopy(v)
    return out


# -- create, update, adopt ---------------------------------------------------------------------------


def test_create_site(srv: Controller, rec: Reconciler) -> None:
    n = next(_n)
    name, spec = f"op-s{n}", site_spec(n, uplinks=2)
    kw = body(name, spec)
    assert rec.apply("Site", **kw) is None
    msg = f"created site {name!r} on the controller"
    assert dict(kw["patch"]) == {"status": {"observedGeneration": 1,
                                            "conditions": conditions(ok("Created", msg), T0, 1)}}
    with admin(srv) as c:
        assert c.site(name).to_dict() == {"name": name, **spec}


def test_create_policy(srv: Controller, rec: Reconciler) -> None:
    n = next(_n)
    name, spec = f"op-p{n}", policy_spec(n)
    kw = body(name, spec, generation=3)
    rec.apply("Policy", **kw)
    msg = f"created policy {name!r} on the controller"
    assert dict(kw["patch"]) == {"status": {"observedGeneration": 3,
                                            "conditions": conditions(ok("Created", msg), T0, 3)}}
    with admin(srv) as c:
        assert c.policy(name).to_dict() == {"name": name, **spec}


def test_update_then_resume(srv: Controller, rec: Reconciler, clock: Clock) -> None:
    n = next(_n)
    name, spec = f"op-s{n}", site_spec(n)
    kw = body(name, spec)
    rec.apply("Site", **kw)
    # a spec change: generation 2, the status as the first patch left it
    spec2 = site_spec(n, uplinks=2)
    clock.now = T1
    kw2 = body(name, spec2, generation=2, status=status_after(kw))
    rec.apply("Site", **kw2)
    msg = f"replaced site {name!r} on the controller with this spec"
    # statuses unchanged: lastTransitionTime stays T0; observedGeneration follows the generation
    assert dict(kw2["patch"]) == {"status": {"observedGeneration": 2,
                                             "conditions": conditions(ok("Updated", msg), T0, 2)}}
    with admin(srv) as c:
        assert c.site(name).to_dict() == {"name": name, **spec2}
    # the operator restarts (resume) with nothing changed: nothing is written to the controller
    kw3 = body(name, spec2, generation=2, status=status_after(kw2))
    rec.apply("Site", **kw3)
    assert kw3["patch"]["status"]["conditions"][1]["reason"] == "UpToDate"
    assert kw3["patch"]["status"]["conditions"][1]["message"] == f"site {name!r} on the controller matches the spec"


def test_adopt_existing_objects(srv: Controller, rec: Reconciler) -> None:
    n = next(_n)
    name = f"op-s{n}"
    with admin(srv) as c:   # made on the controller by someone else, with other uplinks
        c.add_site({"name": name, **site_spec(n, uplinks=2)})
    spec = site_spec(n, uplinks=1)
    kw = body(name, spec, reason="create")   # kopf's create cause: the resource was just made
    rec.apply("Site", **kw)
    msg = f"adopted site {name!r}, which the controller had already: replaced it with this resource's spec"
    assert dict(kw["patch"]) == {"status": {"observedGeneration": 1,
                                            "conditions": conditions(ok("Adopted", msg), T0, 1)}}
    with admin(srv) as c:
        assert c.site(name).to_dict() == {"name": name, **spec}
    # a policy the controller has already, equal to the spec: adopted without a write
    p = f"op-p{n}"
    with admin(srv) as c:
        c.add_policy({"name": p, **policy_spec(n)})
    kw = body(p, policy_spec(n))
    rec.apply("Policy", **kw)
    assert kw["patch"]["status"]["conditions"][1] == {
        "type": "Synced", "status": "True", "reason": "Adopted", "lastTransitionTime": T0, "observedGeneration": 1,
        "message": f"adopted policy {p!r}, which the controller had already (equal to the spec)"}


# -- refusals -------------------------------------------------------------------------------------------


def test_validation_error_is_permanent_and_names_the_field(srv: Controller, rec: Reconciler) -> None:
    n = next(_n)
    name = f"op-s{n}"
    spec = site_spec(n)
    spec["subnets"] = ["10.0.0.1/8"]
    kw = body(name, spec)
    with pytest.raises(kopf.PermanentError) as e:
        rec.apply("Site", **kw)
    detail = "Site.subnets: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"
    assert str(e.value) == detail
    assert dict(kw["patch"]) == {"status": {"observedGeneration": 1, "conditions": conditions({
        "Ready": ("False", "Invalid", f"syncing site {name!r} failed: {detail}"),
        "Synced": ("False", "Invalid", detail),
        "Degraded": ("True", "Invalid", detail)}, T0, 1)}}
    with admin(srv) as c, pytest.raises(pc.NotFound):
        c.site(name)

    # a policy priority out of range: the same, naming Policy.priority
    p = f"op-p{n}"
    kw = body(p, policy_spec(n, priority=2**31))
    with pytest.raises(kopf.PermanentError, match=r"^Policy\.priority: "):
        rec.apply("Policy", **kw)
    conds = kw["patch"]["status"]["conditions"]
    assert [(c["type"], c["status"], c["reason"]) for c in conds] == [
        ("Ready", "False", "Invalid"), ("Synced", "False", "Invalid"), ("Degraded", "True", "Invalid")]
    assert conds[2]["message"].startswith("Policy.priority: 2147483648 ")

    # a name in spec is refused before anything is sent (the name is metadata.name)
    kw = body(f"op-s{next(_n)}", {**site_spec(n), "name": "other"})
    with pytest.raises(kopf.PermanentError, match=r"^spec\.name: 'other' must be left out"):
        rec.apply("Site", **kw)


def test_conflicting_priority_is_retried(srv: Controller, rec: Reconciler) -> None:
    n = next(_n)
    rec.apply("Policy", **body(f"op-p{n}", policy_spec(n)))
    kw = body(f"op-p{n}b", policy_spec(n + 500, priority=1000 + n), retry=1)
    with pytest.raises(kopf.TemporaryError) as e:
        rec.apply("Policy", **kw)
    assert e.value.delay == 10.0
    synced = kw["patch"]["status"]["conditions"][1]
    assert (synced["status"], synced["reason"]) == ("False", "Conflict")
    assert f"priority {1000 + n} is already used by policy 'op-p{n}'" in synced["message"]
    assert synced["message"].endswith("; retrying in 10 s")


# -- delete --------------------------------------------------------------------------------------------


def test_delete_twice(srv: Controller, rec: Reconciler) -> None:
    n = next(_n)
    name = f"op-s{n}"
    kw = body(name, site_spec(n))
    rec.apply("Site", **kw)
    for _ in range(2):   # the second finds nothing to remove: success as well
        d = body(name, site_spec(n), status=status_after(kw))
        assert rec.delete("Site", **d) is None
        assert dict(d["patch"]) == {}
    with admin(srv) as c, pytest.raises(pc.NotFound):
        c.site(name)


def test_delete_site_a_policy_needs(srv: Controller, rec: Reconciler) -> None:
    n = next(_n)
    s, p = f"op-s{n}", f"op-p{n}"
    sspec = site_spec(n)
    rec.apply("Site", **body(s, sspec))
    rec.apply("Policy", **body(p, policy_spec(n, match={**policy_spec(n)["match"], "dst": sspec["subnets"][0]})))
    kw = body(s, sspec, status={"observedGeneration": 1, "conditions": conditions(ok("Created", "x"), T0, 1)})
    with pytest.raises(kopf.TemporaryError) as e:
        rec.delete("Site", **kw)
    assert e.value.delay == 5.0
    conds = kw["patch"]["status"]["conditions"]
    why = f"cannot be removed: policy {p!r} sends match.dst {sspec['subnets'][0]} to this site and no other"
    assert [(c["type"], c["status"], c["reason"]) for c in conds] == [
        ("Ready", "False", "Conflict"), ("Synced", "False", "Conflict"), ("Degraded", "False", "Transient")]
    assert why in conds[1]["message"] and conds[1]["message"].endswith("; retrying in 5 s")
    with admin(srv) as c:
        assert c.site(s).name == s   # still there
    # the policy goes first; then the site's deletion succeeds
    rec.delete("Policy", **body(p, {}))
    d = body(s, sspec, status=status_after(kw), retry=1)
    rec.delete("Site", **d)
    with admin(srv) as c, pytest.raises(pc.NotFound):
        c.site(s)


# -- outage ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_controller_outage(tmp_path: Path, clock: Clock) -> None:
    ctl = Controller(tmp_path / "ctl", listen=f"127.0.0.1:{_free_port()}")
    ctl.start()
    try:
        pool = ControllerPool(ctl.url, api_key=make_keys(ctl).key, verify=ctl.cert, timeout=5.0)  # type: ignore[attr-defined]
        rec = Reconciler(pool, clock=clock, live_ttl_s=0.0)
        kw = body("hq", site_spec(1))
        rec.apply("Site", **kw)
        up = status_after(kw)

        ctl.stop()
        clock.now = T1
        kw = body("hq", site_spec(1, uplinks=2), generation=2, status=up, retry=3)
        with pytest.raises(kopf.TemporaryError) as e:
            rec.apply("Site", **kw)
        assert e.value.delay == 40.0
        conds = kw["patch"]["status"]["conditions"]
        assert kw["patch"]["status"]["observedGeneration"] == 2
        assert [(c["type"], c["status"], c["reason"], c["lastTransitionTime"]) for c in conds] == [
            ("Ready", "False", "ControllerUnavailable", T1), ("Synced", "False", "ControllerUnavailable", T1),
            ("Degraded", "False", "Transient", T0)]   # Degraded was False already: no transition
        assert conds[1]["message"].startswith(f"cannot reach the controller at {ctl.url}: ConnectError: ")
        assert conds[1]["message"].endswith("; retrying in 40 s")
        down = status_after(kw)

        ctl.start()   # same state directory, same port
        clock.now = T2
        kw = body("hq", site_spec(1, uplinks=2), generation=2, status=down, retry=4)
        rec.apply("Site", **kw)
        msg = "replaced site 'hq' on the controller with this spec"
        assert dict(kw["patch"]) == {"status": {"observedGeneration": 2, "conditions": conditions(
            ok("Updated", msg), {"Ready": T2, "Synced": T2, "Degraded": T0}, 2)}}
        pool.close()
    finally:
        ctl.stop()


def test_controller_replicas_fail_over(srv: Controller, clock: Clock) -> None:
    """The first address refuses connections: the next one is used, and stays the first choice."""
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        pool = ControllerPool(f"https://127.0.0.1:{dead.getsockname()[1]},{srv.url}",
                              api_key=srv.key, verify=srv.cert)  # type: ignore[attr-defined]
        rec = Reconciler(pool, clock=clock)
        n = next(_n)
        kw = body(f"op-s{n}", site_spec(n))
        rec.apply("Site", **kw)
        assert kw["patch"]["status"]["conditions"][1]["reason"] == "Created"
        assert pool.url == srv.url
        pool.close()


def test_wrong_api_key_is_unauthorized(srv: Controller, clock: Clock) -> None:
    pool = ControllerPool(srv.url, api_key="pnk_0000000000000000_notakey", verify=srv.cert)
    rec = Reconciler(pool, clock=clock)
    kw = body("op-nokey", site_spec(999))
    with pytest.raises(kopf.TemporaryError) as e:
        rec.apply("Site", **kw)
    assert e.value.delay == rc.AUTH_DELAY_S
    conds = kw["patch"]["status"]["conditions"]
    assert [(c["type"], c["status"], c["reason"]) for c in conds] == [
        ("Ready", "False", "Unauthorized"), ("Synced", "False", "Unauthorized"), ("Degraded", "True", "Unauthorized")]
    assert "notakey" not in repr(kw["patch"])
    pool.close()


# -- the status timer ---------------------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Controller]:
    """A controller of its own: a mesh with only this test's sites."""
    with running_controller(tmp_path / "ctl") as s:
        yield make_keys(s)


def test_status_timer(fresh: Controller, clock: Clock) -> None:
    pool = ControllerPool(fresh.url, api_key=fresh.key, verify=fresh.cert)  # type: ignore[attr-defined]
    rec = Reconciler(pool, clock=clock, live_ttl_s=0.0)
    specs = {"hq": site_spec(1, uplinks=2), "br": site_spec(2, uplinks=1)}
    state = {}
    for name, spec in specs.items():
        kw = body(name, spec)
        rec.apply("Site", **kw)
        state[name] = status_after(kw)
    pspec = policy_spec(1, prefer=["isp1"])
    kw = body("voip", pspec)
    rec.apply("Policy", **kw)
    state["voip"] = status_after(kw)

    # no agent: the sites are Pending, their paths unknown (so not up), the policy has no route
    kw = body("hq", specs["hq"], status=state["hq"])
    assert rec.refresh("Site", **kw) is None
    assert dict(kw["patch"]) == {"status": {"state": "Pending", "uplinks": 2, "paths": 2, "pathsUp": 0}}
    kw = body("voip", pspec, status=state["voip"])
    rec.refresh("Policy", **kw)
    assert dict(kw["patch"]) == {"status": {"routes": [], "routesOmitted": 0}}
    # a resource the controller does not have (its apply failed): Absent
    kw = body("gone", site_spec(3))
    rec.refresh("Site", **kw)
    assert dict(kw["patch"]) == {"status": {"state": "Absent", "uplinks": 0, "paths": 0, "pathsUp": 0}}

    # an agent of hq enrols and reports: BFD up on one path, voip placed on it towards br
    with fresh.client(fresh.admin_key) as c:  # type: ignore[attr-defined]
        paths = c.get(f"{PREFIX}/paths").raise_for_status().json()["items"]
        tok = c.post(f"{PREFIX}/tokens", json={"site": "hq"}).raise_for_status().json()["token"]
    with fresh.client(tok) as c:
        cred = c.post(f"{PREFIX}/agent/enrol", json={"interval_s": 30}).raise_for_status().json()["credential"]
    voice = next(p["id"] for p in paths if "hq.isp1" in p["id"])
    other = next(p["id"] for p in paths if p["id"] != voice)
    now = time.time()
    with fresh.client(cred) as c:
        r = c.post(f"{PREFIX}/agent/telemetry", json={"site": "hq", "events": [
            {"ts": now, "reason": "bfd_up", "to_path": voice},
            {"ts": now, "reason": "initial", "policy": "voip", "site": "br", "to_path": other},
            {"ts": now + 0.1, "reason": "reroute", "policy": "voip", "site": "br", "from_path": other,
             "to_path": voice}]})
        assert r.status_code == 200, r.text
    kw = body("hq", specs["hq"], status={**state["hq"], "state": "Pending", "uplinks": 2, "paths": 2, "pathsUp": 0})
    rec.refresh("Site", **kw)
    assert dict(kw["patch"]) == {"status": {"state": "Active", "pathsUp": 1}}   # only what changed
    kw = body("voip", pspec, status=state["voip"])
    rec.refresh("Policy", **kw)
    assert dict(kw["patch"]) == {"status": {"currentPath": voice, "routesOmitted": 0,
                                            "routes": [{"site": "hq", "remoteSite": "br", "path": voice}]}}

    # drift: the site is removed on the controller behind the resource's back; the timer puts it back
    with admin(fresh) as c:
        c.remove_site("br")
    clock.now = T1
    kw = body("br", specs["br"], status=state["br"])
    rec.refresh("Site", **kw)
    msg = "drift corrected: created site 'br' on the controller"
    # (the path hq.isp1-br.isp0 is the same path again: its last report, BFD up, still stands)
    assert dict(kw["patch"]) == {"status": {"observedGeneration": 1, "conditions": conditions(ok("Created", msg), T0, 1),
                                            "state": "Pending", "uplinks": 1, "paths": 2, "pathsUp": 1}}
    with admin(fresh) as c:
        assert c.site("br").to_dict() == {"name": "br", **specs["br"]}
    pool.close()


def test_status_timer_keeps_the_status_while_the_controller_is_away(clock: Clock) -> None:
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        pool = ControllerPool(f"https://127.0.0.1:{dead.getsockname()[1]}", api_key="pnk_x", verify=False)
        seen = []
        rec = Reconciler(pool, clock=clock, observe=lambda *a: seen.append(a[:3]))
        kw = body("hq", site_spec(1), status={"state": "Active"})
        assert rec.refresh("Site", **kw) is None
        assert dict(kw["patch"]) == {}
        assert seen == [("Site", "refresh", "temporary_error")]
        pool.close()


# -- pure parts ------------------------------------------------------------------------------------------


_status = st.sampled_from(["True", "False", "Unknown"])
_time = st.sampled_from([T0, T1, "2024-06-30T12:00:00Z"])
_cond = st.fixed_dictionaries({"type": st.sampled_from([*CONDITION_TYPES, "Other"]), "status": _status,
                               "reason": st.sampled_from(["A", "B"]), "message": st.text(max_size=5),
                               "lastTransitionTime": _time})
_old = st.one_of(st.none(), st.lists(st.one_of(_cond, st.integers(), st.just({"type": None})), max_size=8))
_new = st.dictionaries(st.sampled_from(CONDITION_TYPES),
                       st.tuples(_status, st.sampled_from(["A", "B"]), st.text(max_size=2000)))


@settings(max_examples=300, deadline=None)
@given(_old, _new, st.one_of(st.none(), st.integers(0, 2**40)))
def test_conditions_property(old: Any, new: dict[str, tuple[str, str, str]], gen: int | None) -> None:
    now = "2030-01-01T00:00:00Z"
    out = set_conditions(old, new, generation=gen, now=now)
    assert [c["type"] for c in out] == list(CONDITION_TYPES)   # exactly one per type, in order
    first = {}
    for c in old or ():
        if isinstance(c, dict) and c.get("type") in CONDITION_TYPES:
            first.setdefault(c["type"], c)
    for c in out:
        prev = first.get(c["type"])
        if c["type"] in new:
            assert (c["status"], c["reason"]) == new[c["type"]][:2]
            assert len(c["message"]) <= rc.MAX_MESSAGE
        elif prev is not None:
            assert c["status"] == prev["status"]
        else:
            assert c["status"] == "Unknown"
        changed = prev is None or prev["status"] != c["status"]
        # lastTransitionTime moves iff the status changed
        assert (c["lastTransitionTime"] == now) if changed else (c["lastTransitionTime"] == prev["lastTransitionTime"])
        assert c.get("observedGeneration") == gen
    # applying the same again changes no time
    again = set_conditions(out, new, generation=gen, now="2031-01-01T00:00:00Z")
    assert [c["lastTransitionTime"] for c in again] == [c["lastTransitionTime"] for c in out]


def test_routes_and_summary() -> None:
    evs = [{"policy": "voip", "site": "b", "from_path": None, "to_path": "a.x~b.y"},
           {"policy": "voip", "site": "a", "from_path": None, "to_path": "a.x~b.y"},
           {"policy": "voip", "site": "c", "from_path": None, "to_path": "a.x~c.z"},
           {"policy": "voip", "site": "a", "from_path": "a.x~c.z", "to_path": None},
           {"policy": "(default)", "site": "b", "from_path": None, "to_path": "a.x~b.y"}]
    routes = routes_from_events(evs)
    assert routes == {"voip": [{"site": "a", "remoteSite": "b", "path": "a.x~b.y"},
                               {"site": "a", "remoteSite": "c", "path": "a.x~c.z"},
                               {"site": "b", "remoteSite": "a", "path": "a.x~b.y"},
                               {"site": "c", "remoteSite": "a", "path": ""}]}
    assert rc.policy_status("voip", {"voip": {}}, routes)["currentPath"] == "a.x~b.y (+2 more)"
    many = {"voip": [{"site": f"s{i}", "remoteSite": "x", "path": "p"} for i in range(rc.MAX_ROUTES + 5)]}
    out = rc.policy_status("voip", {"voip": {}}, many)
    assert (len(out["routes"]), out["routesOmitted"], out["currentPath"]) == (rc.MAX_ROUTES, 5, "p")


def test_classify_bounds_error_types() -> None:
    assert rc.error_type(pc.InvalidInput("x: y", field="x")) == "InvalidInput"
    assert rc.error_type(httpx.ConnectError("refused")) == "ConnectError"
    assert rc.error_type(KeyError("boom")) == "Other"
    f = rc.classify(pc.RateLimited("slow down", retry_after=7.0, status=429))
    assert (f.reason, f.delay, f.permanent) == ("RateLimited", 7.0, False)
    f = rc.classify(pc.Forbidden("role 'viewer' may not sites.write", status=403))
    assert (f.reason, f.degraded, f.delay) == ("Forbidden", True, rc.AUTH_DELAY_S)
