"""Authentication and authorisation of the controller: users with Argon2id
passwords, short-lived JWT access tokens with rotating refresh tokens,
API keys, TOTP with one-time recovery codes, RBAC, rate limits, and an
audit row for every change and every auth event.

Credentials and how they are kept:

- passwords: Argon2id (argon2-cffi's ``PasswordHasher``), rehashed on login
  when the parameters change;
- access tokens: JWT, HS256 with the controller's signing key (>= 32
  bytes), ``iss="patronus"``, ``typ="access"``; only HS256 is accepted on
  decode (``alg: none`` and every other algorithm are refused). A logout puts
  the ``jti`` in ``revoked_jti`` until the token's ``exp``; a password change,
  a deletion or a disabling bumps the user's generation (claim ``gen``) so
  every access token of the user dies at once;
- refresh tokens: opaque ``secrets.token_urlsafe(32)``, stored as sha256
  (they are 256-bit random, so a fast hash cannot be brute-forced). Each use
  rotates: the token is marked used and a new one of the same family is
  issued; presenting a used token again revokes the whole family;
- API keys: ``pnk_<id>_<secret>``, the secret 256-bit random, stored as
  sha256 (not Argon2: a slow hash adds nothing to a 256-bit random secret
  and would cost tens of milliseconds of CPU on every request);
- TOTP secrets: cannot be hashed (verification needs them), so they are
  sealed with AES-GCM under a key derived (HKDF) from the signing key: the
  database file alone does not reveal them. Recovery codes: Argon2id hashes,
  each usable once.

>>> import tempfile, os
>>> from argon2 import PasswordHasher
>>> from patronus.controller.db import ControllerDB
>>> db = ControllerDB(os.path.join(tempfile.mkdtemp(), "ctl.db"))
>>> auth = Auth(db, b"k" * 32, password_hasher=PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1))
>>> auth.create_user("alice", "correct horse battery", Role.OPERATOR)
>>> pair = auth.login("alice", "correct horse battery", remote="192.0.2.7")
>>> p = auth.authenticate(pair.access)
>>> (p.name, p.role, p.kind, allowed(p.role, "sites.write"), allowed(p.role, "users.write"))
('alice', <Role.OPERATOR: 'operator'>, 'user', True, False)
>>> auth.logout(pair.access, pair.refresh)
>>> auth.authenticate(pair.access)
Traceback (most recent call last):
...
patronus.controller.auth.AuthError: token revoked
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import jwt
import pyotp
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, PatronusError, StateError
from ..wireguard.keys import read_secret_file, write_secret_file
from .db import ControllerDB
from .tables import TABLES, StoreConflict, StoreUnavailable, Tx

PRUNE_CHUNK = 20   # expired rows Auth.prune deletes a transaction

__all__ = [
    "Role", "ACTIONS", "PERMISSIONS", "allowed", "Principal", "TokenPair", "ControllerError", "AuthError",
    "TotpRequired", "Forbidden", "RateLimited", "Conflict", "NotFound", "Auth", "new_signing_key",
    "load_signing_key", "ISSUER", "API_KEY_PREFIX",
]

ISSUER = "patronus"
API_KEY_PREFIX = "pnk_"
_ALGORITHM = "HS256"
_CLAIMS = ("sub", "role", "jti", "iat", "exp", "typ", "iss", "gen")
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")          # user names, as site names but lower case
_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")              # secrets.token_urlsafe(32)
_TOTP_CODE_RE = re.compile(r"[0-9]{6}")
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"    # no 0/o, 1/l/i: read off a sheet of paper
_RECOVERY_CODES = 10
_MAX_TOKEN = 4096          # longer bearer strings are refused before any parsing
_PASSWORD_LEN = (12, 1024)


class Role(str, enum.Enum):
    """A principal's role. ``admin`` may do everything, ``operator`` runs
    the network (sites, policies, enrolment tokens), ``viewer`` reads."""

    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


# A role may create API keys of its own rank or below.
_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}

_ALL = frozenset(Role)
_STAFF = frozenset({Role.ADMIN, Role.OPERATOR})
_ADMIN = frozenset({Role.ADMIN})

# Action name -> the roles allowed to do it. Every route names one action;
# an action missing here is a KeyError in allowed() (a route without a rule
# fails loudly instead of being open).
PERMISSIONS: dict[str, frozenset[Role]] = {
    "sites.read": _ALL,
    "sites.write": _STAFF,
    "policies.read": _ALL,
    "policies.write": _STAFF,
    "paths.read": _ALL,
    "events.read": _ALL,
    "flows.read": _ALL,
    "topology.read": _ALL,
    "tokens.read": _STAFF,
    "tokens.write": _STAFF,
    "users.read": _ADMIN,
    "users.write": _ADMIN,
    "apikeys.read": _ADMIN,
    "apikeys.write": _ADMIN,
    "audit.read": _ADMIN,
    "self": _ALL,      # any authenticated principal: own profile, own TOTP, logout
    # the agent channel (controller/agents.py): an agent's own credential, or
    # an enrolment token as the bearer; no role has them, so users and API keys get 403
    "agent": frozenset(),
    "agent.enrol": frozenset(),
}
ACTIONS: tuple[str, ...] = tuple(PERMISSIONS)


def allowed(role: Role | str, action: str) -> bool:
    """Whether ``role`` may do ``action``; KeyError for an action without a rule.

    >>> allowed(Role.VIEWER, "sites.read"), allowed("viewer", "sites.write")
    (True, False)
    >>> allowed(Role.ADMIN, "sites.delete")
    Traceback (most recent call last):
    ...
    KeyError: "no permission rule for action 'sites.delete'"
    """
    try:
        roles = PERMISSIONS[action]
    except (KeyError, TypeError):
        raise KeyError(f"no permission rule for action {action!r}") from None
    try:
        return Role(role) in roles
    except ValueError:
        return False


@dataclass(frozen=True)
class Principal:
    """Who a request is from: a user (``kind="user"``, ``jti`` of the access
    token) or an API key (``kind="apikey"``, ``name`` the key's name,
    ``key_id`` its id). ``role`` is the current one (a role change applies
    to the next request, not at the next login)."""

    name: str
    role: Role
    kind: str
    jti: str | None = None
    key_id: str | None = None

    @property
    def actor(self) -> str:
        """The name to write in the audit log: the user's name, or
        ``apikey:<name>:<id>`` (a key's name may equal a user's).

        >>> Principal("ci", Role.VIEWER, "apikey", None, "0123456789abcdef").actor
        'apikey:ci:0123456789abcdef'
        """
        return self.name if self.kind == "user" else f"apikey:{self.name}:{self.key_id}"


@dataclass(frozen=True)
class TokenPair:
    """What a login or a refresh returns: the access JWT, the opaque
    refresh token, and the access token's lifetime in seconds. The repr
    hides both tokens."""

    access: str
    refresh: str
    expires_in: int

    def __repr__(self) -> str:
        return f"TokenPair(access=<redacted>, refresh=<redacted>, expires_in={self.expires_in})"


# -- errors ----------------------------------------------------------------------


class ControllerError(PatronusError):
    """Base of the controller's request errors: ``status`` is the HTTP status,
    ``title`` a short name for an RFC 9457 problem document. The message
    never contains a secret."""

    status: int = 400
    title: str = "bad request"


class AuthError(ControllerError):
    """The credential is missing, malformed, wrong, expired or revoked; the
    message says which (e.g. ``token expired``, ``bad signature``)."""

    status = 401
    title = "unauthorized"


class TotpRequired(AuthError):
    """The password was right but the account needs a TOTP (or recovery) code."""

    title = "totp required"

    def __init__(self, message: str = "TOTP code required") -> None:
        super().__init__(message)


class Forbidden(ControllerError):
    """Authenticated, but the role does not allow the action."""

    status = 403
    title = "forbidden"


class RateLimited(ControllerError):
    """Too many attempts; ``retry_after`` seconds until the next is allowed."""

    status = 429
    title = "too many requests"

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(float(retry_after), 0.001)
        super().__init__(f"rate limited: retry after {self.retry_after:.1f} s")


class Conflict(ControllerError):
    """The change clashes with the current state (a user that exists, the last admin)."""

    status = 409
    title = "conflict"


class NotFound(ControllerError):
    """No such user or API key."""

    status = 404
    title = "not found"


# -- rate limiting ---------------------------------------------------------------


class _Buckets:
    """Token buckets by key: ``burst`` tokens, refilled at ``burst / per``
    tokens a second. In memory (a restart forgets them; that only gives an
    attacker one more burst). Thread-safe."""

    _MAX_KEYS = 10_000   # beyond this, buckets that are full again are forgotten

    def __init__(self, rate: tuple[int, float], clock: Callable[[], float], field: str) -> None:
        burst, per = rate
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError(field, rate, "needs a burst (an integer >= 1)")
        if isinstance(per, bool) or not isinstance(per, (int, float)) or not math.isfinite(per) or per <= 0:
            raise ConfigError(field, rate, "needs a period in seconds > 0")
        self.burst = float(burst)
        self.rate = burst / float(per)
        self._clock = clock
        self._state: dict[Any, tuple[float, float]] = {}   # key -> (tokens, at)
        self._lock = threading.Lock()

    def _level(self, key: Any, now: float) -> float:
        tokens, at = self._state.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def wait(self, key: Any) -> float:
        """Seconds until ``key`` has a token (0.0 when it has one now)."""
        with self._lock:
            level = self._level(key, self._clock())
        return 0.0 if level >= 1.0 else (1.0 - level) / self.rate

    def take(self, key: Any) -> float:
        """Take a token: 0.0 when taken, else the seconds to wait (nothing taken)."""
        with self._lock:
            now = self._clock()
            level = self._level(key, now)
            if level < 1.0:
                return (1.0 - level) / self.rate
            if len(self._state) >= self._MAX_KEYS:
                self._state = {k: v for k, v in self._state.items() if self._level(k, now) < self.burst}
            self._state[key] = (level - 1.0, now)
            return 0.0


# -- helpers ---------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _user_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(field, name, "is not a user name ([a-z][a-z0-9_-]{0,31})")
    return name


def _role(role: Any) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ConfigError("role", role, f"is not one of {', '.join(r.value for r in Role)}") from None


def _check_password(password: Any) -> str:
    if not isinstance(password, str):
        raise ConfigError("password", "<redacted>", "is not a string")
    lo, hi = _PASSWORD_LEN
    if not lo <= len(password) <= hi:
        # the value is a secret: only its length goes into the message
        raise ConfigError("password", f"<{len(password)} characters>", f"must have {lo} to {hi} characters")
    return password


def _recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(12))   # ~59 bits
    return f"{raw[:4]}-{raw[4:8]}-{raw[8:]}"


def _normalise_recovery(code: str) -> str:
    return "".join(code.split()).replace("-", "").lower()


def _target(name: Any) -> str:
    """A login name fit for the audit log: the name when valid, else a
    placeholder (someone may have typed their password into the name field)."""
    return name if isinstance(name, str) and _NAME_RE.fullmatch(name) else "<invalid name>"


class Auth:
    """The controller's authentication core over a :class:`ControllerDB`.

    ``key`` signs access tokens (HS256, at least 32 bytes) and seals TOTP
    secrets. ``clock`` gives wall-clock seconds (injectable: tests move
    time instead of sleeping). ``login_rate`` is the token bucket (burst,
    per seconds) for each (name, remote) pair; ``remote_login_rate``
    (default 4x the burst of ``login_rate``) the one for each remote,
    whatever name it tries. ``credential_rate`` limits requests per
    authenticated principal, and rejected credentials per remote.
    ``password_hasher`` replaces argon2-cffi's default Argon2id parameters
    (tests use cheap ones); it must hash Argon2id.
    """

    def __init__(self, db: ControllerDB, key: bytes, *, access_ttl_s: int = 900, refresh_ttl_s: int = 14 * 86400,
                 clock: Callable[[], float] = time.time, login_rate: tuple[int, float] = (5, 60.0),
                 credential_rate: tuple[int, float] = (100, 1.0),
                 remote_login_rate: tuple[int, float] | None = None,
                 password_hasher: PasswordHasher | None = None) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < 32:
            n = len(key) if isinstance(key, (bytes, bytearray)) else 0
            raise ConfigError("key", "<redacted>", f"is {n} bytes; the signing key needs at least 32 bytes")
        for field, ttl in (("access_ttl_s", access_ttl_s), ("refresh_ttl_s", refresh_ttl_s)):
            if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
                raise ConfigError(field, ttl, "is not a whole number of seconds >= 1")
        self.db = db
        self._key = bytes(key)
        self.access_ttl_s = access_ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self._clock = clock
        self._hasher = password_hasher or PasswordHasher()
        if self._hasher.type is not Type.ID:
            raise ConfigError("password_hasher", self._hasher.type, "is not Argon2id")
        # Recovery codes are ~59-bit random and rate limited: lighter Argon2id
        # parameters keep a login that tries all ten under a quarter second.
        self._recovery_hasher = password_hasher or PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
        # verified against when the user does not exist, so an unknown name
        # costs as much time as a wrong password
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        self._totp_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                              info=b"patronus controller: totp secrets v1").derive(self._key)
        self._login_pair = _Buckets(login_rate, clock, "login_rate")
        self._login_remote = _Buckets(remote_login_rate or (4 * login_rate[0], login_rate[1]), clock,
                                      "remote_login_rate")
        self._credential = _Buckets(credential_rate, clock, "credential_rate")
        self._rejected = _Buckets(credential_rate, clock, "credential_rate")

    def __repr__(self) -> str:
        return f"Auth({self.db!r}, key=<redacted>)"

    # -- users ---------------------------------------------------------------------

    def create_user(self, name: str, password: str, role: Role, *, actor: str = "system",
                    remote: str | None = None) -> None:
        """Add a user; Conflict if the name is taken, ConfigError for a bad
        name, role or password (12 to 1024 characters)."""
        name, role = _user_name(name), _role(role)
        pw_hash = self._hasher.hash(_check_password(password))   # slow: outside the transaction
        with self.db.transaction() as t:
            if t.get("users", name) is not None:
                raise Conflict(f"user {name!r} exists")
            t.insert("users", {"name": name, "role": role.value, "pw_hash": pw_hash, "created": self._clock()})
            self.db.audit(actor, "user.create", name, after={"name": name, "role": role.value}, remote=remote)

    @staticmethod
    def _user(t: Tx, name: str) -> dict[str, Any]:
        row = t.get("users", name)
        if row is None:
            raise NotFound(f"no user {name!r}")
        return row

    @staticmethod
    def _other_admins(t: Tx, name: str) -> int:
        """The enabled admins other than ``name``."""
        return sum(1 for r in t.rows("users", role="admin", disabled=0) if r["name"] != name)

    @staticmethod
    def _end_sessions(t: Tx, user: dict[str, Any]) -> int:
        """Kill every token of ``user`` (its row, as read in this
        transaction): bump the generation (access tokens) and revoke every
        refresh token that could still be used (a used one cannot: presented
        again, it revokes its family). Returns the refresh tokens revoked."""
        t.update("users", user["name"], token_gen=user["token_gen"] + 1)
        n = 0
        for r in t.rows("refresh_tokens", user=user["name"], used_at=None, revoked=0):
            n += t.update("refresh_tokens", r["id"], revoked=1)
        return n

    def get_user(self, name: str) -> dict[str, Any]:
        """A user's public record (no hashes, no secrets); NotFound if none."""
        name = _user_name(name)
        with self.db.reading() as t:
            return self._public(self._user(t, name))

    @staticmethod
    def _public(row: Any) -> dict[str, Any]:
        return {"name": row["name"], "role": row["role"], "created": row["created"],
                "disabled": bool(row["disabled"]), "totp_enabled": bool(row["totp_enabled"])}

    def list_users(self) -> list[dict[str, Any]]:
        """Every user as ``{name, role, created, disabled, totp_enabled}``, by name."""
        with self.db.reading() as t:
            return [self._public(r) for r in t.rows("users")]   # by key: the name

    def set_password(self, name: str, password: str, *, actor: str = "system", remote: str | None = None,
                     current_password: str | None = None) -> None:
        """Replace a password and end every session of the user. With
        ``current_password`` (a user changing their own) it must match, else
        AuthError."""
        name = _user_name(name)
        pw_hash = self._hasher.hash(_check_password(password))
        if current_password is not None:
            with self.db.reading() as t:
                row = self._user(t, name)
            if not self._verify_pw(row["pw_hash"], current_password):
                self.db.audit(actor, "user.password", name, after={"reason": "wrong current password"},
                              remote=remote, ok=False)
                raise AuthError("wrong current password")
        with self.db.transaction() as t:
            row = self._user(t, name)
            t.update("users", name, pw_hash=pw_hash)
            ended = self._end_sessions(t, row)
            self.db.audit(actor, "user.password", name, after={"password_changed": True, "sessions_ended": ended},
                          remote=remote)

    def set_role(self, name: str, role: Role, *, actor: str = "system", remote: str | None = None) -> None:
        """Change a user's role (effective on their next request); Conflict
        when it would leave no enabled admin."""
        name, role = _user_name(name), _role(role)
        with self.db.transaction() as t:
            row = self._user(t, name)
            if row["role"] == "admin" and role is not Role.ADMIN and not self._other_admins(t, name):
                raise Conflict(f"{name!r} is the last admin")
            t.update("users", name, role=role.value)
            self.db.audit(actor, "user.role", name, before={"role": row["role"]}, after={"role": role.value},
                          remote=remote)

    def set_disabled(self, name: str, disabled: bool, *, actor: str = "system", remote: str | None = None) -> None:
        """Disable (ending every session) or re-enable a user; Conflict when
        it would leave no enabled admin."""
        name = _user_name(name)
        with self.db.transaction() as t:
            row = self._user(t, name)
            if disabled and row["role"] == "admin" and not self._other_admins(t, name):
                raise Conflict(f"{name!r} is the last admin")
            t.update("users", name, disabled=int(bool(disabled)))
            if disabled:
                self._end_sessions(t, row)
            self.db.audit(actor, "user.disable" if disabled else "user.enable", name,
                          before={"disabled": bool(row["disabled"])}, after={"disabled": bool(disabled)},
                          remote=remote)

    def update_user(self, name: str, *, role: Role | str | None = None, disabled: bool | None = None,
                    password: str | None = None, actor: str = "system",
                    remote: str | None = None) -> dict[str, Any]:
        """Change a user's role, disable or enable the user, reset the
        password (validated as on create): what is given, in one transaction
        and one audit row (``user.update``, before/after the public record;
        never the password). A new role applies to the user's next request;
        disabling and a new password end every session at once (access
        tokens by the generation, refresh tokens revoked). Conflict when it
        would leave no enabled admin; ConfigError when nothing is given.
        Returns the public record after the change."""
        name = _user_name(name)
        new_role = None if role is None else _role(role)
        if disabled is not None and not isinstance(disabled, bool):
            raise ConfigError("disabled", disabled, "is not true or false")
        if new_role is None and disabled is None and password is None:
            raise ConfigError("user", None, "has nothing to change: give role, disabled or password")
        pw_hash = None if password is None else self._hasher.hash(_check_password(password))  # slow: outside
        try:
            return self._update_user(name, new_role, disabled, pw_hash, actor, remote)
        except (Conflict, NotFound) as e:   # refused: on record too
            self.db.audit(actor, "user.update", name, after={"error": str(e)}, remote=remote, ok=False)
            raise

    def _update_user(self, name: str, new_role: Role | None, disabled: bool | None, pw_hash: str | None,
                     actor: str, remote: str | None) -> dict[str, Any]:
        with self.db.transaction() as t:
            row = self._user(t, name)
            before = self._public(row)
            role_after = row["role"] if new_role is None else new_role.value
            disabled_after = bool(row["disabled"]) if disabled is None else disabled
            if (row["role"] == "admin" and not row["disabled"] and (role_after != "admin" or disabled_after)
                    and not self._other_admins(t, name)):
                what = "demoted" if role_after != "admin" else "disabled"
                raise Conflict(f"{name!r} is the last enabled admin and cannot be {what}: make another user "
                               "admin (or enable one) first")
            changed: dict[str, Any] = {"role": role_after, "disabled": int(disabled_after)}
            if pw_hash is not None:
                changed["pw_hash"] = pw_hash
            t.update("users", name, **changed)
            ended = None
            if pw_hash is not None or (disabled_after and not row["disabled"]):
                ended = self._end_sessions(t, row)
            after = self._public({**row, **changed})
            noted: dict[str, Any] = dict(after)
            if pw_hash is not None:
                noted["password_changed"] = True
            if ended is not None:
                noted["sessions_ended"] = ended
            self.db.audit(actor, "user.update", name, before=before, after=noted, remote=remote)
        return after

    def delete_user(self, name: str, *, actor: str = "system", remote: str | None = None) -> None:
        """Delete a user and their refresh tokens (their access tokens die
        with them); Conflict for the last admin. API keys they created stay."""
        name = _user_name(name)
        with self.db.transaction() as t:
            row = self._user(t, name)
            if row["role"] == "admin" and not self._other_admins(t, name):
                raise Conflict(f"{name!r} is the last admin")
            # named here, not left to a foreign key: not every engine of the store has them
            for r in t.rows("refresh_tokens", user=name):
                t.delete("refresh_tokens", r["id"])
            t.delete("users", name)
            self.db.audit(actor, "user.delete", name, before=self._public(row), remote=remote)

    def _verify_pw(self, pw_hash: str, password: Any) -> bool:
        if not isinstance(password, str) or len(password) > _PASSWORD_LEN[1]:
            password = ""   # still hash, so the time taken says nothing
        try:
            return bool(self._hasher.verify(pw_hash, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    # -- login, refresh, logout ----------------------------------------------------

    def login(self, name: str, password: str, *, totp: str | None = None, remote: str | None = None) -> TokenPair:
        """Check a password (and the second factor when the user has TOTP:
        a current code, or one of the recovery codes, once) and issue a
        token pair. AuthError("bad credentials") for an unknown user or a
        wrong password alike; TotpRequired when the code is missing;
        RateLimited (before any check) past ``login_rate``."""
        target = _target(name)
        pair_key = (target if target != "<invalid name>" else "?", remote or "")
        wait = max(self._login_pair.wait(pair_key), self._login_remote.wait(remote or ""))
        if wait <= 0:
            wait = max(self._login_pair.take(pair_key), self._login_remote.take(remote or ""))
        if wait > 0:
            self.db.audit(target, "auth.login", target, after={"reason": "rate limited"}, remote=remote, ok=False)
            raise RateLimited(wait)
        row = None
        if target != "<invalid name>":
            with self.db.reading() as t:
                row = t.get("users", name)
        good = self._verify_pw(row["pw_hash"] if row else self._dummy_hash, password)
        if row is None or not good:
            self._fail_login(target, "bad credentials", remote)
        assert row is not None
        if row["disabled"]:
            self._fail_login(target, "account disabled", remote)
        if self._hasher.check_needs_rehash(row["pw_hash"]):
            rehashed = self._hasher.hash(password)   # slow: outside the transaction
            with contextlib.suppress(StoreConflict), self.db.transaction() as t:
                now = t.get("users", name)   # only the hash verified: a password changed meanwhile stays
                if now is not None and now["pw_hash"] == row["pw_hash"]:
                    t.update("users", name, pw_hash=rehashed)
        how = "password"
        if row["totp_enabled"]:
            if totp is None or totp == "":
                self.db.audit(target, "auth.login", target, after={"reason": "totp required"}, remote=remote,
                              ok=False)
                raise TotpRequired()
            how = self._second_factor(name, totp, remote)
            if how is None:
                self._fail_login(target, "bad TOTP code", remote)
        with self.db.transaction() as t:
            user = self._user(t, name)
            pair = self._issue(t, user, family=uuid.uuid4().hex)
            self.db.audit(name, "auth.login", name, after={"method": how}, remote=remote)
        return pair

    def _fail_login(self, target: str, reason: str, remote: str | None) -> NoReturn:
        self.db.audit(target, "auth.login", target, after={"reason": reason}, remote=remote, ok=False)
        # one message for an unknown user and a wrong password: no user enumeration
        raise AuthError("bad credentials" if reason == "bad credentials" else reason)

    def _issue(self, t: Tx, user: dict[str, Any], family: str) -> TokenPair:
        """A new access token and a refresh token of ``family`` (inside the caller's transaction)."""
        now = self._clock()
        iat = int(now)
        claims = {"sub": user["name"], "role": user["role"], "jti": uuid.uuid4().hex, "iat": iat,
                  "exp": iat + self.access_ttl_s, "typ": "access", "iss": ISSUER, "gen": user["token_gen"]}
        access = jwt.encode(claims, self._key, algorithm=_ALGORITHM)
        refresh = secrets.token_urlsafe(32)
        t.insert("refresh_tokens", {"id": uuid.uuid4().hex, "family": family, "user": user["name"],
                                    "token_hash": _sha256(refresh), "issued": now,
                                    "expires": now + self.refresh_ttl_s})
        return TokenPair(access, refresh, self.access_ttl_s)

    def refresh(self, refresh_token: str, *, remote: str | None = None) -> TokenPair:
        """Rotate a refresh token: a new pair, the presented token used up.
        A used token presented again revokes its whole family
        (AuthError "refresh token reuse: family revoked"); an unknown,
        revoked or expired one is AuthError naming which."""
        if (not isinstance(refresh_token, str) or not refresh_token.isascii()
                or not _SECRET_RE.fullmatch(refresh_token)):
            self.reject("malformed refresh token", "-", remote, "auth.refresh")
        token_hash = _sha256(refresh_token)
        now = self._clock()
        error: str | None = None
        pair: TokenPair | None = None
        with self.db.transaction() as t:
            found = t.rows("refresh_tokens", token_hash=token_hash)   # 0 or 1 (the hash is unique)
            row = found[0] if found else None
            if row is None:
                error = "unknown refresh token"
            elif row["revoked"]:
                error = "refresh token revoked"
            elif row["used_at"] is not None:
                # a stolen token, or a client that lost the rotation: either way the family is no longer trusted
                n = 0   # the family's token still usable (at most one: each refresh uses its predecessor)
                for r in t.rows("refresh_tokens", family=row["family"], used_at=None, revoked=0):
                    n += t.update("refresh_tokens", r["id"], revoked=1)
                error = "refresh token reuse: family revoked"
                self.db.audit(row["user"], "auth.refresh_reuse", row["user"],
                              after={"family": row["family"], "revoked": n}, remote=remote, ok=False)
            elif now >= row["expires"]:
                error = "refresh token expired"
            else:
                user = t.get("users", row["user"])
                if user is None or user["disabled"]:
                    error = "account disabled"
                else:
                    t.update("refresh_tokens", row["id"], used_at=now)
                    pair = self._issue(t, user, row["family"])
                    self.db.audit(user["name"], "auth.refresh", user["name"], after={"family": row["family"]},
                                  remote=remote)
        if error is not None or pair is None:
            self.reject(error or "refresh failed", row["user"] if row is not None else "-", remote,
                         "auth.refresh", audited=error == "refresh token reuse: family revoked")
        assert pair is not None
        wait = self._credential.take(("user", row["user"]))
        if wait > 0:
            raise RateLimited(wait)
        return pair

    def logout(self, access_token: str | None = None, refresh_token: str | None = None, *,
               remote: str | None = None) -> None:
        """End a session now: the access token's ``jti`` is revoked until its
        ``exp``, the refresh token's whole family is revoked. An expired
        access token is accepted (there is nothing left to revoke); a forged
        one is AuthError. An unknown refresh token is ignored."""
        if access_token is None and refresh_token is None:
            raise ConfigError("logout", None, "needs an access token, a refresh token or both")
        claims = self._decode(access_token, check_exp=False) if access_token is not None else None
        actor = claims["sub"] if claims else "anonymous"
        with self.db.transaction() as t:
            after: dict[str, Any] = {}
            if claims is not None:
                if t.get("revoked_jti", claims["jti"]) is None:   # revoked already: kept as it is
                    t.insert("revoked_jti", {"jti": claims["jti"], "expires": float(claims["exp"])})
                after["jti"] = claims["jti"]
            if refresh_token is not None and isinstance(refresh_token, str) and refresh_token.isascii():
                found = t.rows("refresh_tokens", token_hash=_sha256(refresh_token))   # 0 or 1
                row = found[0] if found else None
                if row is not None:
                    if claims is not None and row["user"] != claims["sub"]:
                        raise AuthError("the refresh token belongs to another user")
                    for r in t.rows("refresh_tokens", family=row["family"], used_at=None, revoked=0):
                        t.update("refresh_tokens", r["id"], revoked=1)
                    after["family"] = row["family"]
                    actor = row["user"]
            self.db.audit(actor, "auth.logout", actor, after=after, remote=remote)
        # tidying, not the logout (committed above): a replica's concurrent change of the same rows wins
        with contextlib.suppress(StoreConflict, StoreUnavailable):
            self.prune()

    def prune(self) -> int:
        """Delete revoked ``jti`` rows and refresh tokens past their expiry
        (neither can authenticate any more); the number of rows deleted."""
        now = self._clock()
        n = 0
        for name in ("revoked_jti", "refresh_tokens"):
            with self.db.reading() as t:
                gone = [r[TABLES[name].key] for r in t.rows(name) if r["expires"] < now]
            # in transactions of PRUNE_CHUNK rows (etcd takes 128 operations a transaction; a refresh
            # token's delete is five: the row and its index entries)
            for i in range(0, len(gone), PRUNE_CHUNK):
                with self.db.transaction() as t:
                    n += sum(t.delete(name, k) for k in gone[i:i + PRUNE_CHUNK])
        return n

    # -- access tokens and API keys ------------------------------------------------

    def _decode(self, token: Any, *, check_exp: bool = True) -> dict[str, Any]:
        """The claims of one of our access tokens, or AuthError naming the fault."""
        if not isinstance(token, str) or not token.isascii() or len(token) > _MAX_TOKEN or token.count(".") != 2:
            raise AuthError("malformed token")
        try:
            claims = jwt.decode(
                token, self._key, algorithms=[_ALGORITHM], issuer=ISSUER,
                # exp is checked below against the injectable clock
                options={"require": list(_CLAIMS), "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False, "verify_aud": False})
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"missing claim {e.claim!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except (jwt.exceptions.InvalidSubjectError, jwt.exceptions.InvalidJTIError,
                jwt.exceptions.InvalidIssuedAtError):
            raise AuthError("malformed claims") from None
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        except (ValueError, TypeError, KeyError, RecursionError, OverflowError, UnicodeError):
            # a hostile header or payload the library did not wrap (deep JSON nesting, odd types)
            raise AuthError("malformed token") from None
        if claims.get("typ") != "access":
            raise AuthError("not an access token")
        sub, role, jti, exp, gen = (claims.get(k) for k in ("sub", "role", "jti", "exp", "gen"))
        if (not isinstance(sub, str) or not _NAME_RE.fullmatch(sub) or role not in {r.value for r in Role}
                or not isinstance(jti, str) or not re.fullmatch(r"[0-9a-f]{32}", jti)
                or isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp)
                or isinstance(gen, bool) or not isinstance(gen, int)):
            raise AuthError("malformed claims")
        if check_exp and self._clock() >= exp:
            raise AuthError("token expired")
        return claims

    def verify(self, access_token: str) -> Principal:
        """The principal of a valid access token; AuthError naming the fault
        (``token expired``, ``token revoked``, ``bad signature``,
        ``algorithm not allowed``, ``malformed token``, ...)."""
        claims = self._decode(access_token)
        with self.db.reading() as t:   # two point reads, the second only when the first passes
            revoked = t.get("revoked_jti", claims["jti"]) is not None
            user = None if revoked else t.get("users", claims["sub"])
        if revoked:
            raise AuthError("token revoked")
        if user is None:
            raise AuthError("user no longer exists")
        if user["disabled"]:
            raise AuthError("account disabled")
        if user["token_gen"] != claims["gen"]:
            raise AuthError("token revoked")   # password changed, or the sessions were ended
        return Principal(claims["sub"], Role(user["role"]), "user", claims["jti"], None)

    def _api_key(self, bearer: str) -> Principal:
        parts = bearer.split("_", 2)
        if len(parts) != 3 or not _KEY_ID_RE.fullmatch(parts[1]) or not _SECRET_RE.fullmatch(parts[2]):
            raise AuthError("malformed API key")
        key_id, secret = parts[1], parts[2]
        with self.db.reading() as t:
            row = t.get("api_keys", key_id)
        # compared even for an unknown id, against a hash nothing matches
        stored = row["hash"] if row is not None else "0" * 64
        if not hmac.compare_digest(_sha256(secret), stored) or row is None:
            raise AuthError("bad API key")
        if row["revoked"]:
            raise AuthError("API key revoked")
        now = self._clock()
        if row["expires"] is not None and now >= row["expires"]:
            raise AuthError("API key expired")
        if row["last_used"] is None or now - row["last_used"] >= 1.0:   # at most one write a second per key
            # advisory: lost to a concurrent change of the key (another replica) or a store without quorum
            with contextlib.suppress(StoreConflict, StoreUnavailable), self.db.transaction() as t:
                t.update("api_keys", key_id, last_used=now)
        return Principal(row["name"], Role(row["role"]), "apikey", None, key_id)

    def recheck(self, bearer: str) -> Principal:
        """The principal of a credential accepted before, checked again for a
        long-lived channel (a GraphQL subscription): expired, revoked, a
        disabled user, a deleted key are AuthError. Not rate limited and not
        audited (the first ``authenticate`` was)."""
        token = bearer[7:] if bearer[:7].lower() == "bearer " else bearer
        return self._api_key(token) if token.startswith(API_KEY_PREFIX) else self.verify(token)

    def authenticate(self, bearer: str, *, remote: str | None = None) -> Principal:
        """The principal of a bearer credential: an access JWT or an API key
        (``pnk_<id>_<secret>``), with or without a leading ``Bearer ``.
        Raises only AuthError (the message names the fault; the rejection
        is audited) or RateLimited (more than ``credential_rate`` requests of
        one principal, or rejected credentials from one remote)."""
        try:
            if not isinstance(bearer, str) or not bearer.isascii() or len(bearer) > _MAX_TOKEN:
                raise AuthError("malformed credential")
            token = bearer[7:] if bearer[:7].lower() == "bearer " else bearer
            principal = self._api_key(token) if token.startswith(API_KEY_PREFIX) else self.verify(token)
        except AuthError as e:
            target = "-"
            if isinstance(bearer, str) and bearer.startswith(API_KEY_PREFIX):
                kid = bearer.split("_", 2)[1] if bearer.count("_") >= 2 else ""
                target = f"apikey:{kid}" if _KEY_ID_RE.fullmatch(kid) else "-"
            self.reject(str(e), target, remote, "auth.reject")
        wait = self._credential.take((principal.kind, principal.key_id or principal.name))
        if wait > 0:
            raise RateLimited(wait)
        return principal

    def reject(self, reason: str, target: str, remote: str | None, action: str, *,
                audited: bool = False) -> NoReturn:
        """Raise AuthError(reason), or RateLimited once one remote has sent
        too many rejected credentials; audited unless rate limited (a flood
        must not grow the log without bound)."""
        wait = self._rejected.take(remote or "")
        if wait > 0:
            raise RateLimited(wait)
        if not audited:
            self.db.audit("anonymous", action, target, after={"reason": reason}, remote=remote, ok=False)
        raise AuthError(reason)

    # -- API keys --------------------------------------------------------------------

    def create_api_key(self, name: str, role: Role, *, expires_s: float | None, actor: str,
                       remote: str | None = None) -> tuple[str, dict[str, Any]]:
        """A new API key: the secret string (shown once, only its sha256 is
        kept) and its metadata. ``expires_s`` seconds from now, or None for a
        key that does not expire. A user ``actor`` cannot create a key of a
        higher role than their own (Forbidden)."""
        if not isinstance(name, str) or not _KEY_NAME_RE.fullmatch(name):
            raise ConfigError("name", name, "is not an API key name ([A-Za-z0-9][A-Za-z0-9_.-]{0,63})")
        role = _role(role)
        if expires_s is not None and (isinstance(expires_s, bool) or not isinstance(expires_s, (int, float))
                                      or not math.isfinite(expires_s) or expires_s <= 0):
            raise ConfigError("expires_s", expires_s, "is not a number of seconds > 0 (or None: no expiry)")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = self._clock()
        meta = {"id": key_id, "name": name, "prefix": f"{API_KEY_PREFIX}{key_id}", "role": role.value,
                "created_by": actor, "created": now, "expires": None if expires_s is None else now + expires_s,
                "last_used": None, "revoked": False}
        with self.db.transaction() as t:
            creator = t.get("users", actor)
            if creator is not None and _RANK[role] > _RANK[Role(creator["role"])]:
                raise Forbidden(f"{actor!r} ({creator['role']}) cannot create a key with role {role.value}")
            t.insert("api_keys", {"id": key_id, "name": name, "prefix": meta["prefix"], "hash": _sha256(secret),
                                  "role": role.value, "created_by": actor, "created": now,
                                  "expires": meta["expires"]})
            self.db.audit(actor, "apikey.create", key_id, after=meta, remote=remote)
        return f"{API_KEY_PREFIX}{key_id}_{secret}", meta

    @staticmethod
    def _key_meta(row: Any) -> dict[str, Any]:
        return {"id": row["id"], "name": row["name"], "prefix": row["prefix"], "role": row["role"],
                "created_by": row["created_by"], "created": row["created"], "expires": row["expires"],
                "last_used": row["last_used"], "revoked": bool(row["revoked"])}

    def list_api_keys(self) -> list[dict[str, Any]]:
        """Every API key's metadata (never the secret or its hash), newest first."""
        with self.db.reading() as t:
            rows = t.rows("api_keys")   # by id: a stable sort by created, newest first, keeps ties by id
        return [self._key_meta(r) for r in sorted(rows, key=lambda r: r["created"], reverse=True)]

    def get_api_key(self, key_id: str) -> dict[str, Any]:
        """One API key's metadata; NotFound if none."""
        with self.db.reading() as t:
            row = t.get("api_keys", key_id)
        if row is None:
            raise NotFound(f"no API key {key_id!r}")
        return self._key_meta(row)

    def revoke_api_key(self, key_id: str, *, actor: str, remote: str | None = None) -> None:
        """Revoke an API key, effective on its next request; NotFound if none."""
        with self.db.transaction() as t:
            row = t.get("api_keys", key_id)
            if row is None:
                raise NotFound(f"no API key {key_id!r}")
            t.update("api_keys", key_id, revoked=1)
            self.db.audit(actor, "apikey.revoke", key_id, before=self._key_meta(row),
                          after={**self._key_meta(row), "revoked": True}, remote=remote)

    # -- TOTP ------------------------------------------------------------------------

    def _seal(self, name: str, secret: str) -> str:
        nonce = os.urandom(12)
        ct = AESGCM(self._totp_key).encrypt(nonce, secret.encode(), f"totp:{name}".encode())
        return "v1:" + base64.b64encode(nonce + ct).decode()

    def _unseal(self, name: str, sealed: str) -> str:
        try:
            if not sealed.startswith("v1:"):
                raise ValueError("unknown format")
            raw = base64.b64decode(sealed[3:], validate=True)
            return AESGCM(self._totp_key).decrypt(raw[:12], raw[12:], f"totp:{name}".encode()).decode()
        except (InvalidTag, ValueError, TypeError) as e:
            raise StateError(f"{self.db.path!r}: the TOTP secret of {name!r} cannot be opened with this "
                             f"signing key ({type(e).__name__})") from None

    def _totp_step(self, secret: str, code: Any, last_step: int | None) -> int | None:
        """The time step ``code`` is valid for (now, one before or one after),
        if later than ``last_step`` (a code is accepted once); else None."""
        if not isinstance(code, str) or not _TOTP_CODE_RE.fullmatch(code):
            return None
        totp = pyotp.TOTP(secret)
        now_step = int(self._clock()) // totp.interval
        found = None
        for step in (now_step - 1, now_step, now_step + 1):   # valid_window=1
            if hmac.compare_digest(totp.generate_otp(step), code) and (last_step is None or step > last_step):
                found = step
        return found

    def _second_factor(self, name: str, code: str, remote: str | None) -> str | None:
        """Check a TOTP or recovery code at login, using it up: "totp",
        "recovery", or None when it is neither."""
        with self.db.transaction() as t:
            row = self._user(t, name)
            step = self._totp_step(self._unseal(name, row["totp_secret"]), code, row["totp_last_step"])
            if step is not None:
                t.update("users", name, totp_last_step=step)
                return "totp"
            if not isinstance(code, str) or len(code) > 64:
                return None
            typed = _normalise_recovery(code)
            hashes_ = json.loads(row["recovery"])
            for i, h in enumerate(hashes_):
                try:
                    self._recovery_hasher.verify(h, typed)
                except (VerifyMismatchError, VerificationError, InvalidHashError):
                    continue
                del hashes_[i]
                t.update("users", name, recovery=json.dumps(hashes_))
                self.db.audit(name, "totp.recovery_used", name, after={"recovery_left": len(hashes_)},
                              remote=remote)
                return "recovery"
        return None

    def totp_begin(self, name: str, *, actor: str | None = None, remote: str | None = None) -> tuple[str, str]:
        """Start TOTP enrolment: a new secret (stored sealed, not enabled
        until :meth:`totp_confirm`) and its ``otpauth://`` provisioning URI.
        Conflict if TOTP is already enabled."""
        name = _user_name(name)
        secret = pyotp.random_base32()
        with self.db.transaction() as t:
            row = self._user(t, name)
            if row["totp_enabled"]:
                raise Conflict(f"TOTP is already enabled for {name!r}; disable it first")
            t.update("users", name, totp_secret=self._seal(name, secret), totp_enabled=0, totp_last_step=None)
            self.db.audit(actor or name, "totp.begin", name, remote=remote)
        return secret, pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=ISSUER)

    def totp_confirm(self, name: str, code: str, *, remote: str | None = None) -> list[str]:
        """Enable TOTP with a first valid code; the 10 one-time recovery
        codes (shown once, kept as Argon2id hashes). AuthError for a wrong
        code, Conflict without a :meth:`totp_begin` or when already enabled."""
        name = _user_name(name)
        codes = [_recovery_code() for _ in range(_RECOVERY_CODES)]
        hashes_ = [self._recovery_hasher.hash(_normalise_recovery(k)) for k in codes]
        with self.db.transaction() as t:
            row = self._user(t, name)
            if row["totp_enabled"]:
                raise Conflict(f"TOTP is already enabled for {name!r}")
            if row["totp_secret"] is None:
                raise Conflict(f"no TOTP enrolment begun for {name!r}")
            step = self._totp_step(self._unseal(name, row["totp_secret"]), code, row["totp_last_step"])
            if step is not None:
                t.update("users", name, totp_enabled=1, totp_last_step=step, recovery=json.dumps(hashes_))
                self.db.audit(name, "totp.confirm", name, before={"totp_enabled": False},
                              after={"totp_enabled": True, "recovery_left": len(codes)}, remote=remote)
        if step is None:
            self.db.audit(name, "totp.confirm", name, after={"reason": "bad TOTP code"}, remote=remote, ok=False)
            raise AuthError("bad TOTP code")
        return codes

    def totp_disable(self, name: str, *, actor: str, remote: str | None = None) -> None:
        """Turn TOTP off for a user and forget the secret and recovery codes."""
        name = _user_name(name)
        with self.db.transaction() as t:
            row = self._user(t, name)
            t.update("users", name, totp_secret=None, totp_enabled=0, totp_last_step=None, recovery="[]")
            self.db.audit(actor, "totp.disable", name, before={"totp_enabled": bool(row["totp_enabled"])},
                          after={"totp_enabled": False}, remote=remote)


# -- the signing key ---------------------------------------------------------------


def new_signing_key(path: str | os.PathLike[str]) -> bytes:
    """32 random bytes written to ``path`` with mode 0600 (O_EXCL|O_NOFOLLOW:
    a planted file or symlink is never reused); ConfigError if ``path``
    exists (a key is never overwritten: every token and TOTP secret depends
    on it).

    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "signing.key")
    >>> k = new_signing_key(f)
    >>> load_signing_key(f) == k, oct(os.stat(f).st_mode & 0o777)
    (True, '0o600')
    """
    key = secrets.token_bytes(32)
    if not write_secret_file(path, key, replace=False):
        raise ConfigError("signing key", os.fspath(path), "exists; load it with load_signing_key")
    return key


def load_signing_key(path: str | os.PathLike[str]) -> bytes:
    """The signing key at ``path``: refused (ConfigError) unless a regular
    0600 file of this user holding at least 32 bytes."""
    key = read_secret_file(path, "signing key")
    if len(key) < 32:
        raise ConfigError("signing key", os.fspath(path), f"holds {len(key)} bytes, a signing key has at least 32")
    return key
