"""patronus.client against the real controller (``patronus controller run``
over TLS on loopback, tests/controller_server.py): library objects in and
out, problem details as named errors, ETags sent by themselves, API key and
token auth, a transparent refresh of an expired access token, ``mesh()``,
the README's client example, and no server dependency on import.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
jwt = pytest.importorskip("jwt")

import patronus  # noqa: E402
from patronus import client as pc  # noqa: E402
from patronus import Failover, Match, Mesh, Policy, QoS, Site, Uplink  # noqa: E402
from patronus.errors import ConfigError  # noqa: E402

from .controller_server import Controller as Server  # noqa: E402
from .controller_server import running_controller  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"
_n = itertools.count(1)


def a_site(n: int | None = None, **kw: Any) -> Site:
    n = next(_n) if n is None else n
    return Site(kw.pop("name", f"c{n}"), subnets=[f"10.{150 + n // 250}.{n % 250}.0/24"],
                uplinks=[Uplink("isp1", f"198.18.{100 + n // 250}.{n % 250 + 1}", mtu=1420, cost=n % 7),
                         Uplink("lte", f"198.19.{100 + n // 250}.{n % 250 + 1}", nat=True)], **kw)


def a_policy(n: int | None = None) -> Policy:
    n = next(_n) if n is None else n
    return Policy(f"cp{n}", Match(proto="tcp/udp", dst_ports=[(5060, 5061), (10000 + n, 20000)]),
                  priority=5000 + n, app="voip", qos=QoS(dscp=46), prefer=["isp1"])


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_controller(tmp_path_factory.mktemp("client") / "ctl") as s:
        yield s


@pytest.fixture(scope="module")
def admin(srv: Server) -> Any:
    with pc.Controller(srv.url, username="admin", password=srv.admin_password, verify=srv.cert) as c:
        yield c


@pytest.fixture(scope="module")
def keys(admin: pc.Controller) -> dict[str, str]:
    return {role: admin.create_api_key(f"test-{role}", role) for role in ("admin", "operator", "viewer")}


def as_key(srv: Server, key: str) -> pc.Controller:
    return pc.Controller(srv.url, api_key=key, verify=srv.cert)


# -- round trips ------------------------------------------------------------------------------


def test_site_crud_round_trip(admin: pc.Controller) -> None:
    site = a_site()
    assert admin.add_site(site) == site
    assert admin.site(site.name) == site
    assert site in admin.sites()
    changed = attrs.evolve(site, subnets=[*site.subnets, "fd00:15::/64"])
    assert admin.replace_site(changed) == changed
    assert admin.site(site.name) == changed
    admin.remove_site(site.name)
    with pytest.raises(pc.NotFound) as e:
        admin.site(site.name)
    assert e.value.status == 404 and site.name in str(e.value)
    assert admin.etag("site", site.name) is None
    dup = admin.add_site(a_site(name="dup"))
    with pytest.raises(pc.Conflict) as e:
        admin.add_site(attrs.evolve(a_site(), name=dup.name))
    assert e.value.status == 409 and e.value.field == "Site.name"


def test_policy_crud_round_trip(admin: pc.Controller) -> None:
    admin.add_site(a_site())
    pol = a_policy()
    assert admin.add_policy(pol) == pol
    assert admin.policy(pol.name) == pol
    assert pol in admin.policies()
    changed = attrs.evolve(pol, qos=QoS(dscp=34, rate_kbps=2000), action="drop")
    assert admin.replace_policy(changed) == changed
    assert admin.policy(pol.name) == changed
    clash = attrs.evolve(a_policy(), priority=pol.priority)
    with pytest.raises(pc.Conflict) as e:
        admin.add_policy(clash)
    assert e.value.field == "Policy.priority" and pol.name in e.value.detail
    admin.remove_policy(pol.name)
    assert pol.name not in [p.name for p in admin.policies()]


def test_views(admin: pc.Controller) -> None:
    x, y = a_site(), a_site()
    admin.add_site(x)
    admin.add_site(y)
    between = [p for p in admin.paths() if set(p["sites"]) == {x.name, y.name}]
    assert len(between) == 4      # 2 uplinks x 2 uplinks
    topo = admin.topology()
    assert topo["mesh"] == "default" and {x.name, y.name} <= {n["id"] for n in topo["nodes"]}
    assert admin.events(limit=5) == []


# -- errors as the library's ---------------------------------------------------------------------


def test_bad_cidr_is_a_config_error_naming_the_field(admin: pc.Controller) -> None:
    raw = {"name": "badnet", "subnets": ["10.0.0.1/8"], "uplinks": [{"name": "isp1", "address": "192.0.2.77"}]}
    with pytest.raises(patronus.ConfigError) as e:
        admin.add_site(raw)
    assert isinstance(e.value, pc.InvalidInput) and isinstance(e.value, pc.ControllerError)
    assert e.value.status == 422 and e.value.field == "Site.subnets"
    with pytest.raises(patronus.ConfigError) as local:
        Site.from_dict(raw)
    assert (e.value.field, e.value.value, e.value.reason, str(e.value)) == \
        (local.value.field, local.value.value, local.value.reason, str(local.value))


def test_mesh_rule_is_the_same_config_error_as_the_library(admin: pc.Controller) -> None:
    first = admin.add_site(a_site())
    overlapping = attrs.evolve(a_site(), subnets=list(first.subnets))
    with pytest.raises(pc.InvalidInput) as remote:
        admin.add_site(overlapping)
    mesh = Mesh("local")
    mesh.add_site(first)
    with pytest.raises(patronus.ConfigError) as local:
        mesh.add_site(overlapping)
    assert (remote.value.field, remote.value.value, str(remote.value)) == \
        (local.value.field, local.value.value, str(local.value))


def test_schema_error_names_the_field(admin: pc.Controller) -> None:
    with pytest.raises(pc.InvalidInput) as e:
        admin.add_site({"name": "x", "subnets": []})
    assert e.value.field == "uplinks" and e.value.problem["status"] == 422


# -- ETags ---------------------------------------------------------------------------------------


def test_lost_update_is_refused(srv: Server, keys: dict[str, str]) -> None:
    site = a_site()
    with as_key(srv, keys["operator"]) as one, as_key(srv, keys["admin"]) as two:
        one.add_site(site)
        two.site(site.name)                       # both have read this version
        first = attrs.evolve(site, uplinks=[attrs.evolve(u, mtu=1400) for u in site.uplinks])
        one.replace_site(first)
        stale = attrs.evolve(site, uplinks=[attrs.evolve(u, cost=9) for u in site.uplinks])
        with pytest.raises(pc.PreconditionFailed) as e:
            two.replace_site(stale)
        assert e.value.status == 412
        assert two.site(site.name) == first       # nothing lost; and now two has the current version
        with pytest.raises(pc.PreconditionFailed):
            one.remove_site(site.name, if_match='"stale"')
        assert two.replace_site(stale) == stale
        with pytest.raises(pc.PreconditionFailed):
            one.remove_site(site.name)            # one's version is the old one
        one.remove_site(site.name, if_match="*")
        with pytest.raises(pc.NotFound):
            two.site(site.name)


def test_policy_lost_update_is_refused(srv: Server, keys: dict[str, str], admin: pc.Controller) -> None:
    pol = admin.add_policy(a_policy())
    with as_key(srv, keys["operator"]) as other:
        other.policy(pol.name)
        admin.replace_policy(attrs.evolve(pol, app="video"))
        with pytest.raises(pc.PreconditionFailed):
            other.replace_policy(attrs.evolve(pol, app="bulk"))
    assert admin.policy(pol.name).app == "video"


def test_failover_settings_round_trip_and_lost_update(srv: Server, keys: dict[str, str],
                                                       admin: pc.Controller) -> None:
    base = admin.failover()
    with as_key(srv, keys["operator"]) as other, as_key(srv, keys["viewer"]) as viewer:
        other.failover()                                   # both have read this version
        mine = attrs.evolve(base, failback_hold_s=base.failback_hold_s + 1)
        assert admin.set_failover(mine) == mine
        with pytest.raises(pc.PreconditionFailed):
            other.set_failover(attrs.evolve(base, cooldown_s=2.0))
        assert viewer.failover() == mine
        with pytest.raises(pc.Forbidden):
            viewer.set_failover(mine, if_match="*")
        with pytest.raises(ConfigError) as e:              # the library's own rule, named
            admin.set_failover({**mine.to_dict(), "detect_ms": 1})
        assert "detect_ms" in str(e.value)
    assert admin.failover() == mine


# -- auth ----------------------------------------------------------------------------------------


def test_api_key_auth_and_roles(srv: Server, keys: dict[str, str]) -> None:
    with as_key(srv, keys["viewer"]) as viewer:
        assert viewer.me() == {"name": "test-viewer", "role": "viewer", "kind": "apikey",
                               "key_id": keys["viewer"].split("_")[1]}
        assert isinstance(viewer.sites(), list)
        with pytest.raises(pc.Forbidden) as e:
            viewer.add_site(a_site())
        assert e.value.status == 403 and "viewer" in e.value.detail
        with pytest.raises(pc.Forbidden):
            viewer.create_api_key("nope", "viewer")
        viewer.logout()                           # an API key has no session: forgotten here only
        with pytest.raises(pc.Unauthorized):
            viewer.sites()
    with as_key(srv, keys["operator"]) as op:
        op.add_site(a_site())
        with pytest.raises(pc.Forbidden):
            op.users()


def test_bad_credentials_are_unauthorized(srv: Server, admin: pc.Controller) -> None:
    with pc.Controller(srv.url, verify=srv.cert) as anon:
        with pytest.raises(pc.Unauthorized) as e:
            anon.sites()
        assert e.value.status == 401 and "bearer" in e.value.detail.lower()
    with as_key(srv, "pnk_0123456789abcdef_" + "A" * 43) as bad:
        with pytest.raises(pc.Unauthorized, match="bad API key"):
            bad.sites()
    with pytest.raises(pc.Unauthorized, match="bad credentials"):
        pc.Controller(srv.url, username="nosuch", password="wrong password!", verify=srv.cert)
    key = admin.create_api_key("short", "viewer", expires_s=0.5)
    time.sleep(1.0)
    with as_key(srv, key) as expired:
        with pytest.raises(pc.Unauthorized, match="API key expired"):
            expired.me()


def test_token_auth_login_logout(srv: Server, admin: pc.Controller) -> None:
    admin.add_user("cli-op", PASSWORD, "operator")
    assert "cli-op" in [u["name"] for u in admin.users()]
    pair = srv.login("cli-op", PASSWORD)
    with pc.Controller(srv.url, token=pair["access_token"], verify=srv.cert) as c:
        assert c.me()["name"] == "cli-op" and c.me()["kind"] == "user"
        c.add_site(a_site())
    with pc.Controller(srv.url, username="cli-op", password=PASSWORD, verify=srv.cert) as c:
        token = c.refresh()["access_token"]
        assert c.me()["role"] == "operator"
        c.logout()
        with pytest.raises(pc.Unauthorized):
            c.me()
    with pc.Controller(srv.url, token=token, verify=srv.cert) as c:
        with pytest.raises(pc.Unauthorized, match="revoked"):
            c.me()


def test_user_administration(srv: Server, admin: pc.Controller) -> None:
    admin.add_user("cli-u", PASSWORD, "operator")
    with pc.Controller(srv.url, username="cli-u", password=PASSWORD, verify=srv.cert) as c:
        assert admin.update_user("cli-u", role="viewer")["role"] == "viewer"
        assert c.me()["role"] == "viewer"                  # the next request
        with pytest.raises(pc.Forbidden):
            c.add_site(a_site())
        assert admin.update_user("cli-u", disabled=True)["disabled"] is True
        with pytest.raises(pc.Unauthorized):
            c.me()
    admin.update_user("cli-u", disabled=False, password=PASSWORD + "-new", role="operator")
    with pc.Controller(srv.url, username="cli-u", password=PASSWORD + "-new", verify=srv.cert) as c:
        assert c.me()["role"] == "operator"
    with pytest.raises(pc.Conflict, match="last enabled admin"):
        admin.update_user("admin", role="operator")
    with pytest.raises(pc.ConfigError):
        admin.update_user("cli-u")                          # nothing to change
    admin.remove_user("cli-u")


def _expired_copy(srv: Server, access_token: str) -> str:
    """The same access token, signed by the controller's key, expired a minute ago."""
    from patronus.controller.server import files

    claims = jwt.decode(access_token, options={"verify_signature": False})
    now = int(time.time())
    claims.update(iat=now - 1000, exp=now - 60, jti=uuid.uuid4().hex)
    return jwt.encode(claims, files(srv.state_dir)["signing_key"].read_bytes(), algorithm="HS256")


def test_expired_access_token_is_refreshed_once(srv: Server, admin: pc.Controller) -> None:
    admin.add_user("cli-ref", PASSWORD, "viewer")
    pair = srv.login("cli-ref", PASSWORD)
    expired = _expired_copy(srv, pair["access_token"])
    with pc.Controller(srv.url, token=expired, verify=srv.cert) as c:
        with pytest.raises(pc.Unauthorized, match="token expired"):
            c.me()                                # no refresh token: nothing to renew with
    with pc.Controller(srv.url, token=expired, refresh_token=pair["refresh_token"], verify=srv.cert) as c:
        assert c.me()["name"] == "cli-ref"        # renewed, and the request sent again
        assert c.sites() is not None
    # it rotated: the old refresh token is used up (presenting it again revokes the family)
    with pc.Controller(srv.url, token=expired, refresh_token=pair["refresh_token"], verify=srv.cert) as c:
        with pytest.raises(pc.Unauthorized, match="reuse"):
            c.me()


def test_access_token_renewed_before_its_expiry(srv: Server, admin: pc.Controller) -> None:
    admin.add_user("cli-pro", PASSWORD, "viewer")
    with pc.Controller(srv.url, username="cli-pro", password=PASSWORD, verify=srv.cert) as c:
        before = c._bearer
        c._expires = time.monotonic() - 1         # as if its lifetime had run out
        assert c.me()["name"] == "cli-pro"
        assert c._bearer != before and c._expires is not None and c._expires > time.monotonic()


def test_totp_required_is_named(srv: Server, admin: pc.Controller) -> None:
    pyotp = pytest.importorskip("pyotp")
    admin.add_user("cli-totp", PASSWORD, "viewer")
    pair = srv.login("cli-totp", PASSWORD)
    with srv.client(pair["access_token"]) as h:
        secret = h.post("/api/v1/auth/totp").raise_for_status().json()["secret"]
        recovery = h.post("/api/v1/auth/totp/confirm", json={"code": pyotp.TOTP(secret).now()}) \
            .raise_for_status().json()["recovery_codes"]
    with pytest.raises(pc.TotpRequired):
        pc.Controller(srv.url, username="cli-totp", password=PASSWORD, verify=srv.cert)
    with pc.Controller(srv.url, username="cli-totp", password=PASSWORD, totp=recovery[0],
                       verify=srv.cert) as c:   # the code just used would be a replay
        assert c.me()["name"] == "cli-totp"


def test_rate_limit_is_named_with_retry_after(tmp_path: Path) -> None:
    with running_controller(tmp_path / "rl") as srv:
        with pc.Controller(srv.url, verify=srv.cert) as c:
            for _ in range(12):
                try:
                    c.login("admin", "not the password")
                except pc.RateLimited as e:
                    assert e.status == 429 and e.retry_after is not None and e.retry_after >= 1
                    break
                except pc.Unauthorized:
                    continue
            else:
                pytest.fail("no 429 after 12 bad logins")


def test_certificate_is_verified(srv: Server, tmp_path: Path) -> None:
    import httpx

    with pc.Controller(srv.url, api_key="pnk_x", verify=True) as c:
        with pytest.raises(httpx.ConnectError):
            c.sites()                             # self-signed: not in the system's CAs


# -- mesh() ---------------------------------------------------------------------------------------


def test_mesh_equals_the_local_mesh(tmp_path: Path) -> None:
    sites = [a_site(), a_site(), a_site()]
    policies = [a_policy(), attrs.evolve(a_policy(), match=Match(dst=sites[1].subnets[0]), prefer=["lte"]),
                Policy("bulk", Match(proto="tcp", dst_ports=873), priority=40, app="bulk")]
    local = Mesh("default")
    with running_controller(tmp_path / "m") as srv:
        with pc.Controller(srv.url, username="admin", password=srv.admin_password, verify=srv.cert) as c:
            assert c.mesh() == local
            for s in sites:
                c.add_site(s)
                local.add_site(s)
            for p in policies:
                c.add_policy(p)
                local.add_policy(p)
            fo = Failover(failback_hold_s=5, cooldown_s=0.5)
            assert c.set_failover(fo) == fo
            local.failover = fo
            remote = c.mesh()
    assert remote == local
    assert [str(p) for p in remote.paths()] == [str(p) for p in local.paths()]


# -- the README's example, for real -------------------------------------------------------------------


def test_readme_client_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "patronus.client" in b]
    assert len(blocks) == 1, "README.md: one python block uses patronus.client"
    (curl,) = re.findall(r"-d '(\{\"name\": \"hq\".*?)'", text)   # the site the curl example creates
    with running_controller(tmp_path / "ctl") as srv:
        with srv.client(srv.login("admin", srv.admin_password)["access_token"]) as h:
            h.post("/api/v1/sites", content=curl, headers={"Content-Type": "application/json"}) \
                .raise_for_status()
        monkeypatch.setenv("PATRONUS_PASSWORD", srv.admin_password)
        monkeypatch.chdir(tmp_path)                   # the example reads ctl/tls.crt
        exec(compile(blocks[0].replace("https://127.0.0.1:8443", srv.url), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.split("\n")[0] == "['hq', 'br1'] ['hq.isp1 -> br1.isp1']", out


# -- no server dependencies on import ------------------------------------------------------------------


def test_import_needs_no_server_dependencies() -> None:
    code = ("import sys, patronus.client\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'uvicorn', 'pydantic', 'argon2', 'jwt', 'pyotp', 'uvloop') "
            "or m.startswith('patronus.controller'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
