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
                                               ("pn_meta", abi.META_DTYPE)])
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
