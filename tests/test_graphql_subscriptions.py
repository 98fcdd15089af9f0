"""GraphQL subscriptions against the real server, over a real WebSocket
speaking graphql-transport-ws:

* ``connection_init`` authenticates (no credential or a bad one: 4403);
* a policy change through REST arrives on ``policyChanges`` with the
  ETag REST gave;
* agents' telemetry arrives on ``pathMetrics``, ``pathState`` and
  ``failoverMoves`` as it is stored;
* a token revoked while subscribed ends the subscription (4401, named);
* a subscriber that stops reading is dropped (4413, named) instead of the
  server's memory growing, and the server keeps answering.

Waits are for messages and close frames, bounded.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

websockets = pytest.importorskip("websockets")
pytest.importorskip("strawberry")

from patronus.controller.app import PREFIX  # noqa: E402

from .test_controller_agents import AgentController, credential, site_body  # noqa: E402
from .wsclient import connect  # noqa: E402

pytestmark = pytest.mark.slow

GQL = "/api/graphql"
PATH = "br1.isp1~hq.isp1"


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = AgentController(tmp_path_factory.mktemp("gsub") / "state")
    c.start()
    try:
        with c.admin() as a:
            for s in ("hq", "br1"):
                a.post(f"{PREFIX}/sites", json=site_body(s)).raise_for_status()
        yield c
    finally:
        c.stop()


class Gql:
    """One graphql-transport-ws connection."""

    def __init__(self, ctl: Any, token: str | None, *, init: bool = True) -> None:
        url = ctl.url.replace("https://", "wss://") + GQL
        try:
            self.ws = connect(url, ssl=ctl.ssl_context(), open_timeout=30, subprotocols=["graphql-transport-ws"])
        except TimeoutError as e:   # the controller did not answer: what was it doing?
            raise TimeoutError(f"{e}; the controller then:\n{ctl.stacks()}") from e
        if init:
            self.send({"type": "connection_init", "payload": {} if token is None else
                       {"authorization": f"Bearer {token}"}})
            ack = self.recv()
            assert ack["type"] == "connection_ack", ack

    def send(self, msg: dict[str, Any]) -> None:
        self.ws.send(json.dumps(msg))

    def recv(self, timeout: float = 20.0) -> dict[str, Any]:
        while True:
            msg = json.loads(self.ws.recv(timeout=timeout))
            if msg.get("type") == "ping":
                self.send({"type": "pong"})
                continue
            return dict(msg)

    def subscribe(self, op: str, query: str, variables: dict[str, Any] | None = None) -> None:
        self.send({"id": op, "type": "subscribe", "payload": {"query": query, "variables": variables or {}}})

    def next(self, op: str, timeout: float = 20.0) -> dict[str, Any]:
        msg = self.recv(timeout)
        assert msg.get("id") == op and msg["type"] == "next", msg
        assert not msg["payload"].get("errors"), msg
        return dict(msg["payload"]["data"])

    def closed(self, timeout: float = 30.0) -> Any:
        """Read until the server closes; the close frame it sent."""
        end = time.monotonic() + timeout
        with pytest.raises(websockets.ConnectionClosed) as e:
            while time.monotonic() < end:
                self.ws.recv(timeout=max(0.1, end - time.monotonic()))
        return e.value.rcvd

    def close(self) -> None:
        self.ws.close()


def post_telemetry(ctl: AgentController, cred: str, **batch: Any) -> None:
    with ctl.client(cred) as c:
        r = c.post(f"{PREFIX}/agent/telemetry", json={"site": "br1", **batch})
        assert r.status_code == 200, r.text


def test_connection_init_needs_a_valid_credential(ctl: AgentController) -> None:
    for payload in ({}, {"authorization": "Bearer nonsense"}, {"authorization": 42}):
        g = Gql(ctl, None, init=False)
        g.send({"type": "connection_init", "payload": payload})
        frame = g.closed()
        assert frame is not None and frame.code == 4403, (payload, frame)
    g = Gql(ctl, None, init=False)   # subscribing before connection_init
    g.subscribe("1", "subscription { policyChanges { target } }")
    assert g.closed().code == 4401


def test_a_policy_change_arrives_with_its_etag(ctl: AgentController) -> None:
    g = Gql(ctl, ctl.token)
    try:
        g.subscribe("p", "subscription { policyChanges { seq type target etag after } }")
        # there is no acknowledgement of a subscription: create policies until one is seen
        etags: dict[str, str] = {}
        got = None
        with ctl.admin() as a:
            for i in range(20):
                r = a.post(f"{PREFIX}/policies", json={"name": f"voip{i}", "priority": 10 + i, "app": "voip",
                                                        "match": {"proto": "udp", "dst_ports": "5060"}})
                r.raise_for_status()
                etags[f"policy/voip{i}"] = r.headers["etag"]
                try:
                    got = g.next("p", timeout=1)["policyChanges"]
                    break
                except TimeoutError:
                    continue
        assert got is not None
        assert got["type"] == "policy.create" and got["etag"] == etags[got["target"]]
        assert got["after"]["name"] == got["target"].split("/", 1)[1]
    finally:
        g.close()


def test_site_changes_arrive_with_only_sites_not_policies(ctl: AgentController) -> None:
    g = Gql(ctl, ctl.token)
    try:
        g.subscribe("s", "subscription { siteChanges { type target etag after } }")
        got = None
        with ctl.admin() as a:
            for i in range(20):   # no acknowledgement of a subscription: change until one is seen
                a.post(f"{PREFIX}/policies", json={"name": f"noise{i}", "priority": 500 + i,
                                                    "match": {"proto": "udp"}}).raise_for_status()
                r = a.post(f"{PREFIX}/sites", json={"name": f"live{i}", "subnets": [f"10.{200 + i}.0.0/24"],
                                                     "uplinks": [{"name": "isp", "address": f"198.51.100.{i + 1}"}]})
                r.raise_for_status()
                try:
                    got = g.next("s", timeout=1)["siteChanges"]
                    break
                except TimeoutError:
                    continue
            assert got is not None and got["type"] == "site.create", got
            name = got["target"].split("/", 1)[1]
            assert got["after"]["name"] == name
            assert a.delete(f"{PREFIX}/sites/{name}").status_code == 204
        while (got := g.next("s", timeout=20)["siteChanges"])["target"] != f"site/{name}":
            pass   # creations of the loop above that were in flight
        assert got["type"] == "site.delete", got
    finally:
        g.close()


def test_telemetry_arrives_as_metrics_states_and_moves(ctl: AgentController) -> None:
    cred = credential(ctl, "br1")
    g = Gql(ctl, ctl.token)
    try:
        g.subscribe("m", "subscription { pathMetrics(path: \"%s\") { site path rttMs lossPct } }" % PATH)
        g.subscribe("s", "subscription { pathState { site path state } }")
        g.subscribe("f", "subscription { failoverMoves(site: \"br1\") { site reason policy toSite fromPath toPath "
                         "received ts } }")
        # the subscriptions are registered once a first event passes through each
        deadline = time.monotonic() + 20
        seen: dict[str, Any] = {}
        while set(seen) != {"m", "s", "f"}:
            assert time.monotonic() < deadline, seen
            now = time.time()
            post_telemetry(ctl, cred, metrics=[{"ts": now, "path": PATH, "rtt_ms": 12.5, "loss_pct": 0.0}],
                           bfd=[{"ts": now, "path": PATH, "state": "down", "diag": "control_detect_expired"}],
                           events=[{"ts": now, "reason": "bfd_down", "policy": "voip", "site": "hq",
                                    "from_path": PATH, "to_path": "br1.lte~hq.isp1"}])
            try:
                msg = g.recv(timeout=2)
            except TimeoutError:
                continue
            while True:
                assert msg["type"] == "next", msg
                seen[msg["id"]] = msg["payload"]["data"]
                try:
                    msg = g.recv(timeout=0.5)
                except TimeoutError:
                    break
        assert seen["m"]["pathMetrics"] == {"site": "br1", "path": PATH, "rttMs": 12.5, "lossPct": 0.0}
        assert seen["s"]["pathState"] == {"site": "br1", "path": PATH, "state": "down"}
        mv = seen["f"]["failoverMoves"]
        assert (mv["site"], mv["reason"], mv["policy"], mv["toSite"], mv["fromPath"], mv["toPath"]) == \
            ("br1", "bfd_down", "voip", "hq", PATH, "br1.lte~hq.isp1")
        assert mv["received"] >= mv["ts"]
    finally:
        g.close()


def test_a_revoked_token_ends_the_subscription(ctl: AgentController) -> None:
    with ctl.admin() as a:
        a.post(f"{PREFIX}/users", json={"name": "watcher", "password": "a long enough password 1",
                                         "role": "viewer"}).raise_for_status()
    tokens = ctl.login("watcher", "a long enough password 1")
    g = Gql(ctl, tokens["access_token"])
    g.subscribe("p", "subscription { policyChanges { target } }")
    with ctl.client(tokens["access_token"]) as c:
        c.post(f"{PREFIX}/auth/logout", json={"refresh_token": tokens["refresh_token"]}).raise_for_status()
    frame = g.closed()
    assert frame is not None and frame.code == 4401 and "revoked" in frame.reason, frame


def test_a_subscriber_that_stops_reading_is_dropped(ctl: AgentController) -> None:
    cred = credential(ctl, "br1")
    g = Gql(ctl, ctl.token)
    g.subscribe("m", "subscription { pathMetrics { path rttMs } }")
    now = time.time()
    post_telemetry(ctl, cred, metrics=[{"ts": now, "path": PATH, "rtt_ms": 1.0}])
    assert g.next("m")["pathMetrics"]["path"] == PATH   # subscribed; from here on it reads nothing
    batch = [{"ts": now, "path": PATH, "rtt_ms": float(i)} for i in range(2000)]
    for _ in range(40):   # 80,000 events: more than socket buffers and the subscriber's queue hold
        post_telemetry(ctl, cred, metrics=batch)
    with ctl.admin() as a:   # the server answers meanwhile
        assert a.get(f"{PREFIX}/sites").status_code == 200
    frame = g.closed(timeout=60)
    assert frame is not None and frame.code == 4413 and "slow subscriber" in frame.reason, frame


def test_site_status_changes_arrive_as_an_agent_goes_quiet(ctl: AgentController) -> None:
    """An agent reporting every 0.2 s and then silent: its site goes Active,
    Degraded (3 intervals without contact), Inactive (10), each once, in order."""
    with ctl.admin() as a:
        a.post(f"{PREFIX}/sites", json=site_body("br9")).raise_for_status()
    g = Gql(ctl, ctl.token)
    try:
        g.subscribe("s", "subscription { siteStatus { site status previous } }")
        # the subscription registers as the server reads it: enrol only once it sees the others
        seen: list[tuple[str, str | None]] = []
        cred = None
        end = time.monotonic() + 60
        while ("Inactive", "Degraded") not in seen and time.monotonic() < end:
            if cred is None:
                cred = credential(ctl, "br9", interval_s=0.2)
            try:
                ev = g.next("s", timeout=max(0.1, end - time.monotonic()))["siteStatus"]
            except TimeoutError:
                break
            if ev["site"] == "br9":
                seen.append((ev["status"], ev["previous"]))
        assert seen == [("Active", None), ("Degraded", "Active"), ("Inactive", "Degraded")], seen
    finally:
        g.close()
