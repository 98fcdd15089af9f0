"""A hostile agent against the real controller (uvicorn over TLS in a
subprocess): forged, replayed, stale, unauthorized and malformed
announcements; another site's, revoked, spliced and malformed credentials;
reused and foreign enrolment tokens; oversized and malformed telemetry.

Each is refused by name (status, and the ``reason`` or ``field`` of the
problem details) and nothing it sent is stored: the tables it could write
(agent_announcements, agent_nonces, agent_telemetry, agent_credentials,
agent_tokens in the controller database; path_metrics and failover_events
in the state file) are read, read-only, before and after, and the peers
another site's agent gets in its desired state are unchanged.
Refused announcements are audited with ok false.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import ssl
import time
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
websockets = pytest.importorskip("websockets")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from patronus.controller.agents import MAX_ANNOUNCEMENT, MAX_TELEMETRY_BYTES, MAX_TELEMETRY_ITEMS  # noqa: E402
from patronus.controller.app import PREFIX  # noqa: E402
from patronus.wireguard.discovery import Announcement, SignedAnnouncement, SigningKey  # noqa: E402

from .test_controller_agents import AgentController, enrol, make_token, problem  # noqa: E402

pytestmark = pytest.mark.slow

SUBNETS = {"hq": "10.201.0.0/24", "br1": "10.202.0.0/24", "br2": "10.203.0.0/24"}
PATH = "br1.isp1~hq.isp1"          # a path of br1 (and of hq)
NOT_MINE = "br2.isp1~hq.isp1"      # a path of br2 and hq, not of br1
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@dataclass
class Agent:
    site: str
    id: str
    credential: str
    signer: SigningKey


def new_agent(ctl: AgentController, site: str, **body: Any) -> Agent:
    signer = SigningKey.generate()
    r = enrol(ctl, make_token(ctl, site)["token"], signing_key=b64(signer.public_bytes), **body)
    assert r.status_code == 201, r.text
    return Agent(site, r.json()["id"], r.json()["credential"], signer)


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = AgentController(tmp_path_factory.mktemp("hostile") / "state")
    c.start()
    try:
        with c.admin() as a:
            for i, (name, net) in enumerate(SUBNETS.items()):
                a.post(f"{PREFIX}/sites", json={"name": name, "subnets": [net], "uplinks": [
                    {"name": "isp1", "address": f"198.18.{i}.1"}, {"name": "lte", "address": f"198.19.{i}.1"}]}
                       ).raise_for_status()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def hq(ctl: AgentController) -> Agent:
    return new_agent(ctl, "hq")


@pytest.fixture(scope="module")
def br1(ctl: AgentController) -> Agent:
    """The hostile agent (a genuine br1 credential and key, used badly)."""
    return new_agent(ctl, "br1")


@pytest.fixture(scope="module")
def br2(ctl: AgentController) -> Agent:
    """The observer: another site, whose desired state lists the peers."""
    return new_agent(ctl, "br2")


def ann(site: str, *, subnets: list[str] | None = None, ts: float | None = None) -> Announcement:
    return Announcement.make(site, wg_public_key=b64(os.urandom(32)), subnets=subnets or [SUBNETS[site]],
                             uplinks=[{"name": "isp1", "address": "198.51.100.7", "port": 51820}], ts=ts)


def payload(signed: SignedAnnouncement) -> dict[str, str]:
    return {"body": b64(signed.body), "signature": b64(signed.signature or b""), "key": b64(signed.key or b"")}


def post_announce(ctl: AgentController, agent: Agent, body: dict[str, Any]) -> httpx.Response:
    with ctl.client(agent.credential) as c:
        return c.post(f"{PREFIX}/agent/announce", json=body)


def stored(ctl: AgentController) -> dict[str, list[tuple[Any, ...]]]:
    """Everything an agent's request could have written, besides its last contact."""
    return {
        "announcements": ctl.rows("SELECT * FROM agent_announcements ORDER BY site"),
        "nonces": ctl.rows("SELECT * FROM agent_nonces ORDER BY nonce"),
        "telemetry": ctl.rows("SELECT * FROM agent_telemetry ORDER BY id"),
        "credentials": ctl.rows("SELECT id, site, hash, token_id, signing_key, revoked FROM agent_credentials "
                                "ORDER BY id"),
        "tokens": ctl.rows("SELECT id, used, used_by, revoked FROM agent_tokens ORDER BY id"),
        # where the service reads path metrics and failover events from (the state file)
        **{t: state_rows(ctl, f"SELECT * FROM {t} ORDER BY rowid")
           for t in ("path_metrics", "failover_events", "flow_snapshots")},
    }


def state_rows(ctl: AgentController, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{ctl.state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def peers(ctl: AgentController, observer: Agent) -> dict[str, Any]:
    with ctl.client(observer.credential) as c:
        return dict(c.get(f"{PREFIX}/agent/state").raise_for_status().json()["full"]["peers"])


def last_audit_id(ctl: AgentController) -> int:
    return int(ctl.rows("SELECT coalesce(max(id), 0) FROM audit")[0][0])


def announce_audits(ctl: AgentController, since: int) -> list[tuple[str, str, int, Any]]:
    return [(actor, target, ok, json.loads(after) if after else None) for actor, target, ok, after in ctl.rows(
        "SELECT actor, target, ok, after FROM audit WHERE id > ? AND action = 'agent.announce' ORDER BY id",
        (since,))]


def refused(ctl: AgentController, agent: Agent, observer: Agent, body: dict[str, Any], status: int,
            reason: str | None, detail: str = "") -> dict[str, Any]:
    """Post ``body`` as ``agent``'s announcement: refused with ``status`` and
    ``reason`` (the detail holding ``detail``), nothing stored, the observer's
    peers unchanged, and (with a reason) audited with ok false."""
    before, seen, mark = stored(ctl), peers(ctl, observer), last_audit_id(ctl)
    p = problem(post_announce(ctl, agent, body), status)
    assert p.get("reason") == reason, p
    assert detail in p["detail"], (detail, p)
    assert stored(ctl) == before
    assert peers(ctl, observer) == seen
    if reason is not None:
        audits = announce_audits(ctl, mark)
        assert [(a, t, ok, (after or {}).get("rejected")) for a, t, ok, after in audits] == \
            [(f"agent:{agent.site}:{agent.id}", f"site/{agent.site}", 0, reason)], audits
    return p


def flip(raw: bytes, at: int, mask: int = 0x01) -> bytes:
    b = bytearray(raw)
    b[at % len(b)] ^= mask
    return bytes(b)


# -- the baseline: a good announcement is stored and reaches the peers ------------------------------


def test_a_genuine_announcement_is_stored_and_reaches_the_peers(ctl: AgentController, br1: Agent,
                                                                br2: Agent) -> None:
    a = ann("br1")
    mark = last_audit_id(ctl)
    r = post_announce(ctl, br1, payload(br1.signer.sign(a)))
    assert r.status_code == 200, r.text
    assert r.json() == {"site": "br1", "ts": a.ts, "changed": True}
    # the key (the subnets only for a site announcing what its routers learned: test_bgp_lab.py)
    assert peers(ctl, br2)["br1"] == {"wg_public_key": a.wg_public_key}
    assert ctl.rows("SELECT body, credential FROM agent_announcements WHERE site = 'br1'") == \
        [(a.to_bytes().decode(), br1.id)]
    assert [ok for _, _, ok, _ in announce_audits(ctl, mark)] == [1]


# -- announcements: forged, foreign, stale, unauthorized, malformed ---------------------------------


def _signed(agent: Agent, **kw: Any) -> SignedAnnouncement:
    return agent.signer.sign(ann(agent.site, **kw))


def _non_canonical(agent: Agent) -> dict[str, str]:
    a = ann(agent.site)
    body = json.dumps(json.loads(a.to_bytes()), indent=1).encode()   # same content, spaces and newlines
    return payload(SignedAnnouncement(body, agent.signer._key.sign(body), agent.signer.public_bytes))


def _oversized(agent: Agent) -> dict[str, str]:
    body = b" " * (MAX_ANNOUNCEMENT + 1)
    return payload(SignedAnnouncement(body, agent.signer._key.sign(body), agent.signer.public_bytes))


def _signature_flipped(agent: Agent) -> dict[str, str]:
    s = _signed(agent)
    return payload(SignedAnnouncement(s.body, flip(s.signature or b"", 7), s.key))


def _body_flipped(agent: Agent) -> dict[str, str]:
    s = _signed(agent)   # 10.202.0.0/24 -> 11.202.0.0/24: the signature no longer covers the body
    return payload(SignedAnnouncement(flip(s.body, s.body.index(b'"10.') + 2), s.signature, s.key))


def _fresh_key(agent: Agent) -> dict[str, str]:
    return payload(SigningKey.generate().sign(ann(agent.site)))


ANNOUNCE_CASES: list[tuple[str, Any, int, str | None, str]] = [
    ("signature byte flipped", _signature_flipped, 403, "bad_signature", "bad_signature"),
    ("body byte flipped", _body_flipped, 403, "bad_signature", "bad_signature"),
    ("signed by a key never enrolled", _fresh_key, 403, "unknown_key", "not enrolled"),
    ("key of the site, speaking for another site",
     lambda ag: payload(ag.signer.sign(ann("br2"))), 403, "unknown_key", "cannot speak for 'br2'"),
    ("unsigned", lambda ag: {**payload(_signed(ag)), "signature": ""}, 422, "unsigned", "unsigned"),
    ("key of 31 bytes", lambda ag: {**payload(_signed(ag)), "key": b64(ag.signer.public_bytes[:31])},
     403, "unknown_key", "not enrolled"),
    ("an hour old", lambda ag: payload(_signed(ag, ts=time.time() - 3600)), 422, "stale", "stale"),
    ("an hour ahead", lambda ag: payload(_signed(ag, ts=time.time() + 3600)), 422, "stale", "stale"),
    ("a prefix outside the site's subnets", lambda ag: payload(_signed(ag, subnets=["10.99.0.0/24"])),
     403, "unauthorized", "not inside its subnets"),
    ("another site's prefix", lambda ag: payload(_signed(ag, subnets=[SUBNETS["hq"]])),
     403, "unauthorized", "10.201.0.0/24"),
    ("a larger prefix around its own", lambda ag: payload(_signed(ag, subnets=["10.202.0.0/16"])),
     403, "unauthorized", "10.202.0.0/16"),
    ("the default route", lambda ag: payload(_signed(ag, subnets=["0.0.0.0/0"])),
     403, "unauthorized", "default route"),
    ("the IPv6 default route", lambda ag: payload(_signed(ag, subnets=["::/0"])),
     403, "unauthorized", "default route"),
    ("non-canonical JSON", _non_canonical, 422, "malformed", "canonical"),
    ("a body over the limit", _oversized, 422, "malformed", f"at most {MAX_ANNOUNCEMENT}"),
    ("JSON that is not an announcement",
     lambda ag: payload(SignedAnnouncement(b"[]", ag.signer._key.sign(b"[]"), ag.signer.public_bytes)),
     422, "malformed", "not an object"),
    ("body not base64", lambda ag: {**payload(_signed(ag)), "body": "not base64!"}, 422, "malformed", "base64"),
    ("signature not base64", lambda ag: {**payload(_signed(ag)), "signature": "@@@@"}, 422, "malformed", "base64"),
    ("key not base64", lambda ag: {**payload(_signed(ag)), "key": "é"}, 422, "malformed", "base64"),
]


@pytest.mark.parametrize("make,status,reason,detail", [c[1:] for c in ANNOUNCE_CASES],
                         ids=[c[0] for c in ANNOUNCE_CASES])
def test_hostile_announcements_are_refused_by_name(ctl: AgentController, br1: Agent, br2: Agent, make: Any,
                                                   status: int, reason: str, detail: str) -> None:
    refused(ctl, br1, br2, make(br1), status, reason, detail)


def test_another_sites_enrolled_key_is_unknown_to_this_credential(ctl: AgentController, hq: Agent, br1: Agent,
                                                                  br2: Agent) -> None:
    # hq's genuine key and a valid signature for hq, posted with br1's credential
    refused(ctl, br1, br2, payload(hq.signer.sign(ann("hq"))), 403, "unknown_key", "not enrolled")
    # br1's key and credential, claiming to be hq
    refused(ctl, br1, br2, payload(br1.signer.sign(ann("hq"))), 403, "unknown_key", "cannot speak for 'hq'")


def test_an_agent_enrolled_without_a_signing_key_cannot_announce(ctl: AgentController, br2: Agent) -> None:
    r = enrol(ctl, make_token(ctl, "br1")["token"])
    keyless = Agent("br1", r.json()["id"], r.json()["credential"], SigningKey.generate())
    refused(ctl, keyless, br2, payload(keyless.signer.sign(ann("br1"))), 403, "unknown_key", "not enrolled")


def test_announcement_bodies_the_schema_refuses(ctl: AgentController, br1: Agent, br2: Agent) -> None:
    good = payload(_signed(br1))
    for body, field in [
        ({**good, "body": "A" * (4 * MAX_ANNOUNCEMENT // 3 + 8)}, "body.body"),   # past base64 of the limit
        ({**good, "signature": "A" * 200}, "signature"),
        ({**good, "extra": 1}, "extra"),
        ({"body": good["body"], "signature": good["signature"]}, "key"),
        ({**good, "key": 5}, "key"),
    ]:
        p = refused(ctl, br1, br2, body, 422, None)
        assert p["field"] == field, p


def test_a_replayed_announcement_is_refused_and_the_first_kept(ctl: AgentController, br1: Agent,
                                                               br2: Agent) -> None:
    signed = _signed(br1)
    r = post_announce(ctl, br1, payload(signed))
    assert r.status_code == 200, r.text
    first = ctl.rows("SELECT * FROM agent_announcements WHERE site = 'br1'")
    assert first[0][1] == signed.body.decode()
    p = refused(ctl, br1, br2, payload(signed), 422, "replayed", "seen before")
    assert peers(ctl, br2)["br1"]["wg_public_key"] == json.loads(signed.body)["wg_public_key"]
    assert ctl.rows("SELECT * FROM agent_announcements WHERE site = 'br1'") == first
    nonce = json.loads(signed.body)["nonce"]
    assert nonce[:8] in p["detail"] and nonce not in p["detail"]   # named by its first digits only


@FEW
@given(part=st.sampled_from(["body", "signature", "key"]), at=st.integers(0, 10_000), mask=st.integers(1, 255))
def test_any_byte_flip_of_a_signed_announcement_is_refused(ctl: AgentController, br1: Agent, br2: Agent,
                                                          part: str, at: int, mask: int) -> None:
    s = _signed(br1)
    raw = {"body": s.body, "signature": s.signature or b"", "key": s.key or b""}
    raw[part] = flip(raw[part], at, mask)
    before = stored(ctl)
    with ctl.client(br1.credential) as c:
        p = problem(c.post(f"{PREFIX}/agent/announce", json={k: b64(v) for k, v in raw.items()}), 403)
    # a flipped key is not the enrolled one; a flipped body or signature does not verify
    assert p["reason"] == ("unknown_key" if part == "key" else "bad_signature"), p
    assert stored(ctl) == before


# -- credentials ----------------------------------------------------------------------------------------


def test_a_revoked_credential_is_refused_and_its_channel_closed(ctl: AgentController, br2: Agent) -> None:
    from .wsclient import connect

    agent = new_agent(ctl, "br1", interval_s=3600)   # the channel re-checks only on a push, not on a timer
    signed = _signed(agent)
    assert post_announce(ctl, agent, payload(signed)).status_code == 200
    key = json.loads(signed.body)["wg_public_key"]
    assert peers(ctl, br2)["br1"] == {"wg_public_key": key}
    url = ctl.url.replace("https://", "wss://") + f"{PREFIX}/agent/ws"
    ctx = ssl.create_default_context(cafile=ctl.cert)
    with connect(url, ssl=ctx, additional_headers={"Authorization": f"Bearer {agent.credential}"},
                 open_timeout=10) as ws:
        ws.send(json.dumps({"since": None}))
        assert json.loads(ws.recv(timeout=10))["full"]["site"] == "br1"
        with ctl.admin() as a:
            assert a.delete(f"{PREFIX}/agents/{agent.id}").status_code == 204
        assert json.loads(ws.recv(timeout=10)) == {"error": "unauthorized", "detail": "agent credential revoked"}
        with pytest.raises(websockets.ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "br1" not in peers(ctl, br2)   # the stolen machine's WireGuard key is no peer's any more
    before = stored(ctl)
    with ctl.client(agent.credential) as c:
        assert "revoked" in problem(c.get(f"{PREFIX}/agent/state"), 401)["detail"]
        assert "revoked" in problem(c.post(f"{PREFIX}/agent/telemetry", json={
            "site": "br1", "metrics": [{"ts": 1.0, "path": PATH, "rtt_ms": 1}]}), 401)["detail"]
        assert "revoked" in problem(c.post(f"{PREFIX}/agent/announce", json=payload(_signed(agent))), 401)["detail"]
    assert stored(ctl) == before
    with connect(url, ssl=ctx, open_timeout=10) as ws:   # and a new channel is refused
        ws.send(json.dumps({"credential": agent.credential}))
        assert "revoked" in json.loads(ws.recv(timeout=10))["detail"]
        with pytest.raises(websockets.ConnectionClosed):
            ws.recv(timeout=10)
    with ctl.admin() as a:
        listed = {x["id"]: x for x in a.get(f"{PREFIX}/agents").raise_for_status().json()["items"]}
    assert listed[agent.id]["status"] == "Revoked"


def test_a_used_or_foreign_enrolment_token_enrols_nobody(ctl: AgentController) -> None:
    t = make_token(ctl, "br2")
    assert enrol(ctl, t["token"]).status_code == 201
    before = stored(ctl)
    assert "already used" in problem(enrol(ctl, t["token"], signing_key=b64(os.urandom(32))), 401)["detail"]
    assert stored(ctl) == before
    fresh = make_token(ctl, "br2")
    before = stored(ctl)
    other_pin = fresh["token"][:-64] + ("0" if fresh["token"][-1] != "0" else "1") * 64
    assert "another controller certificate" in problem(enrol(ctl, other_pin), 401)["detail"]
    swapped = fresh["token"].replace("pnt1.br2.", "pnt1.hq.")   # the secret of br2's token, for hq
    assert "unknown enrolment token" in problem(enrol(ctl, swapped), 401)["detail"]
    for bad in ("pnt1.br2", "pnt1.br2.short." + "a" * 64, "pnt1..x." + "a" * 64, "pnt1.br2.x.y.z"):
        assert "malformed" in problem(enrol(ctl, bad), 401)["detail"], bad
    assert stored(ctl) == before   # none of them used the fresh token or made a credential
    assert enrol(ctl, fresh["token"]).status_code == 201


def test_malformed_spliced_and_unknown_credentials_are_refused(ctl: AgentController, hq: Agent,
                                                               br1: Agent) -> None:
    _, hid, hsecret = hq.credential.split("_", 2)
    _, bid, bsecret = br1.credential.split("_", 2)
    cases = {
        "pna_": "malformed", "pna_x_y": "malformed", f"pna_{bid}": "malformed",
        f"pna_{bid}_{bsecret}x": "malformed", f"pna_{bid[:-1]}g_{bsecret}": "malformed",
        f"pna_{bid}_{hsecret}": "bad agent credential",    # br1's id, hq's secret
        f"pna_{hid}_{bsecret}": "bad agent credential",
        f"pna_{'0' * 16}_{bsecret}": "bad agent credential",
        f"pna_{bid}_{bsecret[:-1]}{'A' if bsecret[-1] != 'A' else 'B'}": "bad agent credential",
    }
    before = stored(ctl)
    for cred, detail in cases.items():
        with ctl.client(cred) as c:
            assert detail in problem(c.get(f"{PREFIX}/agent/state"), 401)["detail"], cred
            assert detail in problem(c.post(f"{PREFIX}/agent/telemetry", json={
                "site": "br1", "metrics": [{"ts": 1.0, "path": PATH, "rtt_ms": 1}]}), 401)["detail"], cred
            assert detail in problem(c.post(f"{PREFIX}/agent/announce", json=payload(_signed(br1))),
                                     401)["detail"], cred
    assert stored(ctl) == before
    with ctl.client() as c:   # not a bearer at all
        problem(c.get(f"{PREFIX}/agent/state", headers={"Authorization": f"Basic {br1.credential}"}), 401)


def test_another_sites_credential_cannot_post_this_sites_telemetry(ctl: AgentController, br1: Agent) -> None:
    before, mark = stored(ctl), last_audit_id(ctl)
    with ctl.client(br1.credential) as c:   # a path of hq, as hq's telemetry, from br1's credential
        p = problem(c.post(f"{PREFIX}/agent/telemetry", json={
            "site": "hq", "metrics": [{"ts": 1.0, "path": "br2.isp1~hq.isp1", "rtt_ms": 1}]}), 403)
    assert "'br1'" in p["detail"] and "'hq'" in p["detail"]
    assert stored(ctl) == before
    assert ctl.rows("SELECT actor, target, ok FROM audit WHERE id > ? AND action = 'agent.telemetry'", (mark,)) == \
        [(f"agent:br1:{br1.id}", "site/hq", 0)]


# -- telemetry -------------------------------------------------------------------------------------------

NOW = time.time()   # accepted rows are recent: the controller's retention deletes what is a week old
M = {"ts": NOW, "path": PATH, "rtt_ms": 12.5, "loss_pct": 0.0}
# a flow record as the agent sends it (counts since the flow began)
R = {"ts": NOW, "src": "10.1.0.5", "dst": "10.0.0.7", "sport": 40000, "dport": 5060, "proto": 17, "packets": 10,
     "bytes": 2000, "first_ns": 1_000_000_000, "last_ns": 1_400_000_000, "policy": "voice", "path": PATH,
     "tcp_flags": 0}


def _batch(**lists: Any) -> dict[str, Any]:
    return {"site": "br1", **lists}


def _raw(text: str) -> bytes:
    return text.encode()


TELEMETRY_CASES: list[tuple[str, Any, int, str, str]] = [
    # (name, JSON value or raw bytes, status, field, text in the detail)
    ("over the byte limit", _raw('{"site": "br1", "metrics": [], "x": "' + "a" * MAX_TELEMETRY_BYTES + '"}'),
     413, "body", str(MAX_TELEMETRY_BYTES)),
    ("too many metrics", _batch(metrics=[M] * (MAX_TELEMETRY_ITEMS + 1)), 413, "metrics", str(MAX_TELEMETRY_ITEMS)),
    ("too many bfd states", _batch(bfd=[{"ts": 1, "path": PATH, "state": "up"}] * (MAX_TELEMETRY_ITEMS + 1)),
     413, "bfd", str(MAX_TELEMETRY_ITEMS)),
    ("not JSON", _raw("{not json"), 422, "body", "not JSON"),
    ("empty", b"", 422, "body", "not JSON"),
    ("cut short", _raw('{"site": "br1", "metrics": [{"ts": 1'), 422, "body", "not JSON"),
    ("not UTF-8", b'{"site": "br1\xff\xfe"}', 422, "body", "not JSON"),
    ("nested past the recursion limit", _raw("[" * 100_000), 422, "body", "not JSON"),
    ("a list", [M], 422, "", ""),
    ("no site", {"metrics": [M]}, 422, "site", ""),
    ("NaN", _raw('{"site": "br1", "metrics": [{"ts": 1, "path": "%s", "rtt_ms": NaN}]}' % PATH),
     422, "metrics[0].rtt_ms", "finite"),
    ("Infinity", _raw('{"site": "br1", "metrics": [{"ts": 1, "path": "%s", "jitter_ms": -Infinity}]}' % PATH),
     422, "metrics[0].jitter_ms", ""),
    ("1e999", _raw('{"site": "br1", "metrics": [{"ts": 1e999, "path": "%s"}]}' % PATH), 422, "metrics[0].ts", ""),
    ("negative rtt", _batch(metrics=[M, {**M, "rtt_ms": -1}]), 422, "metrics[1].rtt_ms", ""),
    ("loss over 100 %", _batch(metrics=[{**M, "loss_pct": 100.5}]), 422, "metrics[0].loss_pct", ""),
    ("MOS over 5", _batch(metrics=[{**M, "mos": 6}]), 422, "metrics[0].mos", ""),
    ("MTU over 65535", _batch(metrics=[{**M, "mtu": 70_000}]), 422, "metrics[0].mtu", ""),
    ("a fractional MTU", _batch(metrics=[{**M, "mtu": 1400.5}]), 422, "metrics[0].mtu", ""),
    ("a negative time", _batch(metrics=[{**M, "ts": -1}]), 422, "metrics[0].ts", ""),
    ("a time past 1e11", _batch(metrics=[{**M, "ts": 1e12}]), 422, "metrics[0].ts", ""),
    ("a time as a boolean", _batch(metrics=[{**M, "ts": True}]), 422, "metrics[0].ts", ""),
    ("a time as a string", _batch(metrics=[{**M, "ts": "1.5"}]), 422, "metrics[0].ts", ""),
    ("a count as a boolean", _batch(flows=[{"ts": 1, "path": PATH, "flows": True}]), 422, "flows[0].flows", ""),
    ("a negative byte count", _batch(flows=[{"ts": 1, "path": PATH, "bytes": -5}]), 422, "flows[0].bytes", ""),
    ("a path as a number", _batch(metrics=[{**M, "path": 5}]), 422, "metrics[0].path", ""),
    ("a path not shaped like one", _batch(metrics=[{**M, "path": "br1~hq"}]), 422, "metrics[0].path", ""),
    ("a BFD state of its own", _batch(bfd=[{"ts": 1, "path": PATH, "state": "sideways"}]), 422, "bfd[0].state", ""),
    ("metrics as an object", _batch(metrics={"0": M}), 422, "metrics", ""),
    ("the site as a list", {"site": ["br1"], "metrics": [M]}, 422, "site", ""),
    ("an overlong reason", _batch(events=[{"ts": 1, "reason": "x" * 65}]), 422, "events[0].reason", ""),
    ("a metric of another site's path", _batch(metrics=[M, {**M, "path": NOT_MINE}]), 422, "metrics[1].path",
     "not a path of site 'br1'"),
    ("a BFD state of another site's path", _batch(bfd=[{"ts": 1, "path": NOT_MINE, "state": "down"}]),
     422, "bfd[0].path", "not a path of site 'br1'"),
    ("an event moving traffic off another site's path",
     _batch(events=[{"ts": 1, "reason": "bfd_down", "from_path": NOT_MINE, "to_path": PATH}]),
     422, "events[0].from_path", "not a path of site 'br1'"),
    ("an event moving traffic onto another site's path",
     _batch(events=[{"ts": 1, "reason": "reroute", "from_path": PATH, "to_path": NOT_MINE}]),
     422, "events[0].to_path", "not a path of site 'br1'"),
    ("flows on another site's path", _batch(flows=[{"ts": 1, "path": NOT_MINE, "flows": 1}]),
     422, "flows[0].path", "not a path of site 'br1'"),
    ("a flow from no address", _batch(records=[{**R, "src": "10.1.0.999"}]), 422, "records[0].src",
     "not an IPv4 or IPv6 address"),
    ("a flow from v4 to v6", _batch(records=[R, {**R, "dst": "fd00::7"}]), 422, "records[1]", "address families"),
    ("a flow that ended before it began", _batch(records=[{**R, "last_ns": 5}]), 422, "records[0]",
     "last_ns is before first_ns"),
    ("a port past 65535", _batch(records=[{**R, "dport": 70000}]), 422, "records[0].dport", ""),
    ("a protocol past 255", _batch(records=[{**R, "proto": 256}]), 422, "records[0].proto", ""),
    ("a byte count past 2^63", _batch(records=[{**R, "bytes": 2**63}]), 422, "records[0].bytes", ""),
    ("a flow on another site's path", _batch(records=[R, {**R, "path": NOT_MINE}]), 422, "records[1].path",
     "not a path of site 'br1'"),
    ("a negative count of flows left out", _batch(records_omitted=-1), 422, "records_omitted", ""),
    ("an extra field", _batch(colour="red"), 422, "colour", ""),
    ("an extra field in an item", _batch(metrics=[M, {**M, "evil": 1}]), 422, "metrics[1].evil", ""),
]


@pytest.mark.parametrize("body,status,field,detail", [c[1:] for c in TELEMETRY_CASES],
                         ids=[c[0] for c in TELEMETRY_CASES])
def test_hostile_telemetry_is_refused_by_name_and_nothing_stored(ctl: AgentController, br1: Agent, body: Any,
                                                                 status: int, field: str, detail: str) -> None:
    before = stored(ctl)
    with ctl.client(br1.credential) as c:
        if isinstance(body, bytes):
            r = c.post(f"{PREFIX}/agent/telemetry", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(f"{PREFIX}/agent/telemetry", json=body)
    p = problem(r, status)
    if field:
        assert p.get("field") == field, p
        assert detail or p["detail"].startswith(f"{field}: "), p   # pydantic's message, after the field
    assert detail in p["detail"], p
    assert stored(ctl) == before


def test_a_good_batch_beside_the_refused_ones_is_stored(ctl: AgentController, br1: Agent) -> None:
    """The same credential and shapes are accepted when sound: the refusals
    above are for what was wrong, not for who sent it."""
    before = len(stored(ctl)["telemetry"])
    with ctl.client(br1.credential) as c:
        r = c.post(f"{PREFIX}/agent/telemetry", json=_batch(
            metrics=[{**M, "mtu": 1420}] * MAX_TELEMETRY_ITEMS,
            events=[{"ts": NOW, "reason": "reroute", "from_path": "br1.lte~hq.isp1", "to_path": PATH}],
            flows=[{"ts": NOW, "path": PATH, "site": "hq", "flows": 2, "packets": 3, "bytes": 4}],
            records=[R, {**R, "src": "fd01::5", "dst": "FD00:0::7", "path": None, "policy": None}], records_omitted=7))
    assert r.status_code == 200, r.text
    assert r.json() == {"stored": MAX_TELEMETRY_ITEMS + 2 + 2}
    assert len(stored(ctl)["telemetry"]) == before + MAX_TELEMETRY_ITEMS + 2
    assert stored(ctl)["path_metrics"], "the snapshot sees what a batch writes to the state file"
    # the records are the site's flows (the site from the credential, the path by its index, addresses canonical)
    with ctl.admin() as a:
        items = a.get(f"{PREFIX}/flows", params={"site": "br1", "limit": 1000}).raise_for_status().json()["items"]
        path_index = {p["id"]: p["index"] for p in a.get(f"{PREFIX}/topology").json()["edges"]}
    mine = [(f["src"], f["dst"], f["dport"], f["proto"], f["bytes"], f["policy"], f["path"]) for f in items[-2:]]
    assert mine == [("10.1.0.5", "10.0.0.7", 5060, 17, 2000, "voice", path_index[PATH]),
                    ("fd01::5", "fd00::7", 5060, 17, 2000, None, None)], items[-2:]


@FEW
@given(junk=st.binary(min_size=0, max_size=512))
def test_random_bytes_as_telemetry_store_nothing(ctl: AgentController, br1: Agent, junk: bytes) -> None:
    before = stored(ctl)
    with ctl.client(br1.credential) as c:
        r = c.post(f"{PREFIX}/agent/telemetry", content=junk, headers={"content-type": "application/json"})
    assert r.status_code == 422 or r.json() == {"stored": 0}, r.text   # {"site":"br1"} is a valid (empty) batch
    assert stored(ctl) == before
