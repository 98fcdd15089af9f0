"""wg config parsing: MTU 0 and odd endpoints are named errors, and any text
either parses (and then round-trips through render) or raises ConfigError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patronus.errors import ConfigError
from patronus.wireguard.config import InterfaceConfig, PeerConfig, parse, parse_endpoint, render, render_quick
from patronus.wireguard.keys import PresharedKey, PrivateKey

K = PrivateKey.generate()
P1, P2 = PrivateKey.generate().public_key(), PrivateKey.generate().public_key()
VALID = render_quick(InterfaceConfig(K, listen_port=51820, fwmark=0x5001, mtu=1420, addresses=("10.0.0.1/31",),
                                     peers=(PeerConfig(P1, endpoint="192.0.2.7:51821", allowed_ips=("10.2.0.0/24",),
                                                       persistent_keepalive=25, preshared_key=PresharedKey.generate()),
                                            PeerConfig(P2, endpoint="[2001:db8::1]:51822",
                                                       allowed_ips=("fd00::/64",)))))


@pytest.mark.parametrize("mtu", ["0", "67", "65536", "-1"])
def test_bad_mtu_is_a_config_error(mtu):
    with pytest.raises(ConfigError):
        parse(f"[Interface]\nPrivateKey = {K.base64}\nMTU = {mtu}\n")


def test_mtu_zero_refused_by_the_model_too():
    with pytest.raises(ConfigError):
        InterfaceConfig(K, mtu=0)


def test_mtu_round_trips():
    cfg = parse(f"[Interface]\nPrivateKey = {K.base64}\nMTU = 1280\n")
    assert parse(render_quick(cfg)) == cfg and cfg.mtu == 1280


@pytest.mark.parametrize("ep", ["1.2.3.4:+80", "1.2.3.4:8_0", "::1:80", "1.2.3.4: 80", "1.2.3.4:٨٠", "1.2.3.4:080x",
                                "[1.2.3.4]:80", "1.2.3.4:", ":80", "[::1]80", "1.2.3.4:0", "1.2.3.4:-1"])
def test_bad_endpoints_are_config_errors(ep):
    with pytest.raises(ConfigError):
        parse_endpoint(ep)


@pytest.mark.parametrize("ep,want", [("1.2.3.4:80", ("1.2.3.4", 80)), ("[::1]:80", ("::1", 80)),
                                     ("[2001:db8::1]:51820", ("2001:db8::1", 51820))])
def test_good_endpoints(ep, want):
    assert parse_endpoint(ep) == want


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_or_named(text):
    try:
        cfg = parse(text)
    except ConfigError:
        return
    assert parse(render_quick(cfg)) == cfg
    assert parse(render(cfg)) == cfg.without_quick()


@FUZZ
@given(st.text(max_size=400))
def test_fuzz_random_text(text):
    _parse_or_named(text)


@FUZZ
@given(st.lists(st.sampled_from(list("[]=#:,./ \n0123456789abcdefxABCDEF+-_") +
                                        ["Interface", "Peer", "PrivateKey", "PublicKey", "MTU", "Endpoint",
                                         "AllowedIPs", "ListenPort", "FwMark", "Address", "PersistentKeepalive",
                                         K.base64, P1.base64]), max_size=60).map("".join))
def test_fuzz_config_shaped_text(text):
    _parse_or_named(f"[Interface]\nPrivateKey = {K.base64}\n" + text)


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_config(data):
    lines = VALID.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "edit", "value"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "edit" and lines[i]:
            j = data.draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:j] + data.draw(st.text(max_size=3)) + lines[i][j + 1:]
        elif op == "value" and "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + data.draw(st.text(max_size=30))
        if not lines:
            break
    _parse_or_named("\n".join(lines) + "\n")
