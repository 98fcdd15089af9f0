"""The private _fast.Classifier guards its inputs: a bad cache size or a rule
array of the wrong layout is a ValueError, never a crash or heap damage.
Each case runs in a child process, so a crash fails the test instead of
killing the run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import numpy as np
from patronus import _fast, abi, packets, Match, Policy
from patronus.policy import compile_rules
rules = compile_rules([Policy("dns", Match(proto="udp", dst_ports=53), priority=1)])
frame = packets.udp("10.0.0.1", "10.0.0.2", 1234, 53)
def hammer(c):
    # many distinct flows through the cache: any overrun shows up here or at exit
    fs = [packets.udp("10.0.0.1", "10.0.%d.%d" % (i // 250, i % 250), 1000 + i, 53) for i in range(4000)]
    out = np.zeros(len(fs), np.int32)
    for mode in (0, 0, 1, 2):
        c.classify_list(fs, out, mode)
        assert (out == 0).all(), out
"""


def run(body: str) -> subprocess.CompletedProcess:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONMALLOC": "debug", "MALLOC_CHECK_": "3", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("size", [0, 1, 3, 6, 100, -1, -2, 2**32, 2**32 + 2, 2**64, True, 2.0, "4", None])
def test_bad_cache_sizes_are_value_errors(size):
    r = run(f"""
    try:
        c = _fast.Classifier(rules, {size!r})
    except ValueError as e:
        print("ValueError", e)
    else:
        print("accepted", flush=True)
        hammer(c)
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ValueError") and "cache" in r.stdout, r.stdout


@pytest.mark.parametrize("size", [2, 4, 1024, 1 << 17])
def test_good_cache_sizes_classify(size):
    r = run(f"""
    c = _fast.Classifier(rules, {size})
    hammer(c)
    del c
    print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("bad", [
    "np.zeros(3, np.uint8)",
    "np.zeros(4, np.int64)",
    "np.zeros(2, np.dtype([('x', 'u1', (rules.dtype.itemsize,))]))",   # right size, wrong fields
    "np.zeros((2, 2), abi.RULE_DTYPE)",
    "rules.view(np.uint8)",
    "[1, 2, 3]",
    "b'x' * 48",
    "np.zeros(1, np.dtype([('src', 'u1', (16,))]))",
])
def test_rules_of_the_wrong_layout_are_value_errors(bad):
    r = run(f"""
    try:
        _fast.Classifier({bad}, 1024)
    except ValueError as e:
        print("ValueError", e)
    else:
        print("accepted")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ValueError") and "rules" in r.stdout, r.stdout


def test_empty_and_real_rule_tables_still_work():
    r = run("""
    _fast.Classifier(np.zeros(0, abi.RULE_DTYPE), 2)
    c = _fast.Classifier(rules)
    hammer(c)
    print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
