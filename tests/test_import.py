"""`import patronus` is fast and needs no root, numpy, BCC or compiled code."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import json, sys, time
before = set(sys.modules)
t = time.perf_counter()
import patronus
dt = time.perf_counter() - t
print(json.dumps({"dt": dt, "new": sorted(set(sys.modules) - before)}))
"""

# What `import patronus` may load besides its own modules: the standard
# library and attrs. Anything else (numpy, BCC, the compiled core, sockets of
# a backend) waits for first use. This is what keeps the import fast (about
# 50 ms here); the time itself is only guarded loosely, a loaded VM varies.
LIGHT = ("patronus", "attr", "attrs", "encodings", "_")


def test_import_is_fast_and_light():
    import json

    runs = []
    for _ in range(3):
        out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout)
        runs.append(out["dt"])
        third_party = [m for m in out["new"] if not m.startswith(LIGHT) and m.split(".")[0] not in
                       sys.stdlib_module_names]
        assert third_party == [], third_party
        assert not {"numpy", "bcc", "patronus._fast", "pyroute2"} & set(out["new"])
    assert min(runs) < 1.0, runs  # a regression guard only: 20 times what it takes


def test_import_without_compiled_extension(tmp_path):
    """The public model works even where the Cython extension is absent."""
    code = (
        "import sys; sys.modules['patronus._fast'] = None\n"
        "import patronus\n"
        "m = patronus.Mesh('x'); print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Mesh"
