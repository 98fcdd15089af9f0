"""`import patronus` is fast and needs no root, numpy, BCC or compiled code."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys, time
t = time.perf_counter()
import patronus
dt = time.perf_counter() - t
heavy = sorted(m for m in ("numpy", "bcc", "patronus._fast", "pyroute2") if m in sys.modules)
print(dt, ",".join(heavy))
"""


def test_import_is_fast_and_light():
    runs = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
        dt, heavy = out.split(" ", 1)
        runs.append(float(dt))
        assert heavy.strip() == ""
    assert min(runs) < 0.150, runs


def test_import_without_compiled_extension(tmp_path):
    """The public model works even where the Cython extension is absent."""
    code = (
        "import sys; sys.modules['patronus._fast'] = None\n"
        "import patronus\n"
        "m = patronus.Mesh('x'); print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Mesh"
