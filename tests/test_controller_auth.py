"""The controller's auth core (patronus.controller.auth) on a real SQLite file.

Time is an injectable clock the tests move; nothing sleeps. Password
hashing uses cheap Argon2id parameters so a test logs in in milliseconds
(the production defaults are argon2-cffi's).
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
from pathlib import Path

import jwt
import pyotp
import pytest
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from patronus.controller.auth import (
    ACTIONS, PERMISSIONS, Auth, AuthError, Conflict, Forbidden, NotFound, Principal, RateLimited, Role,
    TotpRequired, allowed, load_signing_key, new_signing_key,
)
from patronus.controller.db import SCHEMA_VERSION, ControllerDB
from patronus.errors import ConfigError, PatronusError, SchemaVersionError, StateError

KEY = bytes(range(32))
PW = "correct horse battery staple"
T0 = 1_700_000_010.0          # a whole TOTP step + 10 s: steps are easy to reason about
FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
LOOSE = (10_000, 1.0)          # a rate limit no test reaches unless it means to


class Clock:
    """Wall-clock seconds that move only when told."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path, clock: Clock):
    with ControllerDB(tmp_path / "ctl.db", clock=clock) as d:
        yield d


def make_auth(db: ControllerDB, clock: Clock, **kw) -> Auth:
    kw.setdefault("login_rate", LOOSE)
    kw.setdefault("credential_rate", LOOSE)
    return Auth(db, KEY, clock=clock, password_hasher=FAST, **kw)


@pytest.fixture
def auth(db: ControllerDB, clock: Clock) -> Auth:
    a = make_auth(db, clock)
    a.create_user("root", PW + "!", Role.ADMIN)
    a.create_user("alice", PW, Role.OPERATOR)
    return a


def file_bytes(db: ControllerDB) -> bytes:
    """Every byte of the store on disk: the database, its WAL and its shared memory."""
    out = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(db.path + suffix)
        if p.exists():
            out += p.read_bytes()
    return out


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def message(exc: pytest.ExceptionInfo) -> str:
    return str(exc.value)


# -- the store -------------------------------------------------------------------------


def test_store_file_is_0600_wal_and_versioned(db: ControllerDB) -> None:
    assert os.stat(db.path).st_mode & 0o777 == 0o600
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert db.query("PRAGMA foreign_keys")[0][0] == 1
    assert db.version == SCHEMA_VERSION


def test_store_reopens_and_refuses_newer_schema(tmp_path: Path) -> None:
    f = tmp_path / "c.db"
    with ControllerDB(f) as d:
        d.audit("a", "x", "t")
    with ControllerDB(f, create=False) as d:
        assert [r["action"] for r in d.audit_log()] == ["x"]
        d.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(SchemaVersionError, match="99"):
        ControllerDB(f)
    with pytest.raises(StateError, match="no controller store"):
        ControllerDB(tmp_path / "missing.db", create=False)


def test_store_tightens_a_world_readable_file_and_refuses_a_symlink(tmp_path: Path) -> None:
    f = tmp_path / "c.db"
    ControllerDB(f).close()
    os.chmod(f, 0o644)
    ControllerDB(f).close()
    assert os.stat(f).st_mode & 0o777 == 0o600
    link = tmp_path / "link.db"
    link.symlink_to(f)
    with pytest.raises(StateError, match="symlink"):
        ControllerDB(link)


def test_store_rejects_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    f = tmp_path / "junk.db"
    f.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="not a usable controller store"):
        ControllerDB(f)


def test_transaction_rolls_back_and_nests(db: ControllerDB) -> None:
    with pytest.raises(RuntimeError):
        with db.transaction() as c:
            c.execute("INSERT INTO revoked_jti VALUES ('a', 1)")
            with db.transaction() as inner:   # joins the outer one
                inner.execute("INSERT INTO revoked_jti VALUES ('b', 1)")
            db.audit("x", "y", "z")
            raise RuntimeError("boom")
    assert db.query("SELECT * FROM revoked_jti") == []
    assert db.audit_log() == []


def test_audit_log_is_append_only_paged_and_redacted(db: ControllerDB) -> None:
    for i in range(5):
        db.audit("root", "thing.set", f"t{i}", before={"v": i}, after={"v": i + 1, "password": "s3cret-s3cret"},
                 remote="192.0.2.1", ok=i % 2 == 0)
    page = db.audit_log(limit=2)
    assert [r["target"] for r in page] == ["t4", "t3"]
    assert page[0]["after"] == {"v": 5, "password": "<redacted>"} and page[0]["before"] == {"v": 4}
    assert page[1]["ok"] is False and page[0]["remote"] == "192.0.2.1"
    assert [r["target"] for r in db.audit_log(limit=10, before_id=page[1]["id"])] == ["t2", "t1", "t0"]
    assert b"s3cret-s3cret" not in file_bytes(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit SET actor = 'mallory'")
    with pytest.raises(ConfigError):
        db.audit_log(limit=0)


def test_a_db_is_usable_from_threads(db: ControllerDB) -> None:
    def work(n: int) -> None:
        for i in range(20):
            db.audit(f"t{n}", "a", str(i))
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(db.audit_log(limit=1000)) == 80


# -- users and login -----------------------------------------------------------------------


def test_login_ok_bad_password_unknown_user(auth: Auth, db: ControllerDB) -> None:
    pair = auth.login("alice", PW, remote="192.0.2.7")
    assert pair.expires_in == 900 and PW not in repr(pair) and pair.access not in repr(pair)
    p = auth.authenticate(pair.access)
    assert p == Principal("alice", Role.OPERATOR, "user", p.jti, None) and p.jti
    with pytest.raises(AuthError) as bad:
        auth.login("alice", PW + "x")
    with pytest.raises(AuthError) as unknown:
        auth.login("nobody", PW)
    # one message for both: a login does not tell which names exist
    assert message(bad) == message(unknown) == "bad credentials"
    assert bad.value.status == 401 and bad.value.title == "unauthorized"
    with pytest.raises(AuthError, match="bad credentials"):
        auth.login("Not A Name\n", PW)
    rows = [(r["actor"], r["target"], r["ok"], r["after"]) for r in db.audit_log() if r["action"] == "auth.login"]
    assert rows[:4] == [("<invalid name>", "<invalid name>", False, {"reason": "bad credentials"}),
                        ("nobody", "nobody", False, {"reason": "bad credentials"}),
                        ("alice", "alice", False, {"reason": "bad credentials"}),
                        ("alice", "alice", True, {"method": "password"})]
    assert db.audit_log()[-1]["remote"] is None
    assert [r["remote"] for r in db.audit_log() if r["ok"] and r["action"] == "auth.login"] == ["192.0.2.7"]


def test_password_is_stored_as_argon2id(auth: Auth, db: ControllerDB) -> None:
    (h,) = db.query("SELECT pw_hash FROM users WHERE name = 'alice'")[0]
    assert h.startswith("$argon2id$")
    assert PW.encode() not in file_bytes(db)


def test_login_rehashes_a_hash_with_old_parameters(db: ControllerDB, clock: Clock) -> None:
    old = make_auth(db, clock)
    old.create_user("bob", PW, Role.VIEWER)
    stronger = PasswordHasher(time_cost=2, memory_cost=8192, parallelism=1)
    new = Auth(db, KEY, clock=clock, password_hasher=stronger, login_rate=LOOSE)
    new.login("bob", PW)
    (h,) = db.query("SELECT pw_hash FROM users WHERE name = 'bob'")[0]
    assert "t=2" in h and not stronger.check_needs_rehash(h)


def test_user_validation_and_conflicts(auth: Auth) -> None:
    with pytest.raises(Conflict) as e:
        auth.create_user("alice", PW, Role.VIEWER)
    assert e.value.status == 409
    with pytest.raises(ConfigError, match="12 to 1024"):
        auth.create_user("bob", "short", Role.VIEWER)
    with pytest.raises(ConfigError) as long_pw:
        auth.create_user("bob", "p" * 1025, Role.VIEWER)
    assert "p" * 20 not in str(long_pw.value)   # the password itself never reaches a message
    with pytest.raises(ConfigError, match="user name"):
        auth.create_user("Bob", PW, Role.VIEWER)
    with pytest.raises(ConfigError, match="role"):
        auth.create_user("bob", PW, "superuser")   # type: ignore[arg-type]
    with pytest.raises(NotFound):
        auth.delete_user("ghost")
    assert [u["name"] for u in auth.list_users()] == ["alice", "root"]
    assert set(auth.list_users()[0]) == {"name", "role", "created", "disabled", "totp_enabled"}


def test_the_last_admin_cannot_go(auth: Auth) -> None:
    for act in (lambda: auth.delete_user("root"), lambda: auth.set_role("root", Role.VIEWER),
                lambda: auth.set_disabled("root", True)):
        with pytest.raises(Conflict, match="last admin"):
            act()
    auth.create_user("root2", PW, Role.ADMIN)
    auth.set_role("root", Role.VIEWER)
    assert auth.get_user("root")["role"] == "viewer"


def test_role_change_applies_to_the_next_request(auth: Auth) -> None:
    pair = auth.login("alice", PW)
    assert auth.authenticate(pair.access).role is Role.OPERATOR
    auth.set_role("alice", Role.VIEWER, actor="root")
    assert auth.authenticate(pair.access).role is Role.VIEWER


def test_password_change_disable_and_delete_end_every_session(auth: Auth) -> None:
    a, b = auth.login("alice", PW), auth.login("alice", PW)
    with pytest.raises(AuthError, match="wrong current password"):
        auth.set_password("alice", PW + "-new", actor="alice", current_password="nope")
    auth.set_password("alice", PW + "-new", actor="alice", current_password=PW)
    for pair in (a, b):
        with pytest.raises(AuthError, match="token revoked"):
            auth.authenticate(pair.access)
        with pytest.raises(AuthError, match="refresh token revoked"):
            auth.refresh(pair.refresh)
    with pytest.raises(AuthError):
        auth.login("alice", PW)
    c = auth.login("alice", PW + "-new")
    auth.set_disabled("alice", True, actor="root")
    with pytest.raises(AuthError):
        auth.authenticate(c.access)
    with pytest.raises(AuthError, match="account disabled"):
        auth.login("alice", PW + "-new")
    auth.set_disabled("alice", False, actor="root")
    d = auth.login("alice", PW + "-new")
    auth.delete_user("alice", actor="root")
    with pytest.raises(AuthError, match="no longer exists"):
        auth.authenticate(d.access)
    with pytest.raises(AuthError):
        auth.refresh(d.refresh)


def test_update_user_role_disable_password_in_one_audited_step(auth: Auth, db: ControllerDB) -> None:
    a = auth.login("alice", PW)
    out = auth.update_user("alice", role="viewer", actor="root", remote="192.0.2.5")
    assert out["role"] == "viewer" and auth.authenticate(a.access).role is Role.VIEWER   # next request
    auth.update_user("alice", disabled=True, actor="root")
    for fault in (lambda: auth.authenticate(a.access), lambda: auth.refresh(a.refresh),
                  lambda: auth.login("alice", PW)):
        with pytest.raises(AuthError):
            fault()
    auth.update_user("alice", disabled=False, actor="root")
    with pytest.raises(AuthError, match="token revoked"):     # enabling again brings no old token back
        auth.authenticate(a.access)
    b = auth.login("alice", PW)
    with pytest.raises(ConfigError, match="password"):
        auth.update_user("alice", password="short", actor="root")
    auth.update_user("alice", password=PW + "-reset", role="operator", actor="root")
    with pytest.raises(AuthError, match="token revoked"):
        auth.authenticate(b.access)
    with pytest.raises(AuthError, match="refresh token revoked"):
        auth.refresh(b.refresh)
    assert auth.authenticate(auth.login("alice", PW + "-reset").access).role is Role.OPERATOR
    with pytest.raises(ConfigError, match="nothing to change"):
        auth.update_user("alice", actor="root")
    with pytest.raises(ConfigError, match="disabled"):
        auth.update_user("alice", disabled="yes", actor="root")   # type: ignore[arg-type]
    with pytest.raises(NotFound):
        auth.update_user("nobody", role="viewer", actor="root")
    rows = [r for r in reversed(db.audit_log(limit=1000)) if r["action"] == "user.update"]
    assert [(r["target"], r["ok"]) for r in rows] == [("alice", True)] * 4 + [("nobody", False)]
    assert rows[0]["remote"] == "192.0.2.5" and rows[0]["actor"] == "root"
    assert (rows[0]["before"]["role"], rows[0]["after"]["role"]) == ("operator", "viewer")
    assert (rows[1]["before"]["disabled"], rows[1]["after"]["disabled"]) == (False, True)
    assert rows[1]["after"]["sessions_ended"] >= 1
    assert rows[3]["after"]["password_changed"] is True and rows[3]["after"]["role"] == "operator"
    assert "password_changed" not in rows[0]["after"]
    on_disk = file_bytes(db)
    assert (PW + "-reset").encode() not in on_disk


def test_update_user_keeps_an_enabled_admin(auth: Auth, db: ControllerDB) -> None:
    for change in ({"role": "operator"}, {"disabled": True}, {"role": "viewer", "disabled": True}):
        with pytest.raises(Conflict, match="last enabled admin"):
            auth.update_user("root", actor="root", **change)
    root = auth.get_user("root")
    assert (root["role"], root["disabled"]) == ("admin", False)
    refused = [r for r in db.audit_log(limit=1000) if r["action"] == "user.update"]
    assert len(refused) == 3 and not any(r["ok"] for r in refused)
    assert "last enabled admin" in refused[0]["after"]["error"]
    # a disabled admin does not count
    auth.create_user("root2", PW, Role.ADMIN)
    auth.update_user("root2", disabled=True, actor="root")
    with pytest.raises(Conflict, match="last enabled admin"):
        auth.update_user("root", role="operator", actor="root")
    auth.update_user("root2", disabled=False, actor="root")
    auth.update_user("root", role="operator", actor="root")     # root2 is an enabled admin now
    with pytest.raises(Conflict, match="last enabled admin"):
        auth.update_user("root2", disabled=True, actor="root2")
    auth.update_user("root", role="admin", actor="root2")


# -- access tokens --------------------------------------------------------------------------


def test_expired_token(auth: Auth, clock: Clock) -> None:
    pair = auth.login("alice", PW)
    clock.advance(899)
    auth.authenticate(pair.access)
    clock.advance(1)
    with pytest.raises(AuthError, match="token expired"):
        auth.authenticate(pair.access)


def test_tampered_payload_and_signature(auth: Auth) -> None:
    pair = auth.login("alice", PW)
    head, payload, sig = pair.access.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["role"] = "admin"
    forged = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    with pytest.raises(AuthError, match="bad signature"):
        auth.authenticate(forged)
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    with pytest.raises(AuthError, match="bad signature"):
        auth.authenticate(f"{head}.{payload}.{flipped}")
    other_key = jwt.encode(claims | {"role": "operator"}, b"x" * 32, algorithm="HS256")
    with pytest.raises(AuthError, match="bad signature"):
        auth.authenticate(other_key)


def test_alg_none_and_other_algorithms_refused(auth: Auth) -> None:
    pair = auth.login("alice", PW)
    claims = jwt.decode(pair.access, options={"verify_signature": False})
    claims["role"] = "admin"
    none_header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    none = f"{none_header}.{b64(json.dumps(claims).encode())}."
    hs512 = jwt.encode(claims, KEY + b"another key, longer, for HS512 use...", algorithm="HS512")
    hs512_same_key = jwt.encode(claims, KEY * 2, algorithm="HS512")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rs256 = jwt.encode(claims, rsa_key, algorithm="RS256")
    for token in (none, hs512, hs512_same_key, rs256):
        with pytest.raises(AuthError, match="algorithm not allowed"):
            auth.authenticate(token)


def test_claims_are_checked(auth: Auth, clock: Clock) -> None:
    pair = auth.login("alice", PW)
    claims = jwt.decode(pair.access, options={"verify_signature": False})
    for change, reason in ((lambda c: c.pop("jti"), "missing claim 'jti'"),
                           (lambda c: c.update(iss="someone-else"), "wrong issuer"),
                           (lambda c: c.update(typ="refresh"), "not an access token"),
                           (lambda c: c.update(role="root"), "malformed claims"),
                           (lambda c: c.update(sub=["alice"]), "malformed claims")):
        c = dict(claims)
        change(c)
        with pytest.raises(AuthError, match=reason):
            auth.authenticate(jwt.encode(c, KEY, algorithm="HS256"))


def test_logout_revokes_immediately(auth: Auth, db: ControllerDB, clock: Clock) -> None:
    pair = auth.login("alice", PW)
    other = auth.login("alice", PW)
    auth.logout(pair.access, pair.refresh, remote="192.0.2.9")
    with pytest.raises(AuthError, match="token revoked"):
        auth.authenticate(pair.access)
    with pytest.raises(AuthError, match="refresh token revoked"):
        auth.refresh(pair.refresh)
    assert auth.authenticate(other.access).name == "alice"   # another session lives on
    # the revocation row goes once the token has expired by itself
    clock.advance(901)
    auth.logout(refresh_token=other.refresh)
    assert db.query("SELECT * FROM revoked_jti") == []
    with pytest.raises(AuthError, match="token expired"):
        auth.authenticate(pair.access)
    with pytest.raises(ConfigError):
        auth.logout()


def test_logout_refuses_a_forged_token_and_another_users_refresh(auth: Auth) -> None:
    mine, theirs = auth.login("alice", PW), auth.login("root", PW + "!")
    with pytest.raises(AuthError, match="bad signature"):
        auth.logout(mine.access[:-3] + "abc")
    with pytest.raises(AuthError, match="another user"):
        auth.logout(mine.access, theirs.refresh)
    auth.refresh(theirs.refresh)   # untouched


# -- refresh tokens ----------------------------------------------------------------------------


def test_refresh_rotates(auth: Auth, db: ControllerDB) -> None:
    first = auth.login("alice", PW)
    second = auth.refresh(first.refresh)
    assert second.refresh != first.refresh and second.access != first.access
    assert auth.authenticate(second.access).name == "alice"
    third = auth.refresh(second.refresh)
    assert auth.authenticate(third.access).name == "alice"
    families = {r["family"] for r in db.query("SELECT family FROM refresh_tokens")}
    assert len(families) == 1


def test_refresh_reuse_revokes_the_family(auth: Auth, db: ControllerDB) -> None:
    first = auth.login("alice", PW)
    unrelated = auth.login("alice", PW)
    second = auth.refresh(first.refresh)
    with pytest.raises(AuthError, match="refresh token reuse: family revoked"):
        auth.refresh(first.refresh)
    # the newer token of the family stops working too; another family does not
    with pytest.raises(AuthError, match="refresh token revoked"):
        auth.refresh(second.refresh)
    auth.refresh(unrelated.refresh)
    reuse = [r for r in db.audit_log() if r["action"] == "auth.refresh_reuse"]
    # revoked: the family's token that could still be used (the reused one is spent already)
    assert len(reuse) == 1 and reuse[0]["ok"] is False and reuse[0]["after"]["revoked"] == 1


def test_refresh_expiry_and_garbage(auth: Auth, clock: Clock) -> None:
    pair = auth.login("alice", PW)
    clock.advance(14 * 86400)
    with pytest.raises(AuthError, match="refresh token expired"):
        auth.refresh(pair.refresh)
    with pytest.raises(AuthError, match="unknown refresh token"):
        auth.refresh("A" * 43)
    with pytest.raises(AuthError, match="malformed refresh token"):
        auth.refresh("short\x00")


def test_two_racing_refreshes_of_one_token_cannot_both_win(auth: Auth) -> None:
    pair = auth.login("alice", PW)
    results: list[object] = []

    def go() -> None:
        try:
            results.append(auth.refresh(pair.refresh))
        except AuthError as e:
            results.append(e)
    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [r for r in results if not isinstance(r, AuthError)]
    assert len(wins) == 1
    # the reuse revoked the family: the winner's token is dead too
    with pytest.raises(AuthError, match="refresh token revoked"):
        auth.refresh(wins[0].refresh)   # type: ignore[attr-defined]


class RefreshFamilies(RuleBasedStateMachine):
    """Refresh-token families against a model: rotation, reuse, expiry, logout."""

    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.clock = Clock()
        self.db = ControllerDB(Path(self.dir.name) / "c.db", clock=self.clock)
        self.auth = make_auth(self.db, self.clock, refresh_ttl_s=1000)
        self.auth.create_user("alice", PW, Role.VIEWER)
        self.family: dict[str, int] = {}        # token -> family number
        self.expires: dict[str, float] = {}
        self.used: set[str] = set()
        self.revoked: set[int] = set()          # families
        self.pruned: set[str] = set()           # deleted by a logout's prune: unknown from then on
        self.n = 0

    def teardown(self) -> None:
        self.db.close()
        self.dir.cleanup()

    def _issued(self, token: str, family: int) -> str:
        self.family[token] = family
        self.expires[token] = self.clock() + 1000
        return token

    @rule(target=tokens)
    def login(self) -> str:
        self.n += 1
        return self._issued(self.auth.login("alice", PW).refresh, self.n)

    @rule(target=tokens, token=tokens)
    def refresh(self, token: str) -> str:
        fam = self.family[token]
        if token in self.pruned:
            expect = "unknown refresh token"
        elif token in self.used:   # a spent token is never marked revoked: presented again, it is a reuse
            expect = "refresh token reuse: family revoked"
            self.revoked.add(fam)
        elif fam in self.revoked:
            expect = "refresh token revoked"
        elif self.clock() >= self.expires[token]:
            expect = "refresh token expired"
        else:
            self.used.add(token)
            return self._issued(self.auth.refresh(token).refresh, fam)
        with pytest.raises(AuthError) as e:
            self.auth.refresh(token)
        assert str(e.value) == expect
        return token

    @rule(token=consumes(tokens))
    def logout(self, token: str) -> None:
        self.auth.logout(refresh_token=token)
        self.revoked.add(self.family[token])
        # logout prunes every expired token: they are unknown from now on
        self.pruned.update(t for t, exp in self.expires.items() if exp < self.clock())

    @rule(seconds=st.sampled_from([1.0, 300.0, 999.0, 1001.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def live_tokens_in_db(self) -> None:
        live = self.db.query("SELECT COUNT(*) FROM refresh_tokens WHERE revoked = 0 AND used_at IS NULL")[0][0]
        model = sum(1 for t, f in self.family.items()
                    if f not in self.revoked and t not in self.used and t not in self.pruned)
        assert live == model


RefreshFamilies.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_refresh_families = RefreshFamilies.TestCase


# -- TOTP ------------------------------------------------------------------------------------


def enrol(auth: Auth, clock: Clock, name: str = "alice") -> tuple[pyotp.TOTP, list[str]]:
    secret, uri = auth.totp_begin(name)
    assert uri.startswith("otpauth://totp/") and "issuer=patronus" in uri
    totp = pyotp.TOTP(secret)
    codes = auth.totp_confirm(name, totp.at(clock()))
    return totp, codes


def test_totp_required_and_window(auth: Auth, clock: Clock) -> None:
    totp, codes = enrol(auth, clock)
    assert len(codes) == len(set(codes)) == 10
    assert auth.get_user("alice")["totp_enabled"]
    with pytest.raises(TotpRequired) as e:
        auth.login("alice", PW)
    assert e.value.status == 401
    with pytest.raises(AuthError, match="bad credentials"):   # the password is still checked first
        auth.login("alice", "wrong password!", totp=totp.at(clock()))
    clock.advance(120)   # four steps past the confirmation
    now = clock()
    with pytest.raises(AuthError, match="bad TOTP code"):
        auth.login("alice", PW, totp=totp.at(now - 60))     # two steps back
    with pytest.raises(AuthError, match="bad TOTP code"):
        auth.login("alice", PW, totp=totp.at(now + 60))     # two steps ahead
    auth.login("alice", PW, totp=totp.at(now - 30))         # one step back: ok
    auth.login("alice", PW, totp=totp.at(now))              # this step: ok
    auth.login("alice", PW, totp=totp.at(now + 30))         # one step ahead: ok
    with pytest.raises(AuthError, match="bad TOTP code"):
        auth.login("alice", PW, totp="12345x")


def test_totp_code_replay_refused(auth: Auth, clock: Clock) -> None:
    totp, _ = enrol(auth, clock)
    with pytest.raises(AuthError, match="bad TOTP code"):    # the code used to confirm is spent
        auth.login("alice", PW, totp=totp.at(clock()))
    clock.advance(30)
    code = totp.at(clock())
    auth.login("alice", PW, totp=code)
    with pytest.raises(AuthError, match="bad TOTP code"):
        auth.login("alice", PW, totp=code)
    # an older step than the last accepted one is refused even inside the window
    with pytest.raises(AuthError, match="bad TOTP code"):
        auth.login("alice", PW, totp=totp.at(clock() - 30))


def test_recovery_code_works_once(auth: Auth, clock: Clock, db: ControllerDB) -> None:
    _, codes = enrol(auth, clock)
    auth.login("alice", PW, totp=codes[3])
    with pytest.raises(AuthError, match="bad TOTP code"):
        auth.login("alice", PW, totp=codes[3])
    auth.login("alice", PW, totp=codes[4].upper().replace("-", " "))   # as typed off paper
    (rec,) = db.query("SELECT recovery FROM users WHERE name = 'alice'")[0]
    assert len(json.loads(rec)) == 8 and all(h.startswith("$argon2id$") for h in json.loads(rec))
    assert [r["after"] for r in db.audit_log() if r["action"] == "totp.recovery_used"][0] == {"recovery_left": 8}


def test_totp_enrolment_rules(auth: Auth, clock: Clock) -> None:
    with pytest.raises(Conflict, match="no TOTP enrolment"):
        auth.totp_confirm("alice", "123456")
    secret, _ = auth.totp_begin("alice")
    with pytest.raises(AuthError, match="bad TOTP code"):
        auth.totp_confirm("alice", pyotp.TOTP(secret).at(clock() + 90))
    assert not auth.get_user("alice")["totp_enabled"]
    auth.login("alice", PW)     # not enabled yet: the password alone still logs in
    auth.totp_confirm("alice", pyotp.TOTP(secret).at(clock()))
    with pytest.raises(Conflict, match="already enabled"):
        auth.totp_begin("alice")
    auth.totp_disable("alice", actor="root")
    auth.login("alice", PW)
    assert not auth.get_user("alice")["totp_enabled"]


def test_totp_secret_is_sealed_with_the_signing_key(auth: Auth, clock: Clock, db: ControllerDB) -> None:
    secret, _ = auth.totp_begin("alice")
    (sealed,) = db.query("SELECT totp_secret FROM users WHERE name = 'alice'")[0]
    assert sealed.startswith("v1:") and secret not in sealed
    other = Auth(db, b"y" * 32, clock=clock, password_hasher=FAST, login_rate=LOOSE)
    with pytest.raises(StateError, match="cannot be opened"):
        other.totp_confirm("alice", pyotp.TOTP(secret).at(clock()))


# -- API keys -------------------------------------------------------------------------------


def test_api_key_shown_once_and_stored_hashed(auth: Auth, db: ControllerDB, clock: Clock) -> None:
    secret, meta = auth.create_api_key("ci-deploy", Role.VIEWER, expires_s=3600, actor="root")
    assert secret.startswith(f"pnk_{meta['id']}_") and meta["prefix"] == f"pnk_{meta['id']}"
    listed = auth.list_api_keys()
    assert listed == [meta] and secret not in json.dumps(listed) and "hash" not in listed[0]
    assert secret.encode() not in file_bytes(db) and secret.split("_", 2)[2].encode() not in file_bytes(db)
    p = auth.authenticate(secret)
    assert (p.name, p.role, p.kind, p.key_id, p.jti) == ("ci-deploy", Role.VIEWER, "apikey", meta["id"], None)
    assert p.actor == f"apikey:ci-deploy:{meta['id']}"
    assert allowed(p.role, "sites.read") and not allowed(p.role, "sites.write")
    assert auth.authenticate("Bearer " + secret) == p
    with pytest.raises(AuthError, match="bad API key"):
        auth.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    with pytest.raises(AuthError, match="bad API key"):
        auth.authenticate(f"pnk_{'0' * 16}_{secret.split('_', 2)[2]}")
    with pytest.raises(AuthError, match="malformed API key"):
        auth.authenticate("pnk_zz_short")


def test_api_key_last_used_expiry_and_revocation(auth: Auth, clock: Clock) -> None:
    secret, meta = auth.create_api_key("probe", Role.OPERATOR, expires_s=100, actor="root")
    assert auth.get_api_key(meta["id"])["last_used"] is None
    auth.authenticate(secret)
    assert auth.get_api_key(meta["id"])["last_used"] == clock()
    clock.advance(50)
    auth.authenticate(secret)
    assert auth.get_api_key(meta["id"])["last_used"] == clock()
    clock.advance(50)
    with pytest.raises(AuthError, match="API key expired"):
        auth.authenticate(secret)
    forever, m2 = auth.create_api_key("forever", Role.VIEWER, expires_s=None, actor="root")
    clock.advance(10 * 365 * 86400)
    auth.authenticate(forever)
    auth.revoke_api_key(m2["id"], actor="root")
    with pytest.raises(AuthError, match="API key revoked"):
        auth.authenticate(forever)
    assert auth.get_api_key(m2["id"])["revoked"] is True
    with pytest.raises(NotFound):
        auth.revoke_api_key("0" * 16, actor="root")


def test_api_key_scope_cannot_exceed_the_creator(auth: Auth) -> None:
    with pytest.raises(Forbidden) as e:
        auth.create_api_key("escalate", Role.ADMIN, expires_s=None, actor="alice")
    assert e.value.status == 403
    auth.create_api_key("ops", Role.OPERATOR, expires_s=None, actor="alice")
    with pytest.raises(ConfigError):
        auth.create_api_key("bad name!", Role.VIEWER, expires_s=None, actor="root")
    with pytest.raises(ConfigError):
        auth.create_api_key("k", Role.VIEWER, expires_s=-1, actor="root")


# -- rate limits ---------------------------------------------------------------------------


def test_login_brute_force_is_rate_limited(db: ControllerDB, clock: Clock) -> None:
    auth = make_auth(db, clock, login_rate=(5, 60.0))
    auth.create_user("alice", PW, Role.VIEWER)
    for _ in range(5):
        with pytest.raises(AuthError):
            auth.login("alice", "wrong password!", remote="198.51.100.1")
    with pytest.raises(RateLimited) as e:
        auth.login("alice", PW, remote="198.51.100.1")   # even the right password waits
    assert e.value.status == 429 and 0 < e.value.retry_after <= 12.0
    assert not isinstance(e.value, AuthError)
    auth.login("alice", PW, remote="198.51.100.2")       # another remote is not affected
    clock.advance(e.value.retry_after)
    auth.login("alice", PW, remote="198.51.100.1")
    with pytest.raises(RateLimited):
        auth.login("alice", PW, remote="198.51.100.1")
    clock.advance(60)
    auth.login("alice", PW, remote="198.51.100.1")
    limited = [r for r in db.audit_log() if r["after"] == {"reason": "rate limited"}]
    assert len(limited) == 2 and all(not r["ok"] for r in limited)


def test_one_remote_spraying_names_is_rate_limited(db: ControllerDB, clock: Clock) -> None:
    auth = make_auth(db, clock, login_rate=(5, 60.0))
    for i in range(20):
        with pytest.raises(AuthError):
            auth.login(f"user{i}", PW, remote="203.0.113.5")
    with pytest.raises(RateLimited):
        auth.login("user99", PW, remote="203.0.113.5")


def test_per_credential_rate_limit(db: ControllerDB, clock: Clock) -> None:
    auth = make_auth(db, clock, credential_rate=(100, 1.0))
    auth.create_user("alice", PW, Role.VIEWER)
    pair = auth.login("alice", PW)
    key, _ = auth.create_api_key("k", Role.VIEWER, expires_s=None, actor="system")
    for _ in range(100):
        auth.authenticate(pair.access)
        auth.authenticate(key)       # a separate bucket
    with pytest.raises(RateLimited) as e:
        auth.authenticate(pair.access)
    assert 0 < e.value.retry_after <= 0.011
    clock.advance(1)
    auth.authenticate(pair.access)
    # rejected credentials are limited per remote, so a flood of garbage is too
    for _ in range(100):
        with pytest.raises(AuthError):
            auth.authenticate("garbage", remote="203.0.113.9")
    with pytest.raises(RateLimited):
        auth.authenticate("garbage", remote="203.0.113.9")
    auth.authenticate(key, remote="203.0.113.9")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bearer=st.one_of(
    st.text(max_size=300),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    st.text(max_size=120).map(lambda s: "pnk_" + s),
    st.text(alphabet="0123456789abcdefABC_-", max_size=80).map(lambda s: "pnk_" + s),
    st.text(max_size=100).map(lambda s: "Bearer " + s),
    st.tuples(*[st.binary(max_size=60)] * 3).map(lambda t: ".".join(b64(x) for x in t)),
    st.tuples(st.sampled_from([b'{"alg":"HS256"}', b'{"alg":"none"}', b'{"alg":"HS256","crit":["x"]}',
                               b"[" * 500, b'{"alg":1}', b"null"]),
              st.sampled_from([b'{"sub":"alice"}', b"[" * 2000 + b"]" * 2000, b'{"exp":1e999}', b"1", b"{}"]),
              st.binary(max_size=40)).map(lambda t: ".".join(b64(x) for x in t)),
))
def test_authenticate_only_raises_auth_errors(db: ControllerDB, clock: Clock, bearer: str) -> None:
    auth = getattr(db, "_test_auth", None)
    if auth is None:   # one Auth per test, not per example (hashing the dummy costs)
        auth = make_auth(db, clock, credential_rate=(10**9, 1.0))
        db._test_auth = auth   # type: ignore[attr-defined]
    try:
        auth.authenticate(bearer)
    except (AuthError, RateLimited):
        pass


def test_authenticate_refuses_non_strings(auth: Auth) -> None:
    for junk in (None, b"bytes", 42, "x" * 5000):
        with pytest.raises(AuthError, match="malformed credential"):
            auth.authenticate(junk)   # type: ignore[arg-type]


# -- RBAC ------------------------------------------------------------------------------------


EXPECTED = {
    "sites.read": {"admin", "operator", "viewer"},
    "sites.write": {"admin", "operator"},
    "policies.read": {"admin", "operator", "viewer"},
    "policies.write": {"admin", "operator"},
    "paths.read": {"admin", "operator", "viewer"},
    "events.read": {"admin", "operator", "viewer"},
    "flows.read": {"admin", "operator", "viewer"},
    "topology.read": {"admin", "operator", "viewer"},
    "tokens.read": {"admin", "operator"},
    "tokens.write": {"admin", "operator"},
    "users.read": {"admin"},
    "users.write": {"admin"},
    "apikeys.read": {"admin"},
    "apikeys.write": {"admin"},
    "audit.read": {"admin"},
    "self": {"admin", "operator", "viewer"},
    "agent": set(),
    "agent.enrol": set(),
}


def test_rbac_table() -> None:
    assert set(ACTIONS) == set(PERMISSIONS) == set(EXPECTED)
    for action, roles in EXPECTED.items():
        for role in Role:
            assert allowed(role, action) == (role.value in roles), (role, action)
            assert allowed(role.value, action) == (role.value in roles)
    assert all(allowed(Role.ADMIN, a) for a in ACTIONS if EXPECTED[a])  # agent actions belong to no role
    assert not allowed("root", "sites.read")   # not a role: nothing allowed
    for unknown in ("sites.delete", "", "SITES.READ"):
        with pytest.raises(KeyError):
            allowed(Role.ADMIN, unknown)


# -- errors and keys ---------------------------------------------------------------------------


def test_errors_are_named_with_status_and_title() -> None:
    for cls, status in ((AuthError, 401), (TotpRequired, 401), (Forbidden, 403), (Conflict, 409), (NotFound, 404)):
        assert issubclass(cls, PatronusError) and cls.status == status and cls.title
    r = RateLimited(2.5)
    assert r.status == 429 and r.retry_after == 2.5 and "2.5" in str(r)


def test_signing_key_must_be_long_enough(db: ControllerDB) -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        Auth(db, b"short", password_hasher=FAST)


def test_signing_key_file(tmp_path: Path) -> None:
    f = tmp_path / "signing.key"
    key = new_signing_key(f)
    assert len(key) == 32 and os.stat(f).st_mode & 0o777 == 0o600 and load_signing_key(f) == key
    with pytest.raises(ConfigError, match="exists"):
        new_signing_key(f)
    assert load_signing_key(f) == key    # never overwritten
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_signing_key(f)
    link = tmp_path / "link.key"
    link.symlink_to(f)
    with pytest.raises(ConfigError, match="symlink"):
        load_signing_key(link)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 32"):
        load_signing_key(short)


# -- audit of everything, and no secret on disk ---------------------------------------------


def test_every_mutation_and_auth_event_is_audited_without_secrets(auth: Auth, db: ControllerDB,
                                                                 clock: Clock) -> None:
    remote = "192.0.2.44"
    auth.create_user("bob", PW + "-bob", Role.VIEWER, actor="root", remote=remote)
    auth.set_role("bob", Role.OPERATOR, actor="root", remote=remote)
    auth.set_password("bob", PW + "-bob2", actor="root", remote=remote)
    pair = auth.login("bob", PW + "-bob2", remote=remote)
    with pytest.raises(AuthError):
        auth.login("bob", "wrong password", remote=remote)
    rotated = auth.refresh(pair.refresh, remote=remote)
    with pytest.raises(AuthError):
        auth.refresh(pair.refresh, remote=remote)
    secret, uri = auth.totp_begin("bob", remote=remote)
    codes = auth.totp_confirm("bob", pyotp.TOTP(secret).at(clock()), remote=remote)
    clock.advance(30)
    last = auth.login("bob", PW + "-bob2", totp=pyotp.TOTP(secret).at(clock()), remote=remote)
    auth.login("bob", PW + "-bob2", totp=codes[0], remote=remote)
    key, meta = auth.create_api_key("bobkey", Role.VIEWER, expires_s=60, actor="bob", remote=remote)
    auth.authenticate(key, remote=remote)
    auth.revoke_api_key(meta["id"], actor="root", remote=remote)
    with pytest.raises(AuthError):
        auth.authenticate(key, remote=remote)
    auth.logout(last.access, last.refresh, remote=remote)
    with pytest.raises(AuthError):
        auth.authenticate(last.access, remote=remote)
    auth.totp_disable("bob", actor="root", remote=remote)
    auth.set_disabled("bob", True, actor="root", remote=remote)
    auth.set_disabled("bob", False, actor="root", remote=remote)
    auth.delete_user("bob", actor="root", remote=remote)

    log = list(reversed(db.audit_log(limit=1000)))
    mine = [r for r in log if r["remote"] == remote]
    assert [(r["action"], r["ok"]) for r in mine] == [
        ("user.create", True), ("user.role", True), ("user.password", True),
        ("auth.login", True), ("auth.login", False), ("auth.refresh", True), ("auth.refresh_reuse", False),
        ("totp.begin", True), ("totp.confirm", True), ("auth.login", True),
        ("totp.recovery_used", True), ("auth.login", True),
        ("apikey.create", True), ("apikey.revoke", True), ("auth.reject", False),
        ("auth.logout", True), ("auth.reject", False),
        ("totp.disable", True), ("user.disable", True), ("user.enable", True), ("user.delete", True),
    ]
    by = {(r["action"], r["ok"]): r for r in mine}
    assert by[("user.create", True)]["after"] == {"name": "bob", "role": "viewer"}
    assert by[("user.create", True)]["actor"] == "root" and by[("user.create", True)]["target"] == "bob"
    assert (by[("user.role", True)]["before"], by[("user.role", True)]["after"]) == (
        {"role": "viewer"}, {"role": "operator"})
    assert by[("apikey.revoke", True)]["before"]["revoked"] is False
    assert by[("apikey.revoke", True)]["after"]["revoked"] is True
    assert by[("auth.reject", False)]["after"] == {"reason": "token revoked"}
    assert by[("user.delete", True)]["before"]["name"] == "bob"
    assert by[("totp.disable", True)]["before"] == {"totp_enabled": True}
    assert all(isinstance(r["ts"], float) for r in log)

    on_disk = file_bytes(db)
    for s in (PW, PW + "-bob", PW + "-bob2", secret, uri, key, key.split("_", 2)[2], pair.refresh,
              rotated.refresh, last.refresh, pair.access, last.access, *codes, *(c.replace("-", "") for c in codes)):
        assert s.encode() not in on_disk, s[:12]


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                     max_leaves=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claims=st.dictionaries(
    st.sampled_from(["sub", "role", "jti", "iat", "exp", "iss", "gen", "typ", "nbf", "aud"]),
    _JSON | st.sampled_from(["alice", "operator", "patronus", "access", "0" * 32, 10**20, T0 + 60, -1]),
    max_size=10))
def test_signed_tokens_with_any_claims_only_raise_auth_errors(db: ControllerDB, clock: Clock, claims: dict) -> None:
    # signed with the real key: the claim checks, not the signature, must refuse them
    auth = getattr(db, "_test_auth", None)
    if auth is None:
        auth = make_auth(db, clock, credential_rate=(10**9, 1.0))
        auth.create_user("alice", PW, Role.OPERATOR)
        db._test_auth = auth   # type: ignore[attr-defined]
    try:
        token = jwt.encode(claims, KEY, algorithm="HS256")
    except (TypeError, ValueError):
        return   # pyjwt will not sign it (e.g. a non-numeric exp): nothing to present
    try:
        auth.authenticate(token)
    except (AuthError, RateLimited):
        pass
