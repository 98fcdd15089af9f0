"""Where the C sources the XDP backend compiles at run time are: bpf/ (the
programs) and csrc/ (the headers and C they include, shared with the Cython
extension).

Three places are looked at, in this order:

1. ``$PATRONUS_SRC``: a directory holding ``bpf/`` and ``csrc/`` (a checkout),
   for running an installed patronus against other sources;
2. the package data of an installed copy, ``patronus/_src/{bpf,csrc}``
   (setup.py's build_py copies them into every wheel);
3. the checkout this module lies in (``patronus/../bpf``, ``../csrc``), for
   an in-tree or editable install.

>>> bpf, csrc = source_dirs()   # doctest: +SKIP
>>> sorted(p.name for p in bpf.glob("*.c"))   # doctest: +SKIP
['patronus_tc.c', 'patronus_xdp.c']
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DataplaneUnavailable

__all__ = ["source_dirs", "ENV", "PROGRAMS", "PACKAGE_DATA"]

ENV = "PATRONUS_SRC"
PROGRAMS = ("patronus_xdp.c", "patronus_tc.c")  # bpf/ programs the XDP backend loads
PACKAGE_DATA = Path(__file__).resolve().parent / "_src"  # laid out by setup.py's build_py
CHECKOUT = Path(__file__).resolve().parent.parent

_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.M)


def _missing(bpf: Path, csrc: Path) -> list[str]:
    """The files of ``bpf``/``csrc`` the programs need that are absent: each
    program and, transitively, every ``#include "..."`` (looked up in the
    including file's directory, then bpf/ and csrc/, as the -I flags do)."""
    missing: list[str] = []
    seen: set[Path] = set()
    todo = [bpf / name for name in PROGRAMS]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        try:
            text = f.read_bytes()
        except OSError:
            missing.append(str(f))
            continue
        for inc in _INCLUDE.findall(text):
            name = inc.decode(errors="replace")
            cands = [f.parent / name, bpf / name, csrc / name]
            todo.append(next((c for c in cands if c.is_file()), csrc / name))
    return sorted(set(missing))


def source_dirs() -> tuple[Path, Path]:
    """(bpf dir, csrc dir) of the sources the XDP backend compiles.

    Raises ``DataplaneUnavailable`` naming the missing files and where they
    were looked for."""
    env = os.environ.get(ENV)
    if env:
        base = Path(env)
        bpf, csrc = base / "bpf", base / "csrc"
        gone = _missing(bpf, csrc)
        if gone:
            raise DataplaneUnavailable(f"${ENV}={env} lacks the XDP sources {', '.join(gone)}",
                                       f"point ${ENV} at a patronus checkout (holding bpf/ and csrc/), "
                                       f"or unset it to use the installed copy's")
        return bpf, csrc
    tried: list[str] = []
    for base in (PACKAGE_DATA, CHECKOUT):
        bpf, csrc = base / "bpf", base / "csrc"
        if not bpf.is_dir() and not csrc.is_dir():
            tried.append(f"{base}: no bpf/ or csrc/")
            continue
        gone = _missing(bpf, csrc)
        if not gone:
            return bpf, csrc
        tried.append(f"{base}: missing {', '.join(gone)}")
    raise DataplaneUnavailable("the XDP sources (bpf/*.c and the csrc/ headers they include) are not found ("
                               + "; ".join(tried) + ")",
                               f"reinstall patronus from a complete wheel or sdist, or set ${ENV} "
                               f"to a patronus checkout")
