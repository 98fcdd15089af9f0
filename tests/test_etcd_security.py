"""The etcd store's TLS and authentication options against a real etcd
(Debian's etcd-server): a cluster that demands client certificates of its
own CA, then etcd authentication turned on. The store works with the right
credentials and names the problem without them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from patronus.controller.etcd import EtcdDB
from patronus.controller.server import ETCD_PASSWORD_ENV, StoreConfig
from patronus.controller.tables import StoreUnavailable
from patronus.errors import ConfigError, StateError

from .etcd_cluster import EtcdCluster, missing


@pytest.fixture(scope="module")
def secure(tmp_path_factory: Any) -> Iterator[EtcdCluster]:
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    with EtcdCluster(tmp_path_factory.mktemp("etcd-tls"), 1, tls=True) as c:
        yield c


def test_tls_with_a_client_certificate(secure: EtcdCluster, tmp_path: Path) -> None:
    db = EtcdDB(secure.url + "/tls", local=tmp_path / "a.db", ca=str(secure.ca), cert=str(secure.client_cert),
                key=str(secure.client_key), timeout=5)
    try:
        with db.transaction() as t:
            t.insert("revoked_jti", {"jti": "j", "expires": 1.0})
        with db.reading() as t:
            assert t.get("revoked_jti", "j") == {"jti": "j", "expires": 1.0}
    finally:
        db.close()
    # no client certificate: refused, and the error says it is TLS
    with pytest.raises(StoreUnavailable, match="(?i)ssl|tls|certificate"):
        EtcdDB(secure.url + "/tls", local=tmp_path / "b.db", ca=str(secure.ca), timeout=5)
    # a CA that did not sign the member's certificate: refused the same way
    with pytest.raises(StoreUnavailable, match="(?i)ssl|certificate"):
        EtcdDB(secure.url + "/tls", local=tmp_path / "c.db", timeout=5, cert=str(secure.client_cert),
               key=str(secure.client_key))


def test_etcd_authentication(secure: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secure.etcdctl("user", "add", "root:rootpass-123")
    secure.etcdctl("auth", "enable")
    try:
        tls = {"ca": str(secure.ca), "cert": str(secure.client_cert), "key": str(secure.client_key)}
        db = EtcdDB(secure.url + "/auth", local=tmp_path / "a.db", user="root", password="rootpass-123",
                    timeout=5, **tls)
        try:
            with db.transaction() as t:
                t.insert("revoked_jti", {"jti": "j", "expires": 1.0})
            db.audit("me", "x.do", "y")
            assert [r["action"] for r in db.audit_log()] == ["x.do"]
        finally:
            db.close()
        with pytest.raises(StateError, match="authentication failed") as e:
            EtcdDB(secure.url + "/auth", local=tmp_path / "b.db", user="root", password="wrong-password",
                   timeout=5, **tls)
        assert "wrong-password" not in str(e.value)
        # the controller's way: the password from the environment, never from a file of ours
        monkeypatch.setenv(ETCD_PASSWORD_ENV, "rootpass-123")
        cfg = StoreConfig(secure.url + "/auth", user="root", **tls)
        (tmp_path / "ctl").mkdir()
        db = cfg.open(tmp_path / "ctl")
        try:
            with db.reading() as t:
                assert t.get("revoked_jti", "j") == {"jti": "j", "expires": 1.0}   # the same store
        finally:
            db.close()
        assert "password" not in cfg.to_dict()
    finally:
        secure.etcdctl("--user", "root:rootpass-123", "auth", "disable")


def test_store_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--store"):
        StoreConfig("etcd://nohost")
    with pytest.raises(ConfigError, match="--etcd-ca"):
        StoreConfig("etcds://127.0.0.1:2379", ca=str(tmp_path / "missing.pem"))
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="--etcd-key"):
        StoreConfig("etcds://127.0.0.1:2379", cert=str(tmp_path / "c.pem"))
