"""The README's quick start runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(blocks[0], "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    text = capsys.readouterr().out
    out = text.split()
    assert "['voip', None]" in text and "[2 2]" in text and "hq.isp1" in out
    assert (tmp_path / "state.db").exists()


def test_path_quality_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if "Monitor(" in b]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.split()
    assert out[:2] == ["voip", "hq.lte~br1.isp1"]
