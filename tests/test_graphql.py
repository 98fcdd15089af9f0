"""GraphQL queries and mutations (``POST /api/graphql``) against the real
controller (``patronus controller run`` in a subprocess, TLS on loopback).

The controller starts over a 100-site mesh saved into its state file (with
path metrics, failover events and flow records), so the queries have data
to match REST with. Covers: queries equal to REST for the same data;
mutations visible in REST and the audit log (actor, remote), with REST's
validation and codes; RBAC per field per role (users, API keys); 401 for
anonymous requests; depth, alias, token, page-size and complexity limits
named in the error, the server answering right after; the store round
trips of a 100-site query with paths and metrics (a small constant); the
cache (a write visible in the next read, counters on /metrics). The
complexity calculator is also checked against a model with hypothesis.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("strawberry")
httpx = pytest.importorskip("httpx")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from patronus import Match, Mesh, Policy, Site, Uplink, save_mesh  # noqa: E402
from patronus.controller.app import PREFIX  # noqa: E402
from patronus.controller.auth import allowed  # noqa: E402
from patronus.store import Store  # noqa: E402

from .controller_server import Controller  # noqa: E402

pytestmark = pytest.mark.slow

GQL = "/api/graphql"
PASSWORD = "correct horse battery staple"
SITES = 100


def snake(x: Any) -> Any:
    """GraphQL's camelCase keys as REST's snake_case, recursively."""
    if isinstance(x, list):
        return [snake(v) for v in x]
    if isinstance(x, dict):
        return {re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), k): snake(v) for k, v in x.items()}
    return x


def mesh_of(n: int) -> Mesh:
    m = Mesh("gql")
    for i in range(n):
        m.add_site(Site(f"s{i}", subnets=[f"10.{i // 250}.{i % 250}.0/24"],
                        uplinks=[Uplink("isp", f"100.64.{i // 250}.{i % 250 + 1}")]))
    m.add_policy(Policy("voip", Match(proto="udp", dst_ports=5060), priority=10, app="voip"))
    return m


class Ctl:
    def __init__(self, c: Controller) -> None:
        self.c = c
        self.tokens: dict[str, str] = {}

    def rest(self, role: str = "admin") -> httpx.Client:
        return self.c.client(self.tokens[role])

    def post(self, query: str, variables: dict[str, Any] | None = None, *, role: str = "admin",
             token: str | None = None) -> httpx.Response:
        # a deadline, not a speed bar (benchmarks/ measures speed): 9,900 paths on a busy 2-core VM take seconds
        with self.c.client(token or self.tokens[role], timeout=120.0) as cl:
            return cl.post(GQL, json={"query": query, "variables": variables or {}})

    def q(self, query: str, variables: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        r = self.post(query, variables, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def data(self, query: str, variables: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        body = self.q(query, variables, **kw)
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def metric(self, name: str, labels: str) -> float:
        with self.rest() as cl:
            text = cl.get("/metrics").text
        m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
        assert m, f"{name}{{{labels}}} not on /metrics"
        return float(m.group(1))


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = Controller(tmp_path_factory.mktemp("gql") / "state")
    state = c.info["state"]
    save_mesh(mesh_of(SITES), state)
    now = time.time()
    with Store(state) as s:
        for k, ts in enumerate((now - 20, now - 10)):   # two rows for each path of s0, the newer one wins
            s.add_path_metrics(ts, [(f"s0.isp~s{i}.isp", 10.0 + i + k, 1.0, 0.0, 4.3, 1420, None)
                                    for i in range(1, SITES)])
        s.add_event("bfd_down", from_path="s0.isp~s1.isp", to_path="s0.isp~s2.isp", ts=now - 5, site="s0")
        s.add_event("bfd_up", to_path="s0.isp~s3.isp", ts=now - 4, site="s0")
        s.add_event("failover", policy="voip", from_path="s0.isp~s1.isp", to_path="s0.isp~s2.isp", ts=now - 3,
                    site="s0")
    con = sqlite3.connect(state)
    with con:
        con.executemany("INSERT INTO flow_snapshots VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        [(now - 30 + i, f"s{i % 3}", "10.0.0.1", "10.0.1.1", 40000 + i, 5060, 17, 10 + i,
                          5_000_000_000 + i, 1_700_000_000_000_000_000 + i, 1_700_000_000_000_000_100 + i,
                          "voip", i, 0) for i in range(7)])
    con.close()
    c.start(timeout=60)
    try:
        t = Ctl(c)
        t.tokens["admin"] = c.login("admin", c.admin_password)["access_token"]
        with t.rest() as a:
            for role in ("operator", "viewer"):
                r = a.post(f"{PREFIX}/users", json={"name": f"g-{role}", "password": PASSWORD, "role": role})
                assert r.status_code == 201, r.text
            r = a.post(f"{PREFIX}/api-keys", json={"name": "dash", "role": "viewer"})
            assert r.status_code == 201, r.text
            t.tokens["viewer-key"] = r.json()["secret"]
        for role in ("operator", "viewer"):
            t.tokens[role] = c.login(f"g-{role}", PASSWORD)["access_token"]
        yield t
    finally:
        c.stop()


# -- authentication -------------------------------------------------------------------------------


def test_anonymous_and_bad_tokens_get_401(ctl: Ctl) -> None:
    with ctl.c.client() as cl:
        r = cl.post(GQL, json={"query": "{ me { name } }"})
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert cl.post(GQL, json={"query": "{ me { name } }"},
                       headers={"Authorization": "Bearer nope"}).status_code == 401
        assert cl.get(GQL, params={"query": "{ me { name } }"}).status_code in (401, 405)
    assert ctl.data("{ me { name role kind } }", token=ctl.tokens["viewer-key"])["me"] == {
        "name": "dash", "role": "viewer", "kind": "apikey"}


def test_introspection_for_authenticated_users_and_configurable(ctl: Ctl) -> None:
    d = ctl.data("{ __schema { queryType { name } mutationType { name } subscriptionType { name } } }",
                 role="viewer")
    assert d["__schema"] == {"queryType": {"name": "Query"}, "mutationType": {"name": "Mutation"},
                             "subscriptionType": {"name": "Subscription"}}
    from patronus.controller.gql.context import Context
    from patronus.controller.gql.schema import make_schema

    schema, _ = make_schema(introspection=False)
    ctx = Context(service=None, auth=None, agents=None, bus=None, cache=None)
    r = asyncio.run(schema.execute("{ __schema { queryType { name } } }", context_value=ctx))
    assert r.errors and "introspection" in r.errors[0].message.lower()


# -- queries match REST -----------------------------------------------------------------------------


def test_sites_policies_failover_topology_match_rest(ctl: Ctl) -> None:
    d = ctl.data("""{ sites { name subnets etag uplinks { name address mtu port nat bandwidthMbps cost } }
                      policies { name priority app prefer action etag
                                 match { src dst srcPorts dstPorts proto dscp } qos { dscp rateKbps duplicate } }
                      failover { detectMs multiplier failbackHoldS slaWindows cooldownS dampPenalty
                                 dampHalfLifeS dampReuse dampSuppress etag }
                      topology { mesh nodes { id subnets uplinks } edgeCount
                                 edges(first: 1000) { items { id index source target sourceUplink targetUplink }
                                                      nextCursor } } }""", role="viewer")
    with ctl.rest("viewer") as r:
        sites = r.get(f"{PREFIX}/sites").json()["items"]
        policies = r.get(f"{PREFIX}/policies").json()["items"]
        fo = r.get(f"{PREFIX}/failover")
        topo = r.get(f"{PREFIX}/topology").json()
        s0 = r.get(f"{PREFIX}/sites/s0")
        voip = r.get(f"{PREFIX}/policies/voip")
    g_sites = snake(d["sites"])
    assert len(g_sites) >= SITES
    assert [{k: v for k, v in s.items() if k != "etag"} for s in g_sites] == sites
    assert next(s for s in g_sites if s["name"] == "s0")["etag"] == s0.headers["etag"]
    g_pol = snake(d["policies"])
    assert [{k: v for k, v in p.items() if k != "etag"} for p in g_pol] == policies
    assert next(p for p in g_pol if p["name"] == "voip")["etag"] == voip.headers["etag"]
    g_fo = snake(d["failover"])
    assert g_fo.pop("etag") == fo.headers["etag"] and g_fo == fo.json()
    g_topo = snake(d["topology"])
    assert g_topo["edge_count"] == len(topo["edges"])
    assert {"mesh": g_topo["mesh"], "nodes": g_topo["nodes"]} == {"mesh": topo["mesh"], "nodes": topo["nodes"]}
    # every edge, a page at a time, as REST has them; a small page continues where it stopped
    edges, after = g_topo["edges"]["items"], g_topo["edges"]["next_cursor"]
    q = """query($a: String, $n: Int!) { topology { edges(first: $n, after: $a) {
             items { id index source target sourceUplink targetUplink } nextCursor } } }"""
    while after is not None:
        page = ctl.data(q, variables={"a": after, "n": 1000}, role="viewer")["topology"]["edges"]
        edges += snake(page["items"])
        after = page["nextCursor"]
    assert edges == topo["edges"]
    first = ctl.data(q, variables={"a": None, "n": 7}, role="viewer")["topology"]["edges"]
    second = ctl.data(q, variables={"a": first["nextCursor"], "n": 7}, role="viewer")["topology"]["edges"]
    assert [e["index"] for e in first["items"] + second["items"]] == list(range(14))
    assert "errors" in ctl.q("{ topology { edges(after: \"bm9wZQ==\") { nextCursor } } }", role="viewer")


def test_paths_with_latest_metrics_and_state_match_rest(ctl: Ctl) -> None:
    d = ctl.data("{ paths { id index sites uplinks latest { ts rttMs jitterMs lossPct mos mtu bandwidthMbps } "
                 "state { status reason since detail } } }")
    with ctl.rest() as r:
        rest = r.get(f"{PREFIX}/paths").json()["items"]
    got = [{**{k: v for k, v in p.items() if k != "latest"}, "metrics": p["latest"]} for p in snake(d["paths"])]
    assert got == rest
    by_id = {p["id"]: p for p in rest}
    assert by_id["s0.isp~s1.isp"]["state"]["status"] == "down"
    assert by_id["s0.isp~s5.isp"]["metrics"]["rtt_ms"] == 16.0   # the newer of the two rows


def test_history_flows_events_paginate_as_rest(ctl: Ctl) -> None:
    pid = "s0.isp~s7.isp"
    with ctl.rest("viewer") as r:
        h1 = r.get(f"{PREFIX}/paths/{pid}/metrics", params={"limit": 1}).json()
        h2 = r.get(f"{PREFIX}/paths/{pid}/metrics", params={"limit": 1, "cursor": h1["next_cursor"]}).json()
        f1 = r.get(f"{PREFIX}/flows", params={"limit": 3, "policy": "voip"}).json()
        f2 = r.get(f"{PREFIX}/flows", params={"limit": 3, "policy": "voip", "cursor": f1["next_cursor"]}).json()
        ev = r.get(f"{PREFIX}/events", params={"limit": 50}).json()["items"]
        ev_range = r.get(f"{PREFIX}/events", params={"limit": 50, "start": ev[1]["ts"]}).json()["items"]
    hq = """query($id: String!, $after: String) { path(id: $id) { history(first: 1, after: $after) {
              path inMesh items { ts rttMs jitterMs lossPct mos mtu bandwidthMbps } nextCursor } } }"""
    g1 = snake(ctl.data(hq, {"id": pid}, role="viewer")["path"]["history"])
    g2 = snake(ctl.data(hq, {"id": pid, "after": g1["next_cursor"]}, role="viewer")["path"]["history"])
    for g, h in ((g1, h1), (g2, h2)):
        assert g == {k: v for k, v in h.items() if k != "columns"}
    assert g2["next_cursor"] is None and g1["items"][0]["ts"] < g2["items"][0]["ts"]
    fq = """query($after: String) { flows(policy: "voip", first: 3, after: $after) { items {
              ts site src dst sport dport proto packets bytes firstNs lastNs policy path tcpFlags } nextCursor } }"""
    p1 = snake(ctl.data(fq, role="viewer")["flows"])
    p2 = snake(ctl.data(fq, {"after": p1["next_cursor"]}, role="viewer")["flows"])
    assert p1 == f1 and p2 == f2 and p1["items"][0]["first_ns"] == 1_700_000_000_000_000_000
    eq = "query($s: Time) { events(first: 50, start: $s) { id ts policy site fromPath toPath reason detail } }"
    assert snake(ctl.data(eq, role="viewer")["events"]) == ev
    assert snake(ctl.data(eq, {"s": ev[1]["ts"]}, role="viewer")["events"]) == ev_range
    # a cursor of another query: REST's 422, here BAD_CURSOR naming the field
    bad = ctl.q('{ flows(policy: "other", first: 3, after: "%s") { nextCursor } }' % p1["next_cursor"])
    assert bad["errors"][0]["extensions"]["code"] == "BAD_CURSOR"
    assert bad["errors"][0]["extensions"]["field"] == "cursor"
    bad = ctl.q('{ events(start: "yesterday") { id } }')
    assert bad["errors"][0]["extensions"] == {"code": "BAD_USER_INPUT", "status": 422, "field": "start"}


def test_admin_lists_match_rest(ctl: Ctl) -> None:
    d = ctl.data("""{ users { name role created disabled totpEnabled }
                      apiKeys { id name prefix role createdBy created expires lastUsed revoked }
                      auditLog(first: 5) { id ts actor action target before after remote ok }
                      tokens { id site createdBy created expires used usedBy revoked }
                      agents { id site hostname publicKey enrolled lastSeen remote intervalS revoked status } }""")
    with ctl.rest() as r:
        assert snake(d["users"]) == r.get(f"{PREFIX}/users").json()["items"]
        assert snake(d["apiKeys"]) == r.get(f"{PREFIX}/api-keys").json()["items"]
        assert d["auditLog"] == r.get(f"{PREFIX}/audit", params={"limit": 5}).json()["items"]
        assert snake(d["tokens"]) == r.get(f"{PREFIX}/tokens").json()["items"]
        assert snake(d["agents"]) == r.get(f"{PREFIX}/agents").json()["items"]


# -- RBAC per field ------------------------------------------------------------------------------------

FIELDS = [
    ("{ sites { name } }", "sites", "sites.read"),
    ('{ site(name: "s1") { name status } }', "site", "sites.read"),
    ('{ path(id: "s0.isp~s1.isp") { id latest { rttMs } } }', "path", "paths.read"),
    ("{ policies { name } }", "policies", "policies.read"),
    ("{ failover { detectMs } }", "failover", "policies.read"),
    ("{ flows(first: 1) { nextCursor } }", "flows", "flows.read"),
    ("{ events(first: 1) { id } }", "events", "events.read"),
    ("{ topology { mesh } }", "topology", "topology.read"),
    ("{ users { name } }", "users", "users.read"),
    ("{ auditLog(first: 1) { id } }", "auditLog", "audit.read"),
    ("{ apiKeys { id } }", "apiKeys", "apikeys.read"),
    ("{ tokens { id } }", "tokens", "tokens.read"),
    ("{ agents { id } }", "agents", "sites.read"),
]


@pytest.mark.parametrize("who", ["admin", "operator", "viewer", "viewer-key"])
def test_rbac_per_field_per_role(ctl: Ctl, who: str) -> None:
    role = who.split("-")[0]
    for query, field, action in FIELDS:
        body = ctl.q(query, role=who)
        if allowed(role, action):
            assert not body.get("errors"), (who, query, body)
            assert body["data"][field] is not None
        else:
            (err,) = body["errors"]
            assert err["extensions"]["code"] == "FORBIDDEN" and err["extensions"]["permission"] == action, err
            assert action in err["message"] and err["path"] == [field]
            assert body["data"] is None or body["data"][field] is None


def test_viewer_gets_the_fields_it_may_and_an_error_for_the_rest(ctl: Ctl) -> None:
    body = ctl.q("{ sites { name } users { name } apiKeys { id secret: prefix } }", role="viewer")
    assert body["data"] is None or body["data"].get("users") is None
    msgs = {e["extensions"]["permission"] for e in body["errors"]}
    assert msgs == {"users.read", "apikeys.read"}
    # nullable fields: with data for what the viewer may read
    body = ctl.q('{ site(name: "s1") { name } users { name } }', role="viewer")
    assert body["data"]["site"] == {"name": "s1"} and body["data"]["users"] is None
    for who, mutation, action in [
        ("viewer", 'mutation { deleteSite(name: "s1") }', "sites.write"),
        ("viewer", 'mutation { createToken(site: "s1") { token } }', "tokens.write"),
        ("operator", f'mutation {{ addUser(name: "x1", password: "{PASSWORD}", role: viewer) {{ name }} }}',
         "users.write"),
        ("operator", 'mutation { createApiKey(name: "k", role: viewer) { secret } }', "apikeys.write"),
    ]:
        err = ctl.q(mutation, role=who)["errors"][0]
        assert err["extensions"]["permission"] == action, err
    with ctl.rest() as r:   # nothing happened
        assert r.get(f"{PREFIX}/sites/s1").status_code == 200
        assert "x1" not in {u["name"] for u in r.get(f"{PREFIX}/users").json()["items"]}


# -- mutations -------------------------------------------------------------------------------------------

SITE_M = """mutation($in: SiteInput!) { createSite(input: $in) { name subnets etag
              uplinks { name address mtu port nat bandwidthMbps cost } } }"""


def audit_rows(ctl: Ctl, n: int = 20) -> list[dict[str, Any]]:
    with ctl.rest() as r:
        return r.get(f"{PREFIX}/audit", params={"limit": n}).json()["items"]


def test_site_and_policy_mutations_show_in_rest_and_the_audit_log(ctl: Ctl) -> None:
    body = {"name": "gs1", "subnets": ["10.200.0.0/24"], "uplinks": [{"name": "isp", "address": "198.18.0.1"}]}
    made = ctl.data(SITE_M, {"in": body}, role="operator")["createSite"]
    with ctl.rest() as r:
        got = r.get(f"{PREFIX}/sites/gs1")
    assert got.headers["etag"] == made["etag"] and snake({k: v for k, v in made.items() if k != "etag"}) == got.json()
    row = next(a for a in audit_rows(ctl) if a["action"] == "site.create" and a["target"] == "site/gs1")
    assert row["actor"] == "g-operator" and row["ok"] and row["remote"] == "127.0.0.1"
    assert row["after"] == got.json()

    # validation as REST: a model error names the field, a duplicate is a conflict
    bad = ctl.q(SITE_M, {"in": {**body, "name": "gs2", "subnets": ["nope"]}}, role="operator")
    assert bad["errors"][0]["extensions"] == {"code": "BAD_USER_INPUT", "status": 422, "field": "Site.subnets"}
    with ctl.rest("operator") as r:   # REST says the same
        rest = r.post(f"{PREFIX}/sites", json={**body, "name": "gs2", "subnets": ["nope"]}).json()
    assert (rest["status"], rest["field"], rest["detail"]) == (422, "Site.subnets", bad["errors"][0]["message"])
    dup = ctl.q(SITE_M, {"in": body}, role="operator")["errors"][0]["extensions"]
    assert dup == {"code": "CONFLICT", "status": 409, "field": "Site.name"}

    # If-Match: a stale version refused (412), the current one accepted
    rq = """mutation($etag: String, $in: SiteInput!) { replaceSite(name: "gs1", ifMatch: $etag, input: $in) {
              etag uplinks { mtu } } }"""
    new = {"subnets": ["10.200.0.0/24"], "uplinks": [{"name": "isp", "address": "198.18.0.1", "mtu": 1400}]}
    stale = ctl.q(rq, {"etag": '"0000"', "in": new}, role="operator")["errors"][0]
    assert stale["extensions"]["code"] == "PRECONDITION_FAILED" and stale["extensions"]["status"] == 412
    rep = ctl.data(rq, {"etag": made["etag"], "in": new}, role="operator")["replaceSite"]
    with ctl.rest() as r:
        got = r.get(f"{PREFIX}/sites/gs1")
    assert rep["etag"] == got.headers["etag"] != made["etag"] and got.json()["uplinks"][0]["mtu"] == 1400

    # policies
    pq = """mutation($in: PolicyInput!) { createPolicy(input: $in) { name priority etag match { proto dstPorts } } }"""
    pol = {"name": "gp1", "match": {"proto": "tcp", "dstPorts": [443, [8000, 8080]]}, "priority": 500}
    p = ctl.data(pq, {"in": pol}, role="operator")["createPolicy"]
    with ctl.rest() as r:
        got = r.get(f"{PREFIX}/policies/gp1")
    assert got.headers["etag"] == p["etag"] and p["match"] == {"proto": 6, "dstPorts": "443,8000-8080"}
    clash = ctl.q(pq, {"in": {**pol, "name": "gp2"}}, role="operator")["errors"][0]["extensions"]
    assert clash == {"code": "CONFLICT", "status": 409, "field": "Policy.priority"}
    rp = ctl.data("""mutation($e: String) { replacePolicy(name: "gp1", ifMatch: $e,
                       input: {match: {proto: "udp"}, priority: 501, app: "video"}) { etag priority app } }""",
                  {"e": p["etag"]}, role="operator")["replacePolicy"]
    assert rp["priority"] == 501 and rp["app"] == "video"
    assert ctl.data('mutation { deletePolicy(name: "gp1") }', role="operator") == {"deletePolicy": True}
    with ctl.rest() as r:
        assert r.get(f"{PREFIX}/policies/gp1").status_code == 404
    gone = ctl.q('mutation { deletePolicy(name: "gp1") }', role="operator")["errors"][0]["extensions"]
    assert gone["code"] == "NOT_FOUND" and gone["status"] == 404

    # failover settings
    with ctl.rest() as r:
        tag = r.get(f"{PREFIX}/failover").headers["etag"]
    fo = ctl.data("""mutation($e: String) { setFailover(ifMatch: $e, input: {detectMs: 300}) { detectMs etag } }""",
                  {"e": tag}, role="operator")["setFailover"]
    with ctl.rest() as r:
        got = r.get(f"{PREFIX}/failover")
    assert fo["detectMs"] == 300 == got.json()["detect_ms"] and fo["etag"] == got.headers["etag"]

    # delete with If-Match
    with ctl.rest() as r:
        tag = r.get(f"{PREFIX}/sites/gs1").headers["etag"]
    assert ctl.data('mutation($e: String) { deleteSite(name: "gs1", ifMatch: $e) }', {"e": tag},
                    role="operator") == {"deleteSite": True}
    with ctl.rest() as r:
        assert r.get(f"{PREFIX}/sites/gs1").status_code == 404
    actions = [(a["action"], a["actor"]) for a in audit_rows(ctl, 12) if a["ok"]]
    for want in ("site.delete", "failover.replace", "policy.delete", "policy.replace", "policy.create",
                 "site.replace"):
        assert (want, "g-operator") in actions


def test_users_keys_and_tokens_mutations(ctl: Ctl) -> None:
    u = ctl.data(f'mutation {{ addUser(name: "gu1", password: "{PASSWORD}", role: viewer) {{ name role disabled }} }}')
    assert u["addUser"] == {"name": "gu1", "role": "viewer", "disabled": False}
    u = ctl.data('mutation { updateUser(name: "gu1", role: operator, disabled: true) { name role disabled } }')
    assert u["updateUser"] == {"name": "gu1", "role": "operator", "disabled": True}
    with ctl.rest() as r:
        rest = {x["name"]: x for x in r.get(f"{PREFIX}/users").json()["items"]}
    assert rest["gu1"]["role"] == "operator" and rest["gu1"]["disabled"]
    short = ctl.q('mutation { addUser(name: "gu2", password: "short", role: viewer) { name } }')["errors"][0]
    assert short["extensions"]["code"] == "BAD_USER_INPUT" and short["extensions"]["field"] == "password"
    assert ctl.data('mutation { removeUser(name: "gu1") }') == {"removeUser": True}
    last = ctl.q('mutation { updateUser(name: "admin", role: viewer) { name } }')["errors"][0]["extensions"]
    assert last["code"] == "CONFLICT"

    k = ctl.data('mutation { createApiKey(name: "gk", role: operator, expiresS: 600) '
                 '{ secret key { id name role prefix revoked } } }')["createApiKey"]
    assert k["key"]["role"] == "operator" and k["secret"].startswith(k["key"]["prefix"])
    assert ctl.data("{ me { kind role } }", token=k["secret"])["me"] == {"kind": "apikey", "role": "operator"}
    assert ctl.data('mutation($id: String!) { revokeApiKey(id: $id) }', {"id": k["key"]["id"]})["revokeApiKey"]
    assert ctl.post("{ me { name } }", token=k["secret"]).status_code == 401

    t = ctl.data('mutation { createToken(site: "s3", ttlS: 600) { token meta { id site revoked } } }',
                 role="operator")["createToken"]
    assert t["meta"]["site"] == "s3" and t["token"].startswith("pnt1.s3.")
    assert ctl.data('mutation($id: String!) { revokeToken(id: $id) }', {"id": t["meta"]["id"]},
                    role="operator")["revokeToken"]
    with ctl.rest() as r:
        tok = next(x for x in r.get(f"{PREFIX}/tokens").json()["items"] if x["id"] == t["meta"]["id"])
    assert tok["revoked"]
    bad = ctl.q('mutation { createToken(site: "nowhere") { token } }', role="operator")["errors"][0]
    assert bad["extensions"]["field"] == "site"
    rows = [(a["action"], a["actor"]) for a in audit_rows(ctl, 15)]
    for want in [("user.create", "admin"), ("user.update", "admin"), ("user.delete", "admin"),
                 ("apikey.create", "admin"), ("apikey.revoke", "admin"), ("token.create", "g-operator"),
                 ("token.revoke", "g-operator")]:
        assert want in rows, (want, rows)


# -- limits ------------------------------------------------------------------------------------------------


def limit_error(body: dict[str, Any], limit: str) -> dict[str, Any]:
    assert body["data"] is None
    errs = [e for e in body["errors"] if e.get("extensions", {}).get("limit") == limit]
    assert errs, body["errors"]
    return errs[0]


def test_limits_refuse_with_the_limit_named_and_the_server_answers_after(ctl: Ctl) -> None:
    deep = "{ sites { " + "paths { " * 13 + "id" + " }" * 13 + " } }"
    e = limit_error(ctl.q(deep, role="viewer"), "depth")
    assert e["message"] == "query depth 15 exceeds the limit 10" and e["extensions"]["value"] == 15
    wide = "{ " + " ".join(f"a{i}: topology {{ mesh }}" for i in range(200)) + " }"
    e = limit_error(ctl.q(wide, role="viewer"), "aliases")
    assert e["message"] == "aliases 200 exceed the limit 30"
    e = limit_error(ctl.q("{ flows(first: 1000000) { nextCursor } }", role="viewer"), "page")
    assert e["message"] == "page size first: 1000000 exceeds the limit 1000"
    e = limit_error(ctl.q("query($n: Int!) { flows(first: $n) { nextCursor } }", {"n": 5000}, role="viewer"),
                    "page")
    assert e["extensions"] == {"code": "LIMIT_EXCEEDED", "limit": "page", "value": 5000, "max": 1000}
    e = limit_error(ctl.q("{ sites { paths { history(first: 1000) { items { ts rttMs } } } } }", role="viewer"),
                    "complexity")
    assert re.fullmatch(r"query complexity \d+ exceeds the limit 50000", e["message"])
    huge = "{ " + " ".join("me { name }" for _ in range(3000)) + " }"
    e = limit_error(ctl.q(huge, role="viewer"), "tokens")
    assert e["message"] == "query tokens 12002 exceed the limit 5000"
    # nothing ran, and the server answers a normal query at once
    t0 = time.perf_counter()
    assert ctl.data("{ me { name } sites { name } }", role="viewer")["me"]["name"] == "g-viewer"
    assert time.perf_counter() - t0 < 2.0
    # the cost of a query that passes is reported
    body = ctl.q("{ flows(first: 10) { items { ts } } }", role="viewer")
    assert body["extensions"]["patronus"]["complexity"] == 1 + 10 * (1 + 1)


# -- data loaders: store round trips -------------------------------------------------------------------------


def test_100_sites_with_paths_and_metrics_cost_a_constant_number_of_store_queries(ctl: Ctl) -> None:
    q = "{ sites { name status uplinks { name } paths { id state { status } latest { rttMs ts } } } }"
    body = ctl.q(q, role="viewer")
    assert not body.get("errors")
    sites = [s for s in body["data"]["sites"] if re.fullmatch(r"s\d+", s["name"])]
    total = len(body["data"]["sites"])   # other tests may have added one (one uplink each)
    assert len(sites) == SITES and all(len(s["paths"]) == total - 1 for s in sites)
    n = body["extensions"]["patronus"]["storeQueries"]
    # the mesh, the agents, the latest metrics of all 9,900 path references, their states: not one per site
    assert n <= 5, n
    s0 = next(s for s in sites if s["name"] == "s0")
    assert {p["id"]: p["latest"] for p in s0["paths"]}["s0.isp~s9.isp"]["rttMs"] == 20.0
    assert {p["id"]: p["state"] for p in s0["paths"]}["s0.isp~s1.isp"] == {"status": "down"}
    # one site costs the same bound as a hundred (not always the same count: a cache entry may expire between)
    one = ctl.q('{ site(name: "s0") { paths { id latest { rttMs } state { status } } } }', role="viewer")
    assert one["extensions"]["patronus"]["storeQueries"] <= 5


# -- cache ---------------------------------------------------------------------------------------------------


def test_cache_a_write_shows_in_the_next_read_and_counters_move(ctl: Ctl) -> None:
    hits = ctl.metric("patronus_controller_graphql_cache_hits_total", 'cache="topology"')
    ctl.data("{ topology { nodes { id } } }")
    ctl.data("{ topology { nodes { id } } }")
    assert ctl.metric("patronus_controller_graphql_cache_hits_total", 'cache="topology"') >= hits + 1
    # a write through REST, then a read: the new site is there
    body = {"name": "gc1", "subnets": ["10.201.0.0/24"], "uplinks": [{"name": "isp", "address": "198.18.1.1"}]}
    with ctl.rest() as r:
        assert r.post(f"{PREFIX}/sites", json=body).status_code == 201
    assert "gc1" in {n["id"] for n in ctl.data("{ topology { nodes { id } } }")["topology"]["nodes"]}
    assert ctl.metric("patronus_controller_graphql_cache_invalidations_total", 'cache="topology"') >= 1
    # and through GraphQL
    ctl.data('mutation { deleteSite(name: "gc1") }')
    assert "gc1" not in {n["id"] for n in ctl.data("{ topology { nodes { id } } }")["topology"]["nodes"]}

    # latest metrics: cached, then an agent's telemetry replaces them in the next read
    pid = "s1.isp~s2.isp"
    q = 'query($id: String!) { path(id: $id) { latest { rttMs } } }'
    assert ctl.data(q, {"id": pid})["path"]["latest"] is None
    m_hits = ctl.metric("patronus_controller_graphql_cache_hits_total", 'cache="metrics"')
    assert ctl.data(q, {"id": pid})["path"]["latest"] is None
    assert ctl.metric("patronus_controller_graphql_cache_hits_total", 'cache="metrics"') >= m_hits + 1
    tok = ctl.data('mutation { createToken(site: "s1") { token } }', role="operator")["createToken"]["token"]
    with ctl.c.client(tok) as c:
        r = c.post(f"{PREFIX}/agent/enrol", json={"interval_s": 5})
        assert r.status_code == 201, r.text
        enrolled = r.json()
    with ctl.c.client(enrolled["credential"]) as c:
        r = c.post(f"{PREFIX}/agent/telemetry", json={
            "site": "s1", "metrics": [{"ts": time.time(), "path": pid, "rtt_ms": 42.5, "jitter_ms": 1.0,
                                       "loss_pct": 0.0}]})
        assert r.status_code == 200, r.text
    assert ctl.data(q, {"id": pid})["path"]["latest"] == {"rttMs": 42.5}
    assert ctl.metric("patronus_controller_graphql_cache_invalidations_total", 'cache="metrics"') >= 1
    # the site's status comes from its agent; revoking the agent shows at once
    assert ctl.data('{ site(name: "s1") { status } }')["site"]["status"] == "Active"
    aid = next(a["id"] for a in ctl.data("{ agents { id site } }")["agents"] if a["site"] == "s1")
    assert ctl.data('mutation($id: String!) { revokeAgent(id: $id) }', {"id": aid}, role="operator")["revokeAgent"]
    assert ctl.data('{ site(name: "s1") { status } }')["site"]["status"] == "Revoked"
    assert ("agent.revoke", "g-operator") in [(a["action"], a["actor"]) for a in audit_rows(ctl, 5)]


# -- the complexity calculator (pure) --------------------------------------------------------------------------

_TEST_SDL = """
type Query { node(first: Int = 7): Page  items: [Node]  one: Node  leaf: Int }
type Page { items: [Node]  total: Int }
type Node { items: [Node]  one: Node  page(first: Int): Page  leaf: Int }
"""

# a selection: (field, first or None, children); fields by parent type
_FIELDS = {"Query": ["node", "items", "one", "leaf"], "Page": ["items", "total"],
           "Node": ["items", "one", "page", "leaf"]}
_CHILD = {"node": "Page", "page": "Page", "items": "Node", "one": "Node"}
_DEFAULT = {"node": 7, "page": 10}


def _tree(parent: str, depth: int) -> st.SearchStrategy[list[tuple[str, int | None, list[Any]]]]:
    def field(name: str) -> st.SearchStrategy[tuple[str, int | None, list[Any]]]:
        first = st.none() | st.integers(1, 1000) if name in ("node", "page") else st.none()
        if name in _CHILD and depth > 0:
            kids = _tree(_CHILD[name], depth - 1)
        else:
            kids = st.just([]) if name not in _CHILD else st.nothing()
        return st.tuples(st.just(name), first, kids)

    names = [f for f in _FIELDS[parent] if f not in _CHILD or depth > 0]
    return st.lists(st.sampled_from(names).flatmap(field), min_size=1, max_size=3)


def _render(sel: list[tuple[str, int | None, list[Any]]]) -> str:
    parts = []
    for i, (name, first, kids) in enumerate(sel):
        arg = f"(first: {first})" if first is not None else ""
        parts.append(f"f{i}: {name}{arg}" + (" { " + _render(kids) + " }" if kids else ""))
    return " ".join(parts)


def _model(sel: list[tuple[str, int | None, list[Any]]], in_page: bool = False) -> int:
    cost = 0
    for name, first, kids in sel:
        if name in _DEFAULT:
            mult, page = (first if first is not None else _DEFAULT[name]), True
        elif name == "items":
            mult, page = (1 if in_page else 10), False
        else:
            mult, page = 1, False
        cost += 1 + mult * _model(kids, page)
    return cost


def _depth(sel: list[tuple[str, int | None, list[Any]]]) -> int:
    return max((1 + _depth(k) for _, _, k in sel), default=0)


@settings(max_examples=200, deadline=None)
@given(_tree("Query", 4))
def test_query_cost_and_depth_match_a_model(sel: list[tuple[str, int | None, list[Any]]]) -> None:
    from graphql import build_schema, parse

    from patronus.controller.gql.limits import alias_count, query_cost, query_depth

    schema = build_schema(_TEST_SDL)
    doc = parse("{ " + _render(sel) + " }")
    cost, bad = query_cost(doc, schema, default_list=10)
    assert cost == _model(sel) and bad == []
    assert query_depth(doc) == _depth(sel)

    def n(s: list[Any]) -> int:
        return sum(1 + n(k) for _, _, k in s)

    assert alias_count(doc) == n(sel)
    # the same selection in a fragment costs the same, spread twice twice as much
    frag = parse("query { ...F ...F } fragment F on Query { " + _render(sel) + " }")
    assert query_cost(frag, schema, default_list=10)[0] == 2 * cost
    assert query_depth(frag) == _depth(sel)


def test_query_cost_variables_and_fragment_bombs() -> None:
    from graphql import build_schema, parse

    from patronus.controller.gql.limits import query_cost, query_depth

    schema = build_schema(_TEST_SDL)
    doc = parse("query($n: Int) { node(first: $n) { items { leaf } } }")
    assert query_cost(doc, schema, {"n": 50})[0] == 1 + 50 * (1 + 1 * 1)
    assert query_cost(doc, schema, {})[0] == 1 + 7 * 2   # the argument's default
    assert query_cost(doc, schema, {"n": 5000})[1][0][0] == 5000
    # 2^40 expansions of a fragment chain, measured in microseconds (each fragment once)
    frags = " ".join(f"fragment F{i} on Node {{ one {{ ...F{i + 1} ...F{i + 1} }} }}" for i in range(40))
    bomb = parse("{ one { ...F0 } } " + frags + " fragment F40 on Node { leaf }")
    t0 = time.perf_counter()
    cost, _ = query_cost(bomb, schema)
    assert cost > 2 ** 40 and query_depth(bomb) == 42 and time.perf_counter() - t0 < 0.5


def test_cache_unit_generation_ttl_and_eviction() -> None:
    from patronus.controller.gql.cache import Cache

    now = [0.0]
    c = Cache(ttl_s={"metrics": 5.0}, max_entries=2, clock=lambda: now[0])
    for k in "abc":
        c.put("metrics", k, k.upper(), c.generation("metrics", k))
    assert c.get("metrics", "a") == (False, None) and c.get("metrics", "c") == (True, "C")   # a pushed out
    now[0] = 10.0
    assert c.get("metrics", "c") == (False, None)   # expired
    g = c.generation("metrics", "b")
    c.invalidate("metrics")                          # everything, as a mesh change does to the topology
    c.put("metrics", "b", "stale", g)
    assert c.get("metrics", "b") == (False, None)
    s = c.stats()["metrics"]
    assert s["evictions"] == 2 and s["hits"] == 1 and s["misses"] == 3
