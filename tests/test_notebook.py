"""docs/notebooks/pcap_flows.ipynb is what its generator writes, and runs top to bottom."""

from __future__ import annotations

import base64
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "docs" / "notebooks"
NOTEBOOK = NOTEBOOKS / "pcap_flows.ipynb"
POLICY_NAMES = ("voice", "sip", "dns", "backup", "web", "(default)")


def _generator():
    spec = importlib.util.spec_from_file_location("make_pcap_flows", NOTEBOOKS / "make_pcap_flows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notebook_is_generated_without_outputs():
    text = NOTEBOOK.read_text(encoding="utf-8")
    assert text == _generator().render(), "re-run: .venv/bin/python docs/notebooks/make_pcap_flows.py"
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def _texts(nb) -> list[str]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o["text"])
            elif "data" in o:
                out.extend(v for k, v in o["data"].items() if k.startswith("text/") and isinstance(v, str))
    return out


def _pngs(nb) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"])
            for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_notebook_runs(monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # First, make sure the kernel is this interpreter (the venv): jupyter_client
    # launches kernel specs whose argv[0] is "python" with sys.executable.
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, f'kernel runs {{sys.executable}}, not the venv'"))
    with tempfile.TemporaryDirectory(prefix="patronus-test-nb-") as tmp:
        # The kernel inherits this environment: its temporary files (the
        # synthetic capture), connection file and IPython profile all go under
        # tmp, which is removed whatever happens.
        monkeypatch.delenv("PATRONUS_PCAP", raising=False)
        for var, sub in (("TMPDIR", "tmp"), ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
            os.makedirs(os.path.join(tmp, sub))
            monkeypatch.setenv(var, os.path.join(tmp, sub))
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, startup_timeout=120,
                                         resources={"metadata": {"path": tmp}})
        client.execute()  # raises CellExecutionError on the first failing cell
        leftovers = [n for n in os.listdir(os.path.join(tmp, "tmp")) if n.startswith("patronus-notebook-")]

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert not leftovers, "the notebook's last cell should remove its synthetic capture"
    texts = _texts(nb)
    assert any(all(name in t for name in POLICY_NAMES) for t in texts), "no output lists every policy"
    assert any("backup" in t and "2380840" in t for t in texts), "per-policy bytes missing"
    pngs = _pngs(nb)
    assert pngs and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
