"""Authenticated peer discovery: sites join with an enrollment token and
announce themselves (uplinks, endpoints, WireGuard public key, subnets) in
messages signed with an Ed25519 key the mesh enrolled. An announcement is
rejected, with a named reason, when it is unsigned, signed by a key the
mesh does not know, forged (bad signature), replayed (nonce seen before)
or stale (timestamp too far from now), malformed, or unauthorized.

Everything in an announcement is checked at this trust boundary, after the
signature (the body is at most ``MAX_BODY`` bytes, verified before it is
parsed, and must be the canonical JSON ``Announcement.to_bytes`` writes):
the site a valid name, ``wg_public_key`` a WireGuard key, ``ts`` a finite
number, ``nonce`` 32 hex digits, ``uplinks`` objects with a name, an IP
address and optional port/nat/mtu, ``subnets`` canonical CIDR prefixes.

What a site may announce (``unauthorized`` otherwise):

* never a default route (``0.0.0.0/0``, ``::/0``);
* when the state file holds a saved mesh (the agent's case), the site must
  be one of its sites and every announced prefix must lie inside one of the
  subnets the mesh configures for it (``Site.subnets``);
* always: no prefix overlapping a prefix another site currently announces
  (one that has not left ``sites()``), so no site can capture another's
  traffic.

Of two valid announcements of a site, the one with the later ``ts`` is kept.

The registry behind it is the SQLite state (``SqliteRegistry``); anything
implementing ``Registry`` (a networked store later) works the same.

>>> import tempfile, os
>>> reg = SqliteRegistry(os.path.join(tempfile.mkdtemp(), "state.db"))
>>> token = reg.create_token("br2", ttl_s=600)
>>> signer = SigningKey.generate()
>>> reg.enroll(token, "br2", signer.public_bytes)
>>> ann = Announcement.make("br2", wg_public_key="x" * 43 + "=", subnets=["10.9.0.0/24"],
...                         uplinks=[{"name": "isp", "address": "203.0.113.9"}])
>>> reg.publish(signer.sign(ann)).site
'br2'
>>> try: reg.publish(signer.sign(ann))               # the same message again
... except AnnouncementRejected as e: print(e.reason)
replayed
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import _validate as v
from ..errors import ConfigError, PatronusError
from ..store import Store
from .keys import PublicKey

__all__ = ["SigningKey", "Announcement", "SignedAnnouncement", "Registry", "SqliteRegistry", "AnnouncementRejected",
           "REJECT_REASONS", "SiteStatus", "MAX_BODY", "MAX_TOKEN_TTL_S", "verify", "authorize", "body_text"]

log = logging.getLogger("patronus.discovery")

REJECT_REASONS = ("unsigned", "unknown_key", "bad_signature", "replayed", "stale", "malformed", "unauthorized")
MAX_SKEW_S = 30.0
MAX_BODY = 64 * 1024          # bytes of an announcement body; larger ones are refused unread
MAX_TOKEN_TTL_S = 30 * 86400  # an enrolment token lives at most 30 days
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_UPLINK_KEYS = {"name", "address", "port", "nat", "mtu"}


class AnnouncementRejected(PatronusError):
    """An announcement the registry refused; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class SigningKey:
    """A site's Ed25519 announcement key (never printed)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, ann: Announcement) -> SignedAnnouncement:
        body = ann.to_bytes()
        return SignedAnnouncement(body, self._key.sign(body), self.public_bytes)

    def __repr__(self) -> str:
        return f"SigningKey(public={base64.b64encode(self.public_bytes).decode()!r})"


@dataclass(frozen=True)
class Announcement:
    """What a site says about itself. ``ts`` and ``nonce`` make each one unique.
    ``learned``: the subnets are what the site's routers announce (BGP,
    :mod:`patronus.bgp`), so the other sites route exactly these to it; a
    site without it announces its subnets in the mesh, which the others use.
    Only present in the body when true (announcements without BGP keep their
    exact old form)."""

    site: str
    wg_public_key: str
    subnets: tuple[str, ...]
    uplinks: tuple[dict[str, Any], ...]
    ts: float
    nonce: str
    learned: bool = False

    @classmethod
    def make(cls, site: str, *, wg_public_key: str, subnets: list[str], uplinks: list[dict[str, Any]],
             ts: float | None = None, learned: bool = False) -> Announcement:
        return cls(site, wg_public_key, tuple(subnets), tuple(dict(u) for u in uplinks),
                   time.time() if ts is None else ts, secrets.token_hex(16), learned)

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): what is signed."""
        d: dict[str, Any] = {"site": self.site, "wg_public_key": self.wg_public_key, "subnets": list(self.subnets),
                             "uplinks": list(self.uplinks), "ts": self.ts, "nonce": self.nonce}
        if self.learned:
            d["learned"] = True
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> Announcement:
        """Parse and validate a body; AnnouncementRejected("malformed") names
        what is wrong. Only the canonical form (``to_bytes``) is accepted."""
        if not isinstance(body, bytes):
            raise AnnouncementRejected("malformed", f"body is {type(body).__name__}, not bytes")
        if len(body) > MAX_BODY:
            raise AnnouncementRejected("malformed", f"body of {len(body)} bytes, at most {MAX_BODY}")
        try:
            d = json.loads(body.decode("ascii"), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise AnnouncementRejected("malformed", f"not canonical JSON: {type(e).__name__}") from None
        base = {"site", "wg_public_key", "subnets", "uplinks", "ts", "nonce"}
        if not isinstance(d, dict) or set(d) not in (base, base | {"learned"}):
            raise AnnouncementRejected("malformed", "not an object with exactly site, wg_public_key, subnets, "
                                                    "uplinks, ts, nonce (and learned)")
        if "learned" in d and d["learned"] is not True:
            raise AnnouncementRejected("malformed", "learned is not true (absent when false)")
        try:
            v.endpoint_name("site", d["site"])
        except ConfigError as e:
            raise AnnouncementRejected("malformed", str(e)) from None
        key = d["wg_public_key"]
        if not isinstance(key, str):
            raise AnnouncementRejected("malformed", "wg_public_key is not a string")
        try:
            PublicKey.from_text(key)
        except ConfigError:
            raise AnnouncementRejected("malformed", "wg_public_key is not a WireGuard key (base64 of 32 bytes)") \
                from None
        ts = d["ts"]
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not abs(ts) <= 1e11:  # also NaN, 10**400
            raise AnnouncementRejected("malformed", "ts is not a finite Unix time")
        nonce = d["nonce"]
        if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
            raise AnnouncementRejected("malformed", "nonce is not 32 lowercase hex digits")
        subnets = d["subnets"]
        if not isinstance(subnets, list):
            raise AnnouncementRejected("malformed", "subnets is not a list")
        for n in subnets:
            try:
                if v.network("subnets", n) != n:
                    raise ConfigError("subnets", n, "is not in canonical form")
            except ConfigError as e:
                raise AnnouncementRejected("malformed", str(e)) from None
        uplinks = d["uplinks"]
        if not isinstance(uplinks, list) or not all(isinstance(u, dict) for u in uplinks):
            raise AnnouncementRejected("malformed", "uplinks is not a list of objects")
        for u in uplinks:
            _check_uplink(u)
        ann = cls(d["site"], key, tuple(subnets), tuple(uplinks), float(ts), nonce, "learned" in d)
        if ann.to_bytes() != body:
            raise AnnouncementRejected("malformed", "not canonical JSON (sorted keys, no spaces, no duplicates)")
        return ann


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_uplink(u: dict[str, Any]) -> None:
    try:
        if not {"name", "address"} <= set(u) <= _UPLINK_KEYS:
            raise ConfigError("uplinks", sorted(u), f"must have name and address, and only {sorted(_UPLINK_KEYS)}")
        v.endpoint_name("uplinks.name", u["name"])
        v.address("uplinks.address", u["address"])
        if u.get("port") is not None:
            v.integer("uplinks.port", u["port"], 1, 65535)
        if u.get("mtu") is not None:
            v.integer("uplinks.mtu", u["mtu"], 576, 65535)
        if "nat" in u and not isinstance(u["nat"], bool):
            raise ConfigError("uplinks.nat", u["nat"], "is not true or false")
    except ConfigError as e:
        raise AnnouncementRejected("malformed", str(e)) from None


@dataclass(frozen=True)
class SignedAnnouncement:
    body: bytes
    signature: bytes | None
    key: bytes | None  # the signer's public key (which enrolled key to check against)


@dataclass(frozen=True)
class SiteStatus:
    site: str
    status: str        # Active, Degraded, Inactive
    last_seen: float
    announcement: Announcement


class Registry(Protocol):
    def create_token(self, site: str, ttl_s: float = 3600) -> str: ...
    def enroll(self, token: str, site: str, public_key: bytes) -> None: ...
    def publish(self, signed: SignedAnnouncement, now: float | None = None) -> Announcement: ...
    def sites(self, now: float | None = None) -> list[SiteStatus]: ...


def body_text(ann: Announcement) -> str:
    """The announcement's canonical body as text (what registries store)."""
    return ann.to_bytes().decode("ascii")


def verify(signed: SignedAnnouncement, site_of: Callable[[bytes], str | None], now: float,
           max_skew_s: float = MAX_SKEW_S) -> Announcement:
    """The checks every registry makes before it looks at its own state, in
    order: signed at all, sizes and types, the signer's key enrolled
    (``site_of(key)``: the site it is enrolled for, or None), the signature,
    the body (``Announcement.from_bytes``), the key speaking for its own
    site, the timestamp within ``max_skew_s`` of ``now``. Raises
    AnnouncementRejected naming the reason; returns the parsed announcement."""
    body, sig, key = signed.body, signed.signature, signed.key
    if not sig or not key:
        raise AnnouncementRejected("unsigned")
    if not isinstance(body, bytes) or not isinstance(sig, bytes) or not isinstance(key, bytes):
        raise AnnouncementRejected("malformed", "body, signature and key must be bytes")
    if len(body) > MAX_BODY:
        raise AnnouncementRejected("malformed", f"body of {len(body)} bytes, at most {MAX_BODY}")
    site = site_of(key)
    if site is None:
        raise AnnouncementRejected("unknown_key", "the signing key is not enrolled")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, body)
    except (InvalidSignature, ValueError):
        raise AnnouncementRejected("bad_signature", f"for a key of site {site!r}") from None
    ann = Announcement.from_bytes(body)
    if site != ann.site:
        raise AnnouncementRejected("unknown_key", f"a key of site {site!r} cannot speak for {ann.site!r}")
    if not abs(now - ann.ts) <= max_skew_s:
        raise AnnouncementRejected("stale", f"timestamp {now - ann.ts:+.0f} s from now")
    return ann


def authorize(ann: Announcement, allowed: Iterable[str] | None, others: Iterable[tuple[str, Iterable[str]]]) -> None:
    """What a site may announce: never a default route; when ``allowed`` is
    given (the site's subnets in the mesh), only prefixes inside them; never a
    prefix overlapping one of ``others`` ((site, prefixes) another site
    announces now). AnnouncementRejected("unauthorized") naming the prefix.

    >>> a = Announcement.make("br1", wg_public_key="x" * 43 + "=", subnets=["10.1.0.0/25"], uplinks=[])
    >>> authorize(a, ["10.1.0.0/24"], [("hq", ["10.0.0.0/24"])])
    >>> try: authorize(a, ["10.1.0.0/24"], [("hq", ["10.1.0.0/16"])])
    ... except AnnouncementRejected as e: print(e.reason)
    unauthorized
    """
    nets = [ipaddress.ip_network(n) for n in ann.subnets]
    for n in nets:
        if n.prefixlen == 0:
            raise AnnouncementRejected("unauthorized", f"{ann.site!r} announces the default route {n}")
    for i, a in enumerate(nets):   # a site's subnets never overlap each other (Site refuses it too)
        for b in nets[i + 1:]:
            if a.version == b.version and a.overlaps(b):
                raise AnnouncementRejected("unauthorized", f"{ann.site!r} announces {a} and {b}, which overlap")
    if allowed is not None:
        mine = [ipaddress.ip_network(c) for c in allowed]
        for n in nets:
            if not any(n.version == m.version and n.subnet_of(m) for m in mine):  # type: ignore[arg-type]
                raise AnnouncementRejected("unauthorized", f"{ann.site!r} announces {n}, which is not inside "
                                                           f"its subnets in the mesh {[str(m) for m in mine]}")
    for site, prefixes in others:
        try:
            theirs = [ipaddress.ip_network(c) for c in prefixes]
        except (ValueError, TypeError):
            continue
        for n in nets:
            for t in theirs:
                if n.overlaps(t):
                    raise AnnouncementRejected("unauthorized", f"{ann.site!r} announces {n}, which overlaps "
                                                               f"{t} of site {site!r}")


class SqliteRegistry:
    """The registry in the SQLite state file (the same file as the mesh).

    ``inactive_after_s``: a site silent that long is Inactive (its tunnels go
    after ``grace_s`` more); ``degraded`` sites are reported by the caller's
    path health (``mark_degraded``)."""

    def __init__(self, path: str | os.PathLike[str], *, inactive_after_s: float = 15.0, grace_s: float = 30.0,
                 max_skew_s: float = MAX_SKEW_S, create: bool = True) -> None:
        self.store = Store(path, create=create)
        self._db: sqlite3.Connection = self.store._db
        self.inactive_after_s, self.grace_s, self.max_skew_s = inactive_after_s, grace_s, max_skew_s
        self._degraded: set[str] = set()

    def close(self) -> None:
        self.store.close()

    def create_token(self, site: str, ttl_s: float = 3600) -> str:
        """A one-time enrollment token for ``site``, valid ``ttl_s`` seconds
        (stored hashed). Tokens read ``pnt_`` + 32 URL-safe characters: the
        prefix names what they are (and lets secret scanners find them), and
        keeps a token from starting with "-", which a command line such as
        ``patronus agent --token TOKEN`` would take for an option.

        ``site`` must be a valid site name and ``ttl_s`` a finite number of
        seconds in (0, MAX_TOKEN_TTL_S]; ConfigError otherwise."""
        v.endpoint_name("create_token site", site)
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise ConfigError("create_token ttl_s", ttl_s, f"is not a number of seconds in (0, {MAX_TOKEN_TTL_S}]")
        token = "pnt_" + secrets.token_urlsafe(24)
        self._db.execute("INSERT INTO enroll_tokens VALUES (?, ?, ?, NULL)",
                         (_token_hash(token), site, time.time() + ttl_s))
        return token

    def tokens(self) -> list[dict[str, Any]]:
        """Every enrolment token: ``{"site", "expires", "used"}`` (Unix times,
        ``used`` None while unused). Never the token itself (only its hash is stored)."""
        return [{"site": s, "expires": e, "used": u} for s, e, u in
                self._db.execute("SELECT site, expires, used FROM enroll_tokens ORDER BY site, expires")]

    def revoke_tokens(self, site: str) -> int:
        """Delete the unused tokens of ``site``; returns how many there were.
        (Used ones stay as a record; they cannot enroll again anyway.)"""
        cur = self._db.execute("DELETE FROM enroll_tokens WHERE site = ? AND used IS NULL", (site,))
        return cur.rowcount

    def check_token(self, token: str, site: str) -> None:
        """ConfigError unless ``token`` would enroll ``site`` now (it is not
        spent: ``enroll`` spends it)."""
        if not isinstance(token, str) or not isinstance(site, str):
            raise ConfigError("enroll", "<redacted>", "token and site must be strings")
        row = self._db.execute("SELECT site, expires, used FROM enroll_tokens WHERE token_hash = ?",
                               (_token_hash(token),)).fetchone()
        if row is None:
            raise ConfigError("enroll token", "<redacted>", "is not a token of this mesh")
        if row[2] is not None:
            raise ConfigError("enroll token", "<redacted>", "was used already")
        if row[1] < time.time():
            raise ConfigError("enroll token", "<redacted>", "has expired")
        if row[0] != site:
            raise ConfigError("enroll token", "<redacted>", f"is for site {row[0]!r}, not {site!r}")

    def enroll(self, token: str, site: str, public_key: bytes) -> None:
        """Register a site's announcement key with a one-time token;
        ConfigError for a bad token, an invalid key or a key enrolled already."""
        if not isinstance(token, str) or not isinstance(site, str):
            raise ConfigError("enroll", "<redacted>", "token and site must be strings")
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise ConfigError("enroll public_key", repr(public_key)[:80], "is not 32 bytes of an Ed25519 key")
        try:
            Ed25519PublicKey.from_public_bytes(public_key)
        except ValueError:
            raise ConfigError("enroll public_key", public_key.hex(), "is not an Ed25519 public key") from None
        h = _token_hash(token)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            self.check_token(token, site)
            if db.execute("SELECT 1 FROM site_keys WHERE public_key = ?", (public_key,)).fetchone():
                raise ConfigError("enroll public_key", public_key.hex(), "is enrolled already")
            db.execute("UPDATE enroll_tokens SET used = ? WHERE token_hash = ?", (time.time(), h))
            db.execute("INSERT INTO site_keys VALUES (?, ?, ?)", (site, public_key, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def publish(self, signed: SignedAnnouncement, now: float | None = None) -> Announcement:
        """Verify and store an announcement; raises AnnouncementRejected (and
        nothing else): ``verify`` (size, types, the signer's key enrolled,
        the signature, the body, the key's site, the timestamp), then
        ``authorize`` (what the site may announce, module docstring), then
        the nonce. An announcement older than the one stored for its site is
        verified (and its nonce spent) but does not replace it."""
        now = time.time() if now is None else now

        def site_of(key: bytes) -> str | None:
            row = self._db.execute("SELECT site FROM site_keys WHERE public_key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        ann = verify(signed, site_of, now, self.max_skew_s)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._authorize(ann, now)
            try:
                db.execute("INSERT INTO seen_nonces VALUES (?, ?)", (bytes.fromhex(ann.nonce), ann.ts))
            except sqlite3.IntegrityError:
                raise AnnouncementRejected("replayed", f"nonce {ann.nonce[:8]}... seen before") from None
            db.execute("DELETE FROM seen_nonces WHERE ts < ?", (now - 2 * self.max_skew_s,))
            db.execute("INSERT INTO announcements VALUES (?, ?, ?, ?) ON CONFLICT(site) DO UPDATE SET "
                       "body = excluded.body, ts = excluded.ts, received = excluded.received "
                       "WHERE excluded.ts >= announcements.ts",
                       (ann.site, body_text(ann), ann.ts, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return ann

    def _authorize(self, ann: Announcement, now: float) -> None:
        """What a site may announce (see the module docstring)."""
        db = self._db
        mine = None
        if db.execute("SELECT 1 FROM mesh").fetchone() is not None:
            if db.execute("SELECT 1 FROM sites WHERE name = ?", (ann.site,)).fetchone() is None:
                raise AnnouncementRejected("unauthorized", f"{ann.site!r} is not a site of the saved mesh")
            mine = [c for (c,) in db.execute("SELECT cidr FROM site_subnets WHERE site = ?", (ann.site,))]
        cutoff = now - self.inactive_after_s - self.grace_s
        others = []
        for site, other in db.execute("SELECT site, body FROM announcements WHERE site != ? AND received >= ?",
                                      (ann.site, cutoff)).fetchall():
            try:
                others.append((site, list(json.loads(other)["subnets"])))
            except (ValueError, KeyError, TypeError):
                continue
        authorize(ann, mine, others)

    def is_enrolled(self, site: str, public_key: bytes) -> bool:
        """Whether ``public_key`` is enrolled as the announcement key of ``site``."""
        return self._db.execute("SELECT 1 FROM site_keys WHERE public_key = ? AND site = ?",
                                (public_key, site)).fetchone() is not None

    def mesh_sites(self) -> list[str] | None:
        """The site names of the mesh saved in the same state file, in order;
        None when no mesh is saved there (then any site may enroll)."""
        if self._db.execute("SELECT 1 FROM mesh").fetchone() is None:
            return None
        return [r[0] for r in self._db.execute("SELECT name FROM sites ORDER BY position")]

    def mark_degraded(self, site: str, degraded: bool = True) -> None:
        (self._degraded.add if degraded else self._degraded.discard)(site)

    def sites(self, now: float | None = None) -> list[SiteStatus]:
        """Every announced site with its status; sites silent for longer than
        inactive_after_s + grace_s are left out (their tunnels are removed)."""
        now = time.time() if now is None else now
        out = []
        for site, body, received in self._db.execute("SELECT site, body, received FROM announcements ORDER BY site"):
            age = now - received
            if age > self.inactive_after_s + self.grace_s:
                continue
            status = "Inactive" if age > self.inactive_after_s else (
                "Degraded" if site in self._degraded else "Active")
            try:
                ann = Announcement.from_bytes(body.encode("utf-8", "surrogatepass"))
            except AnnouncementRejected as e:  # stored by an older, laxer version: never handed out
                log.warning("stored announcement of site %r is invalid (%s); ignored", site, e)
                continue
            out.append(SiteStatus(site, status, received, ann))
        return out
