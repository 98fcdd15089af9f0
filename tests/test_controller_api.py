"""The controller's REST API against the real server: uvicorn over TLS on
loopback (``patronus controller run`` in a subprocess), real HTTP clients.

Covers: health without auth, 401 on every other route, the RBAC matrix
(every route of the OpenAPI document x admin, operator, viewer, anonymous,
against PERMISSIONS), sites and policies CRUD with ETags, problem details
naming the field, 409 and 412, the audit log's before/after, refresh-token
rotation, logout, login brute force (429 + Retry-After), body limits,
SIGTERM exit 0, ``init`` refusing an existing directory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pyotp = pytest.importorskip("pyotp")

from patronus.controller import server  # noqa: E402
from patronus.controller.app import CREDENTIALS, PREFIX, PUBLIC, ROUTE_ACTIONS  # noqa: E402
from patronus.controller.auth import Role, allowed  # noqa: E402

from .controller_server import Controller, running_controller  # noqa: E402

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"
HEALTH = {("GET", "/healthz"), ("GET", "/livez"), ("GET", "/readyz")}
ROLES = ["admin", "operator", "viewer"]
_n = itertools.count(1)


def site_body(n: int | None = None) -> dict[str, Any]:
    n = next(_n) if n is None else n
    return {"name": f"s{n}", "subnets": [f"10.{100 + n // 250}.{n % 250}.0/24"],
            "uplinks": [{"name": "isp1", "address": f"198.18.{n // 250}.{n % 250 + 1}"}]}


def policy_body(n: int | None = None) -> dict[str, Any]:
    n = next(_n) if n is None else n
    return {"name": f"p{n}", "match": {"proto": "udp", "dst_ports": "5060-5061"}, "priority": 1000 + n}


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_controller(tmp_path_factory.mktemp("ctl") / "state") as c:
        c.tokens = {"admin": c.login("admin", c.admin_password)}
        with c.client(c.tokens["admin"]["access_token"]) as a:
            for role in ("operator", "viewer"):
                r = a.post(f"{PREFIX}/users", json={"name": f"u-{role}", "password": PASSWORD, "role": role})
                assert r.status_code == 201, r.text
        for role in ("operator", "viewer"):
            c.tokens[role] = c.login(f"u-{role}", PASSWORD)
        yield c


def admin(ctl: Controller) -> httpx.Client:
    return ctl.client(ctl.tokens["admin"]["access_token"])


def is_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and "type" in body
    return body


def openapi_routes(ctl: Controller) -> list[tuple[str, str]]:
    with admin(ctl) as a:
        doc = a.get(f"{PREFIX}/openapi.json").raise_for_status().json()
    return sorted((m.upper(), p) for p, ops in doc["paths"].items() for m in ops
                  if m in ("get", "post", "put", "delete", "patch"))


# -- health, 401 everywhere else, every route has a rule ---------------------------------


def test_health_routes_need_no_auth(ctl: Controller) -> None:
    with ctl.client() as c:
        for path in ("/healthz", "/livez", "/readyz"):
            r = c.get(path)
            assert r.status_code == 200, (path, r.text)


def test_every_route_has_a_rule(ctl: Controller) -> None:
    server.build_app(ctl.state_dir)   # fills ROUTE_ACTIONS in this process, from the same code
    routes = openapi_routes(ctl)
    assert len(routes) >= 25
    missing = [r for r in routes if r not in ROUTE_ACTIONS]
    assert not missing, f"routes without an RBAC rule: {missing}"
    assert {r for r, a in ROUTE_ACTIONS.items() if a == PUBLIC} == HEALTH
    assert {r for r, a in ROUTE_ACTIONS.items() if a == CREDENTIALS} == \
        {("POST", f"{PREFIX}/auth/login"), ("POST", f"{PREFIX}/auth/refresh")}
    for action in set(ROUTE_ACTIONS.values()) - {PUBLIC, CREDENTIALS}:
        allowed(Role.ADMIN, action)   # KeyError for an action PERMISSIONS does not know


def test_every_other_route_is_401_without_a_token(ctl: Controller) -> None:
    routes = openapi_routes(ctl)
    with ctl.client() as c:
        assert c.get(f"{PREFIX}/openapi.json").status_code == 401
        for method, path in routes:
            if ROUTE_ACTIONS.get((method, path)) in (PUBLIC, CREDENTIALS):
                continue
            url = path.replace("{name}", "x").replace("{key_id}", "x")
            for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic YTpi"}):
                r = c.request(method, url, headers=headers, json={})
                body = is_problem(r, 401)
                assert "Bearer" in r.headers.get("www-authenticate", ""), (method, path, body)


# -- RBAC matrix ------------------------------------------------------------------------


class Matrix:
    """Fresh objects for each request, so a permitted DELETE or PUT acts on
    something that exists and the next request is not disturbed."""

    def __init__(self, ctl: Controller, a: httpx.Client) -> None:
        self.ctl = ctl
        self.a = a

    def prepare(self, method: str, path: str, token: str | None) -> tuple[str, dict[str, Any] | None]:
        a = self.a
        if path.startswith(f"{PREFIX}/sites"):
            body = site_body()
            if "{name}" in path:
                a.post(f"{PREFIX}/sites", json=body).raise_for_status()
                return path.replace("{name}", body["name"]), body
            return path, body
        if path.startswith(f"{PREFIX}/policies"):
            body = policy_body()
            if "{name}" in path:
                a.post(f"{PREFIX}/policies", json=body).raise_for_status()
                return path.replace("{name}", body["name"]), body
            return path, body
        if path.startswith(f"{PREFIX}/tokens"):
            site = site_body()
            a.post(f"{PREFIX}/sites", json=site).raise_for_status()
            body = {"site": site["name"]}
            if "{token_id}" in path:
                r = a.post(f"{PREFIX}/tokens", json=body).raise_for_status().json()
                return path.replace("{token_id}", r["id"]), None
            return path, body
        if path == "/api/graphql":
            return path, {"query": "{ me { name role } }"}
        if path == f"{PREFIX}/failover":
            return path, {"failback_hold_s": 30.0 + next(_n)}
        if path == f"{PREFIX}/agents/{{site}}/bgp":   # a site whose agent reported its BGP edge
            site = site_body()
            a.post(f"{PREFIX}/sites", json=site).raise_for_status()
            tok = a.post(f"{PREFIX}/tokens", json={"site": site["name"]}).raise_for_status().json()["token"]
            with self.ctl.client(tok) as c:
                cred = c.post(f"{PREFIX}/agent/enrol", json={}).raise_for_status().json()["credential"]
            with self.ctl.client(cred) as c:
                c.post(f"{PREFIX}/agent/telemetry", json={"site": site["name"], "bgp": {
                    "sessions": {"10.0.0.2": "up"}, "received": 0,
                    "speaker": {"alive": True, "exits": 0, "restarts": 0}}}).raise_for_status()
            return path.replace("{site}", site["name"]), None
        if "{agent_id}" in path:   # a real agent: a token, enrolled
            site = site_body()
            a.post(f"{PREFIX}/sites", json=site).raise_for_status()
            tok = a.post(f"{PREFIX}/tokens", json={"site": site["name"]}).raise_for_status().json()["token"]
            with self.ctl.client(tok) as c:
                cred = c.post(f"{PREFIX}/agent/enrol", json={}).raise_for_status().json()
            return path.replace("{agent_id}", cred["id"]), None
        if path.startswith(f"{PREFIX}/users"):
            n = next(_n)
            body = {"name": f"mu{n}", "password": PASSWORD, "role": "viewer"}
            if "{name}" in path:
                a.post(f"{PREFIX}/users", json=body).raise_for_status()
                return path.replace("{name}", body["name"]), {"role": "operator"} if method == "PATCH" else None
            return path, body
        if path.startswith(f"{PREFIX}/api-keys"):
            body = {"name": f"k{next(_n)}", "role": "viewer"}
            if "{key_id}" in path:
                r = a.post(f"{PREFIX}/api-keys", json=body).raise_for_status().json()
                return path.replace("{key_id}", r["id"]), None
            return path, body
        if path == f"{PREFIX}/auth/totp/confirm":
            code = "000000"
            if token:
                with self.ctl.client(token) as c:
                    r = c.post(f"{PREFIX}/auth/totp")
                    if r.status_code == 200:
                        code = pyotp.TOTP(r.json()["secret"]).now()
            return path, {"code": code}
        if path == f"{PREFIX}/auth/logout":
            return path, {}
        return path, None


def test_rbac_matrix(ctl: Controller) -> None:
    server.build_app(ctl.state_dir)
    routes = [r for r in openapi_routes(ctl) if ROUTE_ACTIONS[r] not in (PUBLIC, CREDENTIALS)]
    with admin(ctl) as a:
        # users of their own: the matrix enables TOTP and logs them out
        for role in ROLES:
            a.post(f"{PREFIX}/users", json={"name": f"m-{role}", "password": PASSWORD, "role": role}) \
                .raise_for_status()
        tokens = {role: ctl.login(f"m-{role}", PASSWORD)["access_token"] for role in ROLES}
        spare = {role: ctl.login(f"m-{role}", PASSWORD)["access_token"] for role in ROLES}
        m = Matrix(ctl, a)
        seen = []
        # logout last: it revokes the token it is called with
        routes.sort(key=lambda r: r[1] == f"{PREFIX}/auth/logout")
        for method, path in routes:
            action = ROUTE_ACTIONS[(method, path)]
            for role in [*ROLES, None]:
                token = None if role is None else (spare[role] if path.endswith("/logout") else tokens[role])
                url, body = m.prepare(method, path, token)
                with ctl.client(token) as c:
                    r = c.request(method, url, json=body)
                if role is None:
                    want = "401"
                    ok = r.status_code == 401
                elif allowed(Role(role), action):
                    want = "allowed"
                    ok = r.status_code < 400
                else:
                    want = "403"
                    ok = r.status_code == 403
                seen.append((method, path, role, r.status_code))
                assert ok, f"{method} {path} as {role or 'anonymous'} ({action}): want {want}, got " \
                           f"{r.status_code} {r.text[:300]}"
    assert len(seen) == 4 * len(routes)
    # the matrix confirmed TOTP for its users: a password alone is no longer enough
    with ctl.client() as c:
        r = c.post(f"{PREFIX}/auth/login", json={"name": "m-viewer", "password": PASSWORD})
        assert is_problem(r, 401).get("totp_required") is True


def test_unknown_route_is_a_problem(ctl: Controller) -> None:
    with admin(ctl) as a:
        is_problem(a.get(f"{PREFIX}/nosuch"), 404)
        is_problem(a.patch(f"{PREFIX}/sites"), 405)


def test_api_key_is_scoped_to_its_role(ctl: Controller) -> None:
    with admin(ctl) as a:
        key = a.post(f"{PREFIX}/api-keys", json={"name": "ro", "role": "viewer"}).raise_for_status().json()
    assert key["secret"].startswith("pnk_")
    with ctl.client(key["secret"]) as c:
        assert c.get(f"{PREFIX}/sites").status_code == 200
        is_problem(c.post(f"{PREFIX}/sites", json=site_body()), 403)
        assert c.get(f"{PREFIX}/auth/me").json()["role"] == "viewer"
    with admin(ctl) as a:
        assert a.delete(f"{PREFIX}/api-keys/{key['id']}").status_code == 204
    with ctl.client(key["secret"]) as c:
        is_problem(c.get(f"{PREFIX}/sites"), 401)


# -- sites and policies -----------------------------------------------------------------


def test_sites_crud_etag_and_field_errors(ctl: Controller) -> None:
    body = site_body()
    name = body["name"]
    with admin(ctl) as a:
        r = a.post(f"{PREFIX}/sites", json=body)
        assert r.status_code == 201, r.text
        etag = r.headers["etag"]
        assert r.headers["location"] == f"{PREFIX}/sites/{name}"
        assert r.json()["uplinks"][0]["mtu"] == 1500
        r = a.get(f"{PREFIX}/sites/{name}")
        assert r.status_code == 200 and r.headers["etag"] == etag
        assert name in [s["name"] for s in a.get(f"{PREFIX}/sites").json()["items"]]
        is_problem(a.post(f"{PREFIX}/sites", json=body), 409)

        bad = site_body()
        bad["subnets"] = ["10.0.0.1/8"]
        p = is_problem(a.post(f"{PREFIX}/sites", json=bad), 422)
        assert p["field"] == "Site.subnets" and "host bits" in p["detail"]
        bad["subnets"] = ["banana"]
        assert is_problem(a.post(f"{PREFIX}/sites", json=bad), 422)["field"] == "Site.subnets"
        p = is_problem(a.post(f"{PREFIX}/sites", json={"name": "x", "subnets": []}), 422)
        assert p["field"] == "uplinks"
        p = is_problem(a.post(f"{PREFIX}/sites", json={**site_body(), "colour": "red"}), 422)
        assert p["field"] == "colour"

        changed = {**body, "uplinks": [{**body["uplinks"][0], "mtu": 1400}]}
        r = a.put(f"{PREFIX}/sites/{name}", json=changed, headers={"If-Match": etag})
        assert r.status_code == 200, r.text
        etag2 = r.headers["etag"]
        assert etag2 != etag and r.json()["uplinks"][0]["mtu"] == 1400
        # a second writer with the old version loses: 412, nothing changed
        stale = {**body, "uplinks": [{**body["uplinks"][0], "mtu": 1300}]}
        is_problem(a.put(f"{PREFIX}/sites/{name}", json=stale, headers={"If-Match": etag}), 412)
        is_problem(a.delete(f"{PREFIX}/sites/{name}", headers={"If-Match": etag}), 412)
        assert a.get(f"{PREFIX}/sites/{name}").json()["uplinks"][0]["mtu"] == 1400
        p = is_problem(a.put(f"{PREFIX}/sites/{name}", json={**changed, "name": "other"}), 422)
        assert p["field"] == "Site.name"
        is_problem(a.put(f"{PREFIX}/sites/nosuch", json={**changed, "name": "nosuch"}), 404)

        assert a.delete(f"{PREFIX}/sites/{name}", headers={"If-Match": etag2}).status_code == 204
        is_problem(a.get(f"{PREFIX}/sites/{name}"), 404)
        is_problem(a.delete(f"{PREFIX}/sites/{name}"), 404)


def test_policies_crud_priority_clash_and_etag(ctl: Controller) -> None:
    with admin(ctl) as a:
        a.post(f"{PREFIX}/sites", json=site_body()).raise_for_status()
        body = policy_body()
        r = a.post(f"{PREFIX}/policies", json=body)
        assert r.status_code == 201, r.text
        etag = r.headers["etag"]
        assert r.json()["match"]["proto"] == 17
        clash = {**policy_body(), "priority": body["priority"]}
        p = is_problem(a.post(f"{PREFIX}/policies", json=clash), 409)
        assert p["field"] == "Policy.priority" and body["name"] in p["detail"]
        is_problem(a.post(f"{PREFIX}/policies", json=body), 409)
        p = is_problem(a.post(f"{PREFIX}/policies", json={**policy_body(), "match": {"dscp": 64}}), 422)
        assert p["field"] == "Match.dscp"
        p = is_problem(a.post(f"{PREFIX}/policies", json={**policy_body(), "prefer": ["nope"]}), 422)
        assert p["field"] == "Policy.prefer"

        other = policy_body()
        a.post(f"{PREFIX}/policies", json=other).raise_for_status()
        # moving onto another policy's priority is a clash too
        is_problem(a.put(f"{PREFIX}/policies/{body['name']}", json={**body, "priority": other["priority"]}), 409)
        r = a.put(f"{PREFIX}/policies/{body['name']}", json={**body, "qos": {"dscp": 46}},
                  headers={"If-Match": etag})
        assert r.status_code == 200 and r.json()["qos"]["dscp"] == 46
        is_problem(a.put(f"{PREFIX}/policies/{body['name']}", json=body, headers={"If-Match": etag}), 412)
        r = a.get(f"{PREFIX}/policies/{body['name']}")
        assert r.json()["qos"]["dscp"] == 46
        assert a.delete(f"{PREFIX}/policies/{body['name']}", headers={"If-Match": r.headers["etag"]}) \
            .status_code == 204
        names = [p["name"] for p in a.get(f"{PREFIX}/policies").json()["items"]]
        assert body["name"] not in names and other["name"] in names


def test_paths_topology_events(ctl: Controller) -> None:
    with admin(ctl) as a:
        x, y = site_body(), site_body()
        y["uplinks"].append({"name": "lte", "address": f"198.19.{next(_n) % 250}.1"})
        for s in (x, y):
            a.post(f"{PREFIX}/sites", json=s).raise_for_status()
        paths = a.get(f"{PREFIX}/paths").raise_for_status().json()["items"]
        between = [p for p in paths if set(p["sites"]) == {x["name"], y["name"]}]
        assert len(between) == 2 and {p["uplinks"][1] for p in between} == {"isp1", "lte"}
        assert sorted(p["index"] for p in paths) == list(range(len(paths)))
        topo = a.get(f"{PREFIX}/topology").raise_for_status().json()
        assert {x["name"], y["name"]} <= {n["id"] for n in topo["nodes"]}
        assert len(topo["edges"]) == len(paths)
        assert a.get(f"{PREFIX}/events").raise_for_status().json() == {"items": []}


def test_audit_has_before_and_after_of_every_mutation(ctl: Controller) -> None:
    with admin(ctl) as a:
        body = site_body()
        name = body["name"]
        etag = a.post(f"{PREFIX}/sites", json=body).raise_for_status().headers["etag"]
        changed = {**body, "uplinks": [{**body["uplinks"][0], "cost": 5}]}
        etag = a.put(f"{PREFIX}/sites/{name}", json=changed, headers={"If-Match": etag}).headers["etag"]
        a.put(f"{PREFIX}/sites/{name}", json=body, headers={"If-Match": '"stale"'})
        a.delete(f"{PREFIX}/sites/{name}", headers={"If-Match": etag}).raise_for_status()
        rows = [r for r in a.get(f"{PREFIX}/audit?limit=1000").json()["items"] if r["target"] == f"site/{name}"]
    rows.reverse()   # oldest first
    assert [(r["action"], r["ok"]) for r in rows] == \
        [("site.create", True), ("site.replace", True), ("site.replace", False), ("site.delete", True)]
    create, replace, _, delete = rows
    assert create["before"] is None and create["after"]["uplinks"][0]["cost"] == 0
    assert replace["before"]["uplinks"][0]["cost"] == 0 and replace["after"]["uplinks"][0]["cost"] == 5
    assert delete["before"]["uplinks"][0]["cost"] == 5 and delete["after"] is None
    assert all(r["actor"] == "admin" and r["remote"] == "127.0.0.1" for r in rows)
    with ctl.client(ctl.tokens["viewer"]["access_token"]) as v:
        is_problem(v.get(f"{PREFIX}/audit"), 403)


# -- tokens -----------------------------------------------------------------------------------


def test_refresh_rotation_and_logout(ctl: Controller) -> None:
    with admin(ctl) as a:
        a.post(f"{PREFIX}/users", json={"name": "rot", "password": PASSWORD, "role": "viewer"}).raise_for_status()
    t1 = ctl.login("rot", PASSWORD)
    assert t1["token_type"] == "bearer" and t1["expires_in"] > 0
    with ctl.client() as c:
        r = c.post(f"{PREFIX}/auth/refresh", json={"refresh_token": t1["refresh_token"]})
        assert r.status_code == 200, r.text
        t2 = r.json()
        assert t2["refresh_token"] != t1["refresh_token"] and t2["access_token"] != t1["access_token"]
        with ctl.client(t2["access_token"]) as u:
            assert u.get(f"{PREFIX}/auth/me").json() == {"name": "rot", "role": "viewer", "kind": "user",
                                                        "key_id": None}
        # the old refresh token again: refused, and its whole family is revoked
        is_problem(c.post(f"{PREFIX}/auth/refresh", json={"refresh_token": t1["refresh_token"]}), 401)
        is_problem(c.post(f"{PREFIX}/auth/refresh", json={"refresh_token": t2["refresh_token"]}), 401)

    t3 = ctl.login("rot", PASSWORD)
    with ctl.client(t3["access_token"]) as u:
        assert u.get(f"{PREFIX}/sites").status_code == 200
        r = u.post(f"{PREFIX}/auth/logout", json={"refresh_token": t3["refresh_token"]})
        assert r.status_code == 204, r.text
        # at once: the same access token no longer works, nor does its refresh token
        is_problem(u.get(f"{PREFIX}/sites"), 401)
    with ctl.client() as c:
        is_problem(c.post(f"{PREFIX}/auth/refresh", json={"refresh_token": t3["refresh_token"]}), 401)


def test_wrong_password_is_401_problem(ctl: Controller) -> None:
    with ctl.client() as c:
        is_problem(c.post(f"{PREFIX}/auth/login", json={"name": "u-viewer", "password": "wrong password!"}), 401)
        is_problem(c.post(f"{PREFIX}/auth/login", json={"name": "u-viewer"}), 422)


def test_body_over_1_mib_is_413(ctl: Controller) -> None:
    with admin(ctl) as a:
        r = a.post(f"{PREFIX}/sites", content=b"{" + b" " * (1 << 20) + b"}",
                   headers={"Content-Type": "application/json"})
        is_problem(r, 413)

        def chunks() -> Any:
            for _ in range(20):
                yield b" " * 65536

        is_problem(a.post(f"{PREFIX}/sites", content=chunks(), headers={"Content-Type": "application/json"}), 413)


# -- brute force, SIGTERM, init ------------------------------------------------------------------


def test_login_brute_force_429_then_sigterm_exits_0(tmp_path: Path) -> None:
    ctl = Controller(tmp_path / "bf")
    ctl.start()
    try:
        statuses = []
        with ctl.client() as c:
            for i in range(12):
                r = c.post(f"{PREFIX}/auth/login", json={"name": "admin", "password": f"guess {i}"})
                statuses.append(r.status_code)
                if r.status_code == 429:
                    break
            p = is_problem(r, 429)
            assert int(r.headers["retry-after"]) >= 1, (r.headers, p)
            assert set(statuses[:-1]) == {401}
            # the right password is refused too while the limit holds
            r = c.post(f"{PREFIX}/auth/login", json={"name": "admin", "password": ctl.admin_password})
            is_problem(r, 429)
            with admin_after(ctl) as rows:
                assert any(row["action"].startswith("auth.") or "login" in row["action"] for row in rows)
    finally:
        rc = ctl.stop()
    assert rc == 0, ctl.log.read_text()[-2000:]


class admin_after:
    """The audit log read straight from the controller database."""

    def __init__(self, ctl: Controller) -> None:
        from patronus.controller.db import ControllerDB

        self.db = ControllerDB(server.files(ctl.state_dir)["db"], create=False)

    def __enter__(self) -> list[dict[str, Any]]:
        return self.db.audit_log(limit=1000)

    def __exit__(self, *exc: object) -> None:
        self.db.close()


def test_init_refuses_existing_state_and_keeps_secrets_private(ctl: Controller, tmp_path: Path) -> None:
    with pytest.raises(server.StateDirExists):
        server.init(ctl.state_dir)
    f = server.files(ctl.state_dir)
    for k in ("db", "signing_key", "key"):
        assert stat.S_IMODE(os.stat(f[k]).st_mode) == 0o600, k
    assert stat.S_IMODE(os.stat(ctl.state_dir).st_mode) == 0o700
    assert ctl.info["cert_sha256"] == server.cert_fingerprint(f["cert"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(server.StateDirExists):
        server.init(tmp_path / "full")


def test_cli_init_prints_password_and_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from patronus.cli import main

    assert main(["controller", "init", "--state", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "admin password:" in out and "cert SHA-256:" in out
    assert main(["controller", "init", "--state", str(tmp_path / "c")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


# -- the service publishes an event for every change -----------------------------------------------


def test_service_publishes_every_change(tmp_path: Path) -> None:
    from patronus.controller.db import ControllerDB
    from patronus.controller.service import Service

    async def main() -> list[dict[str, Any]]:
        with ControllerDB(tmp_path / "c.db") as db:
            svc = Service(tmp_path / "s.db", db)
            svc.bind_loop()
            got: list[dict[str, Any]] = []
            svc.changes.subscribe(got.append)
            body = site_body()
            r = await asyncio.to_thread(svc.create_site, body, actor="t")   # from another thread
            await asyncio.to_thread(svc.replace_site, body["name"], body, if_match=r.etag, actor="t")
            svc.create_policy(policy_body(), actor="t")
            svc.delete_site(body["name"], actor="t")
            await asyncio.sleep(0.05)
            return got

    got = asyncio.run(main())
    assert [e["type"] for e in got] == ["site.create", "site.replace", "policy.create", "site.delete"]
    assert [e["seq"] for e in got] == [1, 2, 3, 4]


def test_sigterm_closes_agent_channels_cleanly_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM with an agent's WebSocket open: the agent gets a close frame
    (going away / service restart, not a dropped connection) and the
    controller exits 0 (uvicorn's graceful shutdown is bounded by GRACEFUL_S)."""
    websockets = pytest.importorskip("websockets")
    from .wsclient import connect

    ctl = Controller(tmp_path / "term")
    ctl.start()
    try:
        tok = ctl.login("admin", ctl.admin_password)["access_token"]
        with ctl.client(tok) as a:
            a.post(f"{PREFIX}/sites", json=site_body()).raise_for_status()
            site = a.get(f"{PREFIX}/sites").json()["items"][0]["name"]
            token = a.post(f"{PREFIX}/tokens", json={"site": site}).raise_for_status().json()["token"]
        with ctl.client(token) as c:
            cred = c.post(f"{PREFIX}/agent/enrol", json={"interval_s": 3600}).raise_for_status().json()["credential"]
        url = ctl.url.replace("https://", "wss://") + f"{PREFIX}/agent/ws"
        ctx = ssl.create_default_context(cafile=ctl.cert)
        with connect(url, ssl=ctx, additional_headers={"Authorization": f"Bearer {cred}"}, open_timeout=10) as ws:
            ws.send(json.dumps({"since": None}))
            assert json.loads(ws.recv(timeout=10))["full"]["site"] == site
            assert ctl.proc is not None
            ctl.proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None, "the connection dropped without a close frame"
            assert closed.value.rcvd.code in (1000, 1001, 1012), closed.value.rcvd
    finally:
        rc = ctl.stop(timeout=30)
    assert rc == 0, ctl.log.read_text()[-2000:]
