"""The numpy dtypes in patronus.abi against the compiled csrc/patronus_abi.h."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from patronus import _fast, abi

HEADER = Path(__file__).parent.parent / "csrc" / "patronus_abi.h"


@pytest.mark.parametrize(("struct", "dtype"), [("pn_rule", abi.RULE_DTYPE),
                                               ("pn_policy_counter", abi.POLICY_COUNTER_DTYPE),
                                               ("pn_xslot", abi.XSLOT_DTYPE),
                                               ("pn_bucket", abi.BUCKET_DTYPE),
                                               ("pn_site_prefix", abi.SITE_PREFIX_DTYPE),
                                               ("pn_route", abi.ROUTE_DTYPE),
                                               ("pn_rate", abi.RATE_DTYPE),
                                               ("pn_meta", abi.META_DTYPE),
                                               ("pn_cfg", abi.CFG_DTYPE),
                                               ("pn_lut", abi.LUT_DTYPE),
                                               ("pn_lpm6", abi.LPM6_DTYPE),
                                               ("pn_v4chunk", abi.V4CHUNK_DTYPE),
                                               ("pn_chunk", abi.CHUNK_DTYPE),
                                               ("pn_row", abi.row_dtype(abi.CONSTANTS["LAYOUT_NSUM"]))])
def test_dtype_matches_struct(struct, dtype):
    layout = _fast.abi_layout()[struct]
    assert dtype.itemsize == layout.pop("size")
    for field, (off, size) in layout.items():
        assert dtype.fields[field][1] == off, field
        assert dtype.fields[field][0].itemsize == size, field


def test_flow_dtype_is_key_then_record():
    lay = _fast.abi_layout()
    assert abi.FLOW_DTYPE.itemsize == lay["pn_flow"]["size"]
    key_off = lay["pn_flow"]["key"][0]
    rec_off = lay["pn_flow"]["rec"][0]
    for struct, base in (("pn_flow_key", key_off), ("pn_flow_rec", rec_off)):
        fields = dict(lay[struct])
        fields.pop("size")
        for field, (off, size) in fields.items():
            dt, got = abi.FLOW_DTYPE.fields[field][:2]
            assert got == base + off, field
            assert dt.itemsize == size, field


def test_reason_names_follow_the_enum():
    names = re.findall(r"PN_ERR_(\w+) = (\d+)", HEADER.read_text())
    assert [n.lower() for n, _ in names] == list(abi.MALFORMED_REASONS)
    assert [int(i) for _, i in names] == list(range(1, len(names) + 1))
    assert _fast.NREASONS == len(abi.MALFORMED_REASONS) + 1


def test_every_struct_of_the_header_is_checked():
    """A struct added to patronus_abi.h without a dtype here fails."""
    declared = set(re.findall(r"^struct (pn_\w+) \{", HEADER.read_text(), re.M))
    checked = {"pn_rule", "pn_policy_counter", "pn_xslot", "pn_bucket", "pn_site_prefix", "pn_route", "pn_rate", "pn_meta",
               "pn_cfg", "pn_lut", "pn_lpm6", "pn_v4chunk", "pn_chunk", "pn_row", "pn_flow", "pn_flow_key",
               "pn_flow_rec", "pn_rpol"}
    # pn_parsed is the parser's output inside C and Cython; Python never reads it
    assert declared - {"pn_parsed"} == checked
    assert declared - {"pn_parsed"} <= set(_fast.abi_layout())


def test_rule_policy_array_is_plain_int32():
    lay = _fast.abi_layout()["pn_rpol"]
    assert lay["size"] == lay["policy"][1] == 4 * abi.CONSTANTS["LAYOUT_RULES"]


def test_stat_names_follow_the_enum():
    names = re.findall(r"PN_ST_(\w+) = (\d+)", HEADER.read_text())
    assert [int(i) for _, i in names] == list(range(len(abi.STATS)))
    assert len(abi.STATS) == abi.CONSTANTS["NSTATS"]


def test_constants_come_from_the_header():
    text = HEADER.read_text()
    for name, value in abi.CONSTANTS.items():
        if name.startswith("LAYOUT_"):
            continue
        m = re.search(rf"#define PN_{name}\s+(\S+)|PN_{name} = (\d+)", text)
        assert m, name
    assert abi.NO_PATH == 0xFFFFFFFF and abi.CONSTANTS["TX_SLOTS"] == 256
