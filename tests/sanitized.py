"""Build a C test harness from csrc/ with AddressSanitizer and UBSan.

A toolchain without sanitizer runtimes (e.g. clang lacking compiler-rt)
still gets a plain build, so every functional check runs; the C must build
without warnings either way."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def san_env(leaks: bool = False) -> dict[str, str]:
    """The environment a sanitized harness runs in: a report fails the run."""
    return {**os.environ, "ASAN_OPTIONS": f"detect_leaks={int(leaks)}:abort_on_error=0:exitcode=86",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def build(out: Path, sources: list[str]) -> Path:
    """Compile ``sources`` (paths relative to the repository) into ``out``."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    cmd = [cc, "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-I", "csrc", *sources, "-o", str(out)]
    proc = subprocess.run(cmd + ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        plain = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert plain.returncode == 0, plain.stderr
    return out
