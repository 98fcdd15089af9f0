"""Authenticated peer discovery: sites join with an enrollment token and
announce themselves (uplinks, endpoints, WireGuard public key, subnets) in
messages signed with an Ed25519 key the mesh enrolled. An announcement is
rejected, with a named reason, when it is unsigned, signed by a key the
mesh does not know, forged (bad signature), replayed (nonce seen before)
or stale (timestamp too far from now), or malformed.

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
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError, PatronusError
from ..store import Store

__all__ = ["SigningKey", "Announcement", "SignedAnnouncement", "Registry", "SqliteRegistry", "AnnouncementRejected",
           "REJECT_REASONS", "SiteStatus"]

REJECT_REASONS = ("unsigned", "unknown_key", "bad_signature", "replayed", "stale", "malformed")
MAX_SKEW_S = 30.0


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
    """What a site says about itself. ``ts`` and ``nonce`` make each one unique."""

    site: str
    wg_public_key: str
    subnets: tuple[str, ...]
    uplinks: tuple[dict[str, Any], ...]
    ts: float
    nonce: str

    @classmethod
    def make(cls, site: str, *, wg_public_key: str, subnets: list[str], uplinks: list[dict[str, Any]],
             ts: float | None = None) -> Announcement:
        return cls(site, wg_public_key, tuple(subnets), tuple(dict(u) for u in uplinks),
                   time.time() if ts is None else ts, secrets.token_hex(16))

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): what is signed."""
        return json.dumps({"site": self.site, "wg_public_key": self.wg_public_key, "subnets": list(self.subnets),
                           "uplinks": list(self.uplinks), "ts": self.ts, "nonce": self.nonce},
                          sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> Announcement:
        try:
            d = json.loads(body)
            ann = cls(str(d["site"]), str(d["wg_public_key"]), tuple(map(str, d["subnets"])),
                      tuple(dict(u) for u in d["uplinks"]), float(d["ts"]), str(d["nonce"]))
        except (ValueError, KeyError, TypeError) as e:
            raise AnnouncementRejected("malformed", str(e)) from None
        if not ann.site or len(ann.nonce) < 16:
            raise AnnouncementRejected("malformed", "empty site or short nonce")
        return ann


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


class SqliteRegistry:
    """The registry in the SQLite state file (the same file as the mesh).

    ``inactive_after_s``: a site silent that long is Inactive (its tunnels go
    after ``grace_s`` more); ``degraded`` sites are reported by the caller's
    path health (``mark_degraded``)."""

    def __init__(self, path: str | os.PathLike[str], *, inactive_after_s: float = 15.0, grace_s: float = 30.0,
                 max_skew_s: float = MAX_SKEW_S) -> None:
        self.store = Store(path)
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
        ``patronus agent --token TOKEN`` would take for an option."""
        token = "pnt_" + secrets.token_urlsafe(24)
        self._db.execute("INSERT INTO enroll_tokens VALUES (?, ?, ?, NULL)",
                         (hashlib.sha256(token.encode()).digest(), site, time.time() + ttl_s))
        return token

    def enroll(self, token: str, site: str, public_key: bytes) -> None:
        """Register a site's announcement key with a one-time token."""
        h = hashlib.sha256(token.encode()).digest()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT site, expires, used FROM enroll_tokens WHERE token_hash = ?", (h,)).fetchone()
            if row is None:
                raise ConfigError("enroll token", "<redacted>", "is not a token of this mesh")
            if row[2] is not None:
                raise ConfigError("enroll token", "<redacted>", "was used already")
            if row[1] < time.time():
                raise ConfigError("enroll token", "<redacted>", "has expired")
            if row[0] != site:
                raise ConfigError("enroll token", "<redacted>", f"is for site {row[0]!r}, not {site!r}")
            Ed25519PublicKey.from_public_bytes(public_key)  # a valid key, or ValueError
            db.execute("UPDATE enroll_tokens SET used = ? WHERE token_hash = ?", (time.time(), h))
            db.execute("INSERT INTO site_keys VALUES (?, ?, ?)", (site, public_key, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def publish(self, signed: SignedAnnouncement, now: float | None = None) -> Announcement:
        """Verify and store an announcement; raises AnnouncementRejected."""
        now = time.time() if now is None else now
        if not signed.signature or not signed.key:
            raise AnnouncementRejected("unsigned")
        ann = Announcement.from_bytes(signed.body)
        row = self._db.execute("SELECT site FROM site_keys WHERE public_key = ?", (signed.key,)).fetchone()
        if row is None or row[0] != ann.site:
            raise AnnouncementRejected("unknown_key", f"no key of site {ann.site!r} signed this")
        try:
            Ed25519PublicKey.from_public_bytes(signed.key).verify(signed.signature, signed.body)
        except (InvalidSignature, ValueError):
            raise AnnouncementRejected("bad_signature", f"for site {ann.site!r}") from None
        if abs(now - ann.ts) > self.max_skew_s:
            raise AnnouncementRejected("stale", f"timestamp {now - ann.ts:+.0f} s from now")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            try:
                db.execute("INSERT INTO seen_nonces VALUES (?, ?)", (bytes.fromhex(ann.nonce), ann.ts))
            except (sqlite3.IntegrityError, ValueError):
                raise AnnouncementRejected("replayed", f"nonce {ann.nonce[:8]}... seen before") from None
            db.execute("DELETE FROM seen_nonces WHERE ts < ?", (now - 2 * self.max_skew_s,))
            db.execute("INSERT INTO announcements VALUES (?, ?, ?, ?) ON CONFLICT(site) DO UPDATE SET "
                       "body = excluded.body, ts = excluded.ts, received = excluded.received",
                       (ann.site, signed.body.decode(), ann.ts, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return ann

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
            out.append(SiteStatus(site, status, received, Announcement.from_bytes(body.encode())))
        return out
