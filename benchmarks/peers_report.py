"""The peer benchmarks (benchmarks/test_bench_peers_*.py) as one table.

Reads the JSON lines they append to $PATRONUS_PEERS_OUT (default
.bench-peers/results.jsonl): one line per (group, case, peer) with
``patronus`` and ``peer_value`` in ``unit``, ``ratio`` = patronus cost / peer
cost (lower is better; the median of the paired runs) with ``ratio_min`` and
``ratio_max``, the ``goal`` and whether it was ``met``.

    .venv/bin/python benchmarks/peers_report.py              # a plain text table
    .venv/bin/python benchmarks/peers_report.py --markdown   # the table for docs/PERFORMANCE.md
    .venv/bin/python benchmarks/peers_report.py FILE.jsonl   # another results file
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = Path(os.environ.get("PATRONUS_PEERS_OUT", ROOT / ".bench-peers" / "results.jsonl"))
HEADER = ("group", "case", "patronus", "peer", "peer value", "ratio median [min-max]", "goal", "met")


def load(path: Path) -> list[dict]:
    recs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except ValueError:
            print(f"{path}:{n}: not JSON, skipped", file=sys.stderr)
    return recs


def _num(v: float) -> str:
    if v is None:
        return "?"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _value(r: dict, key: str, runs_key: str) -> str:
    """A value with its unit, and the spread of the runs when they are given."""
    s = f"{_num(r.get(key))} {r.get('unit', '')}".strip()
    runs = r.get("runs")
    if isinstance(runs, list) and runs and all(isinstance(x, dict) and runs_key in x for x in runs):
        vals = [x[runs_key] for x in runs]
        if max(vals) != min(vals):
            s += f" ({_num(min(vals))}-{_num(max(vals))})"
    return s


def _met(v) -> str:
    return "met" if v is True else "not met" if v is False else "n/a"


def rows(recs: list[dict]) -> list[tuple[str, ...]]:
    # groups in the order they first appear, cases within a group likewise
    order: dict[str, int] = {}
    for r in recs:
        order.setdefault(r.get("group", "?"), len(order))
    recs = sorted(enumerate(recs), key=lambda ir: (order[ir[1].get("group", "?")], ir[0]))
    out = []
    for _, r in recs:
        ratio = r.get("ratio")
        rs = "?" if ratio is None else f"{ratio:.2f} [{r.get('ratio_min', ratio):.2f}-{r.get('ratio_max', ratio):.2f}]"
        out.append((str(r.get("group", "?")), str(r.get("case", "?")), _value(r, "patronus", "patronus"),
                    str(r.get("peer", "?")), _value(r, "peer_value", "peer"), rs, str(r.get("goal", "")),
                    _met(r.get("met"))))
    return out


def markdown(table: list[tuple[str, ...]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADER) + " |", "| --- | --- | ---: | --- | ---: | ---: | --- | --- |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table]
    return "\n".join(lines)


def text(table: list[tuple[str, ...]], width: int = 44) -> str:
    def cut(c: str) -> str:
        return c if len(c) <= width else c[: width - 1] + "…"

    cells = [HEADER] + [tuple(cut(c) for c in row) for row in table]
    w = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    right = {2, 4, 5}
    fmt = ["  ".join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(row)).rstrip()
           for row in cells]
    return "\n".join([fmt[0], "  ".join("-" * x for x in w), *fmt[1:]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", type=Path, default=DEFAULT, help=f"results file (default {DEFAULT})")
    ap.add_argument("--markdown", action="store_true", help="a markdown table (docs/PERFORMANCE.md)")
    a = ap.parse_args(argv)
    if not a.path.exists():
        print(f"{a.path}: no results (run make bench-peers)", file=sys.stderr)
        return 1
    recs = load(a.path)
    if not recs:
        print(f"{a.path}: no results", file=sys.stderr)
        return 1
    table = rows(recs)
    print(markdown(table) if a.markdown else text(table))
    print(f"\nratio = patronus cost / peer cost (lower is better), the median of the paired runs "
          f"[min-max]; {len(recs)} results from {a.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
