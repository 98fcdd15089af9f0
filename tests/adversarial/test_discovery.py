"""Adversarial review of peer discovery: every field of an announcement is
checked at the trust boundary, the signature is checked before the body is
parsed, errors are the module's own, the newest announcement wins, and the
enrolment API refuses bad input by name."""

from __future__ import annotations

import json
import math
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus import Mesh, Site, Uplink, save_mesh
from patronus.errors import ConfigError, PatronusError
from patronus.wireguard import discovery
from patronus.wireguard.discovery import (REJECT_REASONS, Announcement, AnnouncementRejected,
                                          SignedAnnouncement, SigningKey, SqliteRegistry)
from patronus.wireguard.keys import PrivateKey

from ..test_discovery import enrolled

MAX_BODY = getattr(discovery, "MAX_BODY", 65536)
WG = PrivateKey.generate().public_key().base64


@pytest.fixture
def reg(tmp_path):
    r = SqliteRegistry(tmp_path / "state.db")
    yield r
    r.close()




def body(**over):
    d = {"site": "br", "wg_public_key": WG, "subnets": ["10.9.0.0/24"],
         "uplinks": [{"name": "isp", "address": "203.0.113.9", "port": None}],
         "ts": time.time(), "nonce": "ab" * 16}
    d.update(over)
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def raw_signed(key, b):
    return SignedAnnouncement(b, key._key.sign(b), key.public_bytes)


def reason(reg, signed, now=None):
    with pytest.raises(AnnouncementRejected) as e:
        reg.publish(signed, now)
    assert e.value.reason in REJECT_REASONS
    return e.value.reason


# -- defect 1: every field validated; what a site may announce ------------------------------

@pytest.mark.parametrize("over", [
    {"wg_public_key": "not a key"}, {"wg_public_key": "k" * 10}, {"wg_public_key": 7},
    {"subnets": ["garbage"]}, {"subnets": "10.9.0.0/24"}, {"subnets": [None]}, {"subnets": ["10.9.0.1/24"]},
    {"uplinks": [{"name": "isp", "address": "not-an-ip"}]}, {"uplinks": ["x"]},
    {"uplinks": [{"name": "isp", "address": "203.0.113.9", "port": 70000}]},
    {"uplinks": [{"name": "isp", "address": "203.0.113.9", "evil": 1}]},
    {"site": ""}, {"site": 5}, {"site": "a b"},
])
def test_signed_garbage_fields_are_malformed(reg, over):
    key = enrolled(reg, "br")
    assert reason(reg, raw_signed(key, body(**over))) in ("malformed", "unknown_key")
    assert reg.sites() == []


@pytest.mark.parametrize("net", ["0.0.0.0/0", "::/0"])
def test_default_route_is_never_announced(reg, net):
    key = enrolled(reg)
    assert reason(reg, raw_signed(key, body(subnets=[net]))) == "unauthorized"


def test_subnets_may_not_overlap_another_sites(reg):
    a, b = enrolled(reg, "br"), enrolled(reg, "hq")
    reg.publish(raw_signed(a, body(subnets=["10.9.0.0/24"])))
    assert reason(reg, raw_signed(b, body(site="hq", nonce="cd" * 16, subnets=["10.9.0.128/25"]))) == "unauthorized"
    assert reason(reg, raw_signed(b, body(site="hq", nonce="ce" * 16, subnets=["10.0.0.0/8"]))) == "unauthorized"
    reg.publish(raw_signed(b, body(site="hq", nonce="cf" * 16, subnets=["10.10.0.0/24"])))


def test_with_a_mesh_a_site_announces_only_its_configured_subnets(tmp_path):
    path = tmp_path / "state.db"
    mesh = Mesh("m")
    mesh.add_site(Site("br", subnets=["10.9.0.0/24"], uplinks=[Uplink("isp", "203.0.113.9")]))
    mesh.add_site(Site("hq", subnets=["10.1.0.0/16"], uplinks=[Uplink("isp", "203.0.113.1")]))
    save_mesh(mesh, path)
    reg = SqliteRegistry(path)
    try:
        key = enrolled(reg, "br")
        reg.publish(raw_signed(key, body(subnets=["10.9.0.0/24"])))
        assert reason(reg, raw_signed(key, body(nonce="11" * 16, subnets=["10.1.0.0/24"]))) == "unauthorized"
        assert reason(reg, raw_signed(key, body(nonce="12" * 16, subnets=["10.8.0.0/16"]))) == "unauthorized"
        stranger = enrolled(reg, "s9")  # enrolled, but not a site of the saved mesh
        assert reason(reg, raw_signed(stranger, body(site="s9", nonce="13" * 16, subnets=[]))) == "unauthorized"
    finally:
        reg.close()


def test_sites_skips_a_stored_body_that_no_longer_validates(reg):
    key = enrolled(reg)
    reg.publish(raw_signed(key, body()))
    reg._db.execute("UPDATE announcements SET body = ?", (body(wg_public_key="junk").decode(),))
    assert reg.sites() == []


# -- defect 2: bounded, signature first, named errors --------------------------------------------

@pytest.mark.parametrize("bad", [
    b"[" * 100000, b"[" * 60000, body(ts=10 ** 400), body().decode().encode("utf-16"), b"\xff\xfe{",
    body().replace(b'"ts":', b'"ts":NaN,"x":'), b'{"site":"br","site":"hq"}',
])
def test_hostile_bodies_from_an_enrolled_key_are_named(reg, bad):
    key = enrolled(reg)
    assert reason(reg, raw_signed(key, bad)) == "malformed"


def test_oversize_body_rejected_before_anything(reg):
    key = enrolled(reg)
    assert reason(reg, SignedAnnouncement(b" " * (MAX_BODY + 1), b"x" * 64, key.public_bytes)) == "malformed"


def test_signature_checked_before_parsing(reg):
    key = enrolled(reg)
    # an unparseable body with a bad signature is a bad signature, not a parse error
    assert reason(reg, SignedAnnouncement(b"[" * 100000 if False else b"[" * 1000, b"x" * 64,
                                          key.public_bytes)) == "bad_signature"
    assert reason(reg, SignedAnnouncement(body(ts=10 ** 400), b"x" * 64, key.public_bytes)) == "bad_signature"
    assert reason(reg, SignedAnnouncement(b"[" * 1000, b"x" * 64, SigningKey.generate().public_bytes)) == \
        "unknown_key"


def test_non_bytes_fields_are_named(reg):
    key = enrolled(reg)
    assert reason(reg, SignedAnnouncement("text", b"x" * 64, key.public_bytes)) == "malformed"  # type: ignore
    assert reason(reg, SignedAnnouncement(body(), "sig", key.public_bytes)) in ("malformed", "bad_signature")


# -- defect 3: the newest announcement wins ---------------------------------------------------

def test_an_older_announcement_does_not_replace_a_newer_one(reg):
    key = enrolled(reg)
    now = 1_000_000.0
    new = Announcement.make("br", wg_public_key=WG, subnets=["10.9.0.0/24"], uplinks=[], ts=now)
    old = Announcement.make("br", wg_public_key=WG, subnets=["10.7.0.0/24"], uplinks=[], ts=now - 5)
    reg.publish(key.sign(new), now=now)
    reg.publish(key.sign(old), now=now)
    assert [s.announcement.subnets for s in reg.sites(now=now)] == [("10.9.0.0/24",)]


# -- defect 5: enrolment and token errors are named ---------------------------------------------

def test_duplicate_and_invalid_keys_are_config_errors(reg):
    key = enrolled(reg)
    with pytest.raises(ConfigError, match="enrolled already"):
        reg.enroll(reg.create_token("br"), "br", key.public_bytes)
    with pytest.raises(ConfigError):
        reg.enroll(reg.create_token("br"), "br", b"short")
    with pytest.raises(ConfigError):
        reg.enroll(reg.create_token("br"), "br", "not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [math.nan, math.inf, -math.inf, 0, -1, "60", True, 10 ** 9])
def test_bad_token_ttls_are_config_errors(reg, ttl):
    with pytest.raises(ConfigError):
        reg.create_token("br", ttl_s=ttl)


@pytest.mark.parametrize("site", ["", None, "a b", "x" * 100])
def test_bad_token_sites_are_config_errors(reg, site):
    with pytest.raises(ConfigError):
        reg.create_token(site)


@pytest.mark.parametrize("over", [{"ts": "NaN"}, {"nonce": "zz" * 16}, {"nonce": "ab" * 8}, {"nonce": 5},
                                  {"ts": True}, {"ts": "1"}])
def test_nan_ts_and_non_hex_nonce_are_malformed_not_replayed(reg, over):
    key = enrolled(reg)
    b = body(**over)
    if over.get("ts") == "NaN":
        b = b.replace(b'"ts":"NaN"', b'"ts":NaN')
    assert reason(reg, raw_signed(key, b)) == "malformed"


def test_token_list_and_revoke(reg):
    t1 = reg.create_token("br")
    reg.create_token("br")
    reg.create_token("hq")
    reg.enroll(t1, "br", SigningKey.generate().public_bytes)
    rows = reg.tokens()
    assert sorted((r["site"], r["used"] is not None) for r in rows) == [("br", False), ("br", True), ("hq", False)]
    assert all(set(r) == {"site", "expires", "used"} for r in rows)
    assert reg.revoke_tokens("br") == 1
    assert sorted(r["site"] for r in reg.tokens()) == ["br", "hq"]
    assert reg.revoke_tokens("nobody") == 0


# -- defect 9: fuzz the publish path ------------------------------------------------------------

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


def _publish_or_named(reg, signed):
    try:
        reg.publish(signed)
    except AnnouncementRejected as e:
        assert e.reason in REJECT_REASONS
    for s in reg.sites():  # whatever got in reads back
        assert isinstance(s.announcement, Announcement)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@FUZZ
@given(data=st.data())
def test_fuzz_signed_bodies_from_an_enrolled_key(tmp_path_factory, data):
    reg = SqliteRegistry(tmp_path_factory.mktemp("f") / "s.db")
    try:
        key = enrolled(reg)
        now = float(int(time.time())) + 0.5  # a body of the same length on every run (hypothesis replays)
        choice = data.draw(st.sampled_from(["random", "fields", "mutate"]))
        if choice == "random":
            b = data.draw(st.binary(max_size=400))
        elif choice == "fields":
            d = json.loads(body(ts=now))
            field = data.draw(st.sampled_from(sorted(d)))
            d[field] = data.draw(json_values)
            b = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
        else:
            b = bytearray(body(ts=now))
            for _ in range(data.draw(st.integers(1, 4))):
                i = data.draw(st.integers(0, len(b) - 1))
                b[i] = data.draw(st.integers(0, 255))
            b = bytes(b)
        _publish_or_named(reg, raw_signed(key, b))
    finally:
        reg.close()


@FUZZ
@given(st.binary(max_size=300), st.one_of(st.none(), st.binary(max_size=80)), st.booleans())
def test_fuzz_unsigned_and_forged(tmp_path_factory, b, sig, known):
    reg = SqliteRegistry(tmp_path_factory.mktemp("g") / "s.db")
    try:
        key = enrolled(reg)
        _publish_or_named(reg, SignedAnnouncement(b, sig, key.public_bytes if known else b"k" * 32))
    finally:
        reg.close()


@FUZZ
@given(st.integers(0, 200), st.integers(0, 255))
def test_fuzz_mutated_signature(tmp_path_factory, i, v):
    reg = SqliteRegistry(tmp_path_factory.mktemp("h") / "s.db")
    try:
        key = enrolled(reg)
        good = key.sign(Announcement.make("br", wg_public_key=WG, subnets=["10.9.0.0/24"], uplinks=[]))
        sig = bytearray(good.signature)
        sig[i % 64] ^= v or 1
        _publish_or_named(reg, SignedAnnouncement(good.body, bytes(sig), good.key))
        assert reg.sites() == []
    finally:
        reg.close()


def test_rejections_are_patronus_errors():
    assert issubclass(AnnouncementRejected, PatronusError)
    assert "unauthorized" in REJECT_REASONS
    assert sqlite3  # the module must not leak sqlite3 errors (tested above)
