"""User administration through REST against the real server: an admin
changes a user's role (effective on the user's next request), disables and
enables a user (a disabled user's access and refresh tokens stop working at
once, and enabling brings none back), resets a password (checked as on
create; every session ends); the last enabled admin cannot be demoted or
disabled (409 naming why); every change is one audit row with before and
after and never the password.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from patronus.controller.app import PREFIX  # noqa: E402

from .controller_server import Controller, running_controller  # noqa: E402
from .test_controller_api import is_problem, site_body  # noqa: E402

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_controller(tmp_path_factory.mktemp("users") / "state") as c:
        c.admin_token = c.login("admin", c.admin_password)["access_token"]
        yield c


def admin(ctl: Controller) -> httpx.Client:
    return ctl.client(ctl.admin_token)


def new_user(ctl: Controller, name: str, role: str) -> dict[str, Any]:
    with admin(ctl) as a:
        a.post(f"{PREFIX}/users", json={"name": name, "password": PASSWORD, "role": role}).raise_for_status()
    return ctl.login(name, PASSWORD)


def patch(ctl: Controller, name: str, body: dict[str, Any], token: str | None = None) -> httpx.Response:
    with ctl.client(token or ctl.admin_token) as c:
        return c.patch(f"{PREFIX}/users/{name}", json=body)


def audit(ctl: Controller, target: str) -> list[dict[str, Any]]:
    with admin(ctl) as a:
        items = a.get(f"{PREFIX}/audit", params={"limit": 1000}).raise_for_status().json()["items"]
    return [r for r in reversed(items) if r["action"] == "user.update" and r["target"] == target]


def test_role_change_applies_to_the_next_request(ctl: Controller) -> None:
    tokens = new_user(ctl, "ops1", "operator")
    with ctl.client(tokens["access_token"]) as c:
        assert c.post(f"{PREFIX}/sites", json=site_body(901)).status_code == 201
        r = patch(ctl, "ops1", {"role": "viewer"})
        assert r.status_code == 200, r.text
        assert {k: r.json()[k] for k in ("name", "role", "disabled")} == {"name": "ops1", "role": "viewer",
                                                                          "disabled": False}
        assert c.get(f"{PREFIX}/auth/me").json()["role"] == "viewer"
        is_problem(c.post(f"{PREFIX}/sites", json=site_body(902)), 403)
        assert c.get(f"{PREFIX}/sites").status_code == 200
        assert patch(ctl, "ops1", {"role": "operator"}).status_code == 200
        assert c.post(f"{PREFIX}/sites", json=site_body(902)).status_code == 201
    rows = audit(ctl, "ops1")
    assert [(r["actor"], r["ok"], r["before"]["role"], r["after"]["role"]) for r in rows] == [
        ("admin", True, "operator", "viewer"), ("admin", True, "viewer", "operator")]
    assert rows[0]["remote"] == "127.0.0.1"


def test_disabling_kills_every_token_at_once(ctl: Controller) -> None:
    tokens = new_user(ctl, "ops2", "operator")
    with ctl.client(tokens["access_token"]) as c:
        assert c.get(f"{PREFIX}/auth/me").status_code == 200
        assert patch(ctl, "ops2", {"disabled": True}).json()["disabled"] is True
        is_problem(c.get(f"{PREFIX}/auth/me"), 401)
    with ctl.client() as anon:
        is_problem(anon.post(f"{PREFIX}/auth/refresh", json={"refresh_token": tokens["refresh_token"]}), 401)
        body = is_problem(anon.post(f"{PREFIX}/auth/login", json={"name": "ops2", "password": PASSWORD}), 401)
        assert "disabled" in body["detail"]
    assert patch(ctl, "ops2", {"disabled": False}).json()["disabled"] is False
    with ctl.client(tokens["access_token"]) as c:
        is_problem(c.get(f"{PREFIX}/auth/me"), 401)          # enabling brings no old token back
    with ctl.client(ctl.login("ops2", PASSWORD)["access_token"]) as c:
        assert c.get(f"{PREFIX}/auth/me").json()["name"] == "ops2"
    rows = audit(ctl, "ops2")
    assert [(r["before"]["disabled"], r["after"]["disabled"]) for r in rows] == [(False, True), (True, False)]
    assert rows[0]["after"]["sessions_ended"] == 1


def test_password_reset_is_checked_and_ends_every_session(ctl: Controller) -> None:
    tokens = new_user(ctl, "ops3", "viewer")
    body = is_problem(patch(ctl, "ops3", {"password": "short"}), 422)
    assert body["field"] == "password" and "short" not in body["detail"]
    r = patch(ctl, "ops3", {"password": PASSWORD + "-new"})
    assert r.status_code == 200 and "password" not in r.json() and "pw_hash" not in r.json()
    with ctl.client(tokens["access_token"]) as c:
        is_problem(c.get(f"{PREFIX}/auth/me"), 401)
    with ctl.client() as anon:
        is_problem(anon.post(f"{PREFIX}/auth/refresh", json={"refresh_token": tokens["refresh_token"]}), 401)
        is_problem(anon.post(f"{PREFIX}/auth/login", json={"name": "ops3", "password": PASSWORD}), 401)
    assert ctl.login("ops3", PASSWORD + "-new")["access_token"]
    (row,) = audit(ctl, "ops3")
    assert row["after"]["password_changed"] is True and row["after"]["sessions_ended"] == 1
    assert PASSWORD not in json.dumps(row)


def test_the_last_enabled_admin_stays(ctl: Controller) -> None:
    for change, why in (({"role": "operator"}, "demoted"), ({"disabled": True}, "disabled"),
                        ({"role": "viewer", "disabled": True}, "demoted")):
        body = is_problem(patch(ctl, "admin", change), 409)
        assert "last enabled admin" in body["detail"] and why in body["detail"]
    with admin(ctl) as a:
        assert a.get(f"{PREFIX}/auth/me").json()["role"] == "admin"
    refused = [r for r in audit(ctl, "admin") if not r["ok"]]
    assert len(refused) == 3 and "last enabled admin" in refused[0]["after"]["error"]
    # with a second admin the first may step down (and come back)
    second = new_user(ctl, "root2", "admin")
    assert patch(ctl, "admin", {"role": "operator"}, token=second["access_token"]).status_code == 200
    is_problem(patch(ctl, "root2", {"disabled": True}, token=second["access_token"]), 409)
    assert patch(ctl, "admin", {"role": "admin"}, token=second["access_token"]).status_code == 200


def test_bad_requests(ctl: Controller) -> None:
    tokens = new_user(ctl, "ops4", "operator")
    is_problem(patch(ctl, "ops4", {"role": "viewer"}, token=tokens["access_token"]), 403)   # admin only
    is_problem(patch(ctl, "nosuch", {"role": "viewer"}), 404)
    assert is_problem(patch(ctl, "ops4", {}), 422)["detail"].startswith("user")
    assert is_problem(patch(ctl, "ops4", {"role": "root"}), 422)["field"] == "role"
    assert is_problem(patch(ctl, "ops4", {"disabled": "yes"}), 422)["field"] == "disabled"
    assert is_problem(patch(ctl, "ops4", {"name": "other"}), 422)["field"] == "name"
    assert is_problem(patch(ctl, "Not A Name", {"role": "viewer"}), 422)["field"] == "name"
    with ctl.client() as anon:
        is_problem(anon.patch(f"{PREFIX}/users/ops4", json={"role": "viewer"}), 401)
