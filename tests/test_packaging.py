"""Packaging and deployment.

The wheel and the sdist are complete: built from a copy of the checkout
(its tracked and current files), each installed into a fresh virtualenv
outside the checkout, where a smoke script imports every subpackage,
classifies frames, processes a pcap and (as root with BCC and kernel
headers) runs the XDP program with BPF_PROG_TEST_RUN against Userspace.

The extension compiles twice: once for the wheel (``python -m build`` builds
the sdist, then the wheel from it) and once when pip installs the sdist. The
sdist's venv is set up in the background while the wheel's tests run.

The systemd units of deploy/systemd pass ``systemd-analyze verify`` and
use only options the agent has.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

BUILD_AND_INSTALL_S = 1800  # the timeout of a test that may build the dists and the venvs

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 900
# imported in each venv, with every other package of the checkout (a directory with __init__.py)
SUBPACKAGE_IMPORTS = ("patronus", "patronus.dataplane", "patronus.failover", "patronus.paths",
                      "patronus.wireguard", "patronus.lab")
TYPING_GLOBS = ("*.pyi", "*.pxd", "*.pxi", "py.typed")  # shipped in the wheel next to the modules
C_GLOBS = ("*.c", "*.h")  # of bpf/ and csrc/: in the sdist, and in the wheel under patronus/_src/

# Run by the venv's interpreter, cwd outside the checkout. Prints one JSON
# object; an assertion failing here fails the test with this traceback.
SMOKE = r'''
import importlib, json, os, struct, sys, tempfile
from pathlib import Path

out = {"sys_path": sys.path, "imported": json.loads(os.environ["SMOKE_IMPORTS"])}
for name in out["imported"]:
    importlib.import_module(name)

import numpy as np
import patronus
from patronus import Match, Policy, PolicyTable, packets
from patronus.dataplane import Userspace
from patronus.errors import DataplaneUnavailable
from patronus import _fast, _sources

out["patronus"] = patronus.__file__
out["fast"] = _fast.__file__
out["source_dirs"] = [str(p) for p in _sources.source_dirs()]

table = PolicyTable([Policy("dns", Match(proto="udp", dst_ports=53), priority=1),
                     Policy("web", Match(proto="tcp", dst_ports=443), priority=2)])
frames = [packets.udp("10.0.0.1", "10.0.0.2", 5353, 53), packets.tcp("10.0.0.1", "10.0.0.3", 40000, 443),
          packets.udp("10.0.0.1", "10.0.0.2", 5353, 53), packets.udp("10.0.0.1", "10.0.0.4", 1, 9),
          packets.udp("2001:db8::1", "2001:db8::2", 7, 53)]
ts = np.arange(1, len(frames) + 1, dtype=np.uint64) * 1000
want = [0, 1, 0, -1, 0]

us = Userspace(table, flow_capacity=64)
ids = us.process(frames, ts).tolist()
assert ids == want, ids
out["classified"] = ids
out["flows"] = int(len(us.flows()))
assert out["flows"] == 4, out["flows"]

# a classic pcap (microsecond timestamps, Ethernet) of the same frames
pcap = Path(tempfile.mkdtemp(prefix="patronus-smoke-")) / "smoke.pcap"
with open(pcap, "wb") as f:
    f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for i, fr in enumerate(frames):
        f.write(struct.pack("<IIII", 1700000000 + i, 0, len(fr), len(fr)) + fr)
dp = Userspace(table, flow_capacity=64)
got = dp.process_pcap(pcap).tolist()
assert got == want, got
assert dp.last_capture["packets"] == len(frames), dp.last_capture
c = dp.counters()
assert c["policies"]["dns"]["packets"] == 3 and c["policies"]["web"]["packets"] == 1, c["policies"]
out["pcap"] = {"packets": dp.last_capture["packets"], "format": dp.last_capture["format"]}

print(json.dumps(out))
'''

# The XDP half, run separately so that the classification test above does not
# depend on it: the same frames through BPF_PROG_TEST_RUN and Userspace.
XDP_SMOKE = r'''
import json, struct, sys
import numpy as np
from patronus import Match, Policy, PolicyTable, packets
from patronus.dataplane import Userspace
from patronus.errors import DataplaneUnavailable

table = PolicyTable([Policy("dns", Match(proto="udp", dst_ports=53), priority=1),
                     Policy("web", Match(proto="tcp", dst_ports=443), priority=2)])
frames = [packets.udp("10.0.0.1", "10.0.0.2", 5353, 53), packets.tcp("10.0.0.1", "10.0.0.3", 40000, 443),
          packets.udp("10.0.0.1", "10.0.0.2", 5353, 53), packets.udp("10.0.0.1", "10.0.0.4", 1, 9),
          packets.udp("2001:db8::1", "2001:db8::2", 7, 53)]
ts = np.arange(1, len(frames) + 1, dtype=np.uint64) * 1000
out = {}
try:
    from patronus.dataplane import Xdp
    with Xdp(table, flow_capacity=64) as x:
        out["xdp"] = x.test_run(frames, ts_ns=ts).tolist()
        out["xdp_packets"] = int(x.flows()["packets"].sum())
    out["userspace"] = Userspace(table, 64).process(frames, ts).tolist()
    out["bcc"] = sys.modules["bcc"].__file__
except DataplaneUnavailable as e:
    out["xdp_unavailable"] = str(e)
print(json.dumps(out))
'''


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = BUILD_TIMEOUT,
         what: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{what} failed ({' '.join(map(str, cmd))}, exit {r.returncode}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r.stdout


def _clean_env() -> dict[str, str]:
    """This environment without anything that would point the venv at the
    checkout or at another environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PATRONUS_SRC", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _copy_checkout(dst: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, as they are
    now (so a build sees uncommitted edits and nothing generated)."""
    git = shutil.which("git")
    files: list[str] | None = None
    if git and (ROOT / ".git").exists():
        r = subprocess.run([git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True)
        if r.returncode == 0:
            files = [f for f in r.stdout.decode().split("\0") if f]
    if files is None:  # no git: everything but what a build or a run leaves behind
        ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                        "_fast.c", "_bfd.c", ".pytest_cache", ".hypothesis", ".benchmarks")
        shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
        return
    for f in files:
        src = ROOT / f
        if src.is_file():  # listed but deleted in the work tree: not part of the current state
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _leftovers() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.name in ("build", "dist") or p.name.endswith(".egg-info")}


def _make_venv(where: Path, dist: Path, work: Path) -> Path:
    """A fresh venv (no system site packages) with ``dist`` installed; its python."""
    _run([sys.executable, "-m", "venv", str(where)], cwd=work, env=_clean_env(), timeout=300,
         what=f"creating the venv {where}")
    py = where / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", str(dist)], cwd=work, env=_clean_env(),
         what=f"pip install {dist.name}")
    return py


class Built:
    def __init__(self, work: Path, wheel: Path, sdist: Path, src: Path) -> None:
        self.work, self.wheel, self.sdist, self.src = work, wheel, sdist, src
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="venv")
        self._venvs = {kind: self._pool.submit(_make_venv, work / f"venv-{kind}", dist, work)
                       for kind, dist in (("wheel", wheel), ("sdist", sdist))}
        self._smoke: dict[str, dict] = {}

    def venv(self, kind: str) -> Path:
        return self._venvs[kind].result()

    def smoke(self, kind: str, script: str = "smoke") -> dict:
        """Run SMOKE or XDP_SMOKE in the ``kind`` venv, once; its JSON."""
        key = f"{kind}-{script}"
        if key not in self._smoke:
            py = self.venv(kind)
            path = self.work / f"{script}.py"
            path.write_text({"smoke": SMOKE, "xdp": XDP_SMOKE}[script])
            found = {".".join(p.parent.relative_to(self.src).parts)
                     for p in (self.src / "patronus").rglob("__init__.py")}
            env = _clean_env() | {"SMOKE_IMPORTS": json.dumps(sorted(found | set(SUBPACKAGE_IMPORTS)))}
            cwd = self.work / f"run-{kind}"
            cwd.mkdir(exist_ok=True)
            out = _run([str(py), str(path)], cwd=cwd, env=env, timeout=600, what=f"{path.name} in the {kind} venv")
            self._smoke[key] = json.loads(out.strip().splitlines()[-1])
        return self._smoke[key]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    why = None
    if importlib.util.find_spec("build") is None:
        why = "the 'build' package is not installed in this venv (the test extra has it: scripts/bootstrap.sh)"
    elif not (shutil.which("cc") or shutil.which("gcc")):
        why = "no C compiler (cc/gcc): the extension cannot be built here"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)  # CI sets everything up: a skip there would hide a broken set-up
        pytest.skip(why)
    before = _leftovers()
    work = tmp_path_factory.mktemp("packaging")
    assert not work.resolve().is_relative_to(ROOT)
    src = work / "src"
    _copy_checkout(src)
    _run([sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(src)], cwd=work, env=_clean_env(),
         what="python -m build (sdist, then the wheel from it)")
    wheels = list((work / "dist").glob("patronus-*.whl"))
    sdists = list((work / "dist").glob("patronus-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((work / "dist").iterdir())
    assert _leftovers() == before, f"building left {_leftovers() - before} in the checkout"
    b = Built(work, wheels[0], sdists[0], src)
    yield b
    b.close()
    assert _leftovers() == before, f"the packaging test left {_leftovers() - before} in the checkout"


def _expected_package_files(src: Path) -> set[str]:
    pkg = src / "patronus"
    files = {p for p in pkg.rglob("*.py")}
    files |= {p for g in TYPING_GLOBS for p in pkg.rglob(g)}
    return {str(p.relative_to(src)) for p in files if "__pycache__" not in p.parts}


@pytest.mark.slow
@pytest.mark.timeout(BUILD_AND_INSTALL_S)
def test_wheel_has_every_subpackage_the_extension_and_the_c_sources(built):
    names = set(zipfile.ZipFile(built.wheel).namelist())
    missing = _expected_package_files(built.src) - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    assert any(n.startswith("patronus/_fast.") and n.endswith(".so") for n in names), "no compiled extension"
    for d in ("bpf", "csrc"):
        want = {f"patronus/_src/{d}/{p.name}" for g in C_GLOBS for p in (built.src / d).glob(g)}
        assert want and not want - names, f"the wheel lacks {sorted(want - names)}"
    assert not [n for n in names if n.startswith(("tests/", "build/"))], "tests or build output in the wheel"


@pytest.mark.slow
@pytest.mark.timeout(BUILD_AND_INSTALL_S)
def test_sdist_has_the_sources_the_build_needs(built):
    with tarfile.open(built.sdist) as t:
        top = t.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    want = {"setup.py", "pyproject.toml", "MANIFEST.in"}
    want |= {str(p.relative_to(built.src)) for d in ("bpf", "csrc") for g in C_GLOBS for p in (built.src / d).glob(g)}
    want |= {str(p.relative_to(built.src)) for g in ("*.pyx", "*.pxd", "*.pxi", "*.pyi")
             for p in (built.src / "patronus").rglob(g)}
    want |= _expected_package_files(built.src)
    assert not want - names, f"{top} lacks {sorted(want - names)}"
    generated = [n for n in names if n.startswith("patronus/") and n.endswith((".so", ".c"))]
    assert not generated, f"generated files in the sdist: {generated}"


@pytest.mark.slow
@pytest.mark.timeout(BUILD_AND_INSTALL_S)
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installed_copy_imports_classifies_and_reads_a_pcap(built, kind):
    venv = built.work / f"venv-{kind}"
    out = built.smoke(kind)
    # the installed copy, not the checkout, was imported
    for key in ("patronus", "fast"):
        assert Path(out[key]).resolve().is_relative_to(venv.resolve()), (key, out[key])
    assert not [p for p in out["sys_path"] if p and Path(p).resolve().is_relative_to(ROOT)], out["sys_path"]
    # the XDP sources come from the package data
    for d in out["source_dirs"]:
        assert Path(d).resolve().is_relative_to(venv.resolve()) and "_src" in Path(d).parts, d
    assert set(SUBPACKAGE_IMPORTS) <= set(out["imported"]), out["imported"]
    assert out["classified"] == [0, 1, 0, -1, 0] and out["pcap"]["packets"] == 5
    # the console script is installed and runs
    _run([str(venv / "bin" / "patronus"), "--help"], cwd=built.work, env=_clean_env(), timeout=60,
         what=f"patronus --help ({kind})")


def _xdp_expected() -> str | None:
    """Why XDP cannot run here, or None when it must."""
    if os.geteuid() != 0:
        return "not root"
    if not Path("/usr/lib/python3/dist-packages/bcc").is_dir():
        return "Debian's BCC binding (python3-bpfcc) is not installed"
    if not Path(f"/lib/modules/{os.uname().release}/build/include").exists():
        return "no kernel headers for BCC"
    return None


@pytest.mark.slow
@pytest.mark.timeout(BUILD_AND_INSTALL_S)
@pytest.mark.root
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installed_copy_runs_xdp_like_userspace(built, kind):
    why = _xdp_expected()
    out = built.smoke(kind, "xdp")
    if "xdp_unavailable" in out:
        if why is None or os.environ.get("CI"):
            pytest.fail(f"XDP did not run from the installed {kind}: {out['xdp_unavailable']}")
        pytest.skip(f"XDP unavailable here ({why}): {out['xdp_unavailable']}")
    assert out["xdp"] == out["userspace"] == [0, 1, 0, -1, 0], out
    assert out["xdp_packets"] == 5, out
    # the venv has no system site packages: bcc came from the fallback in patronus.dataplane.xdp
    assert out["bcc"].startswith("/usr/lib/python3/dist-packages/"), out["bcc"]


# -- deploy/systemd ----------------------------------------------------------

UNITS = ROOT / "deploy" / "systemd"
EXEC = "/opt/patronus/bin/patronus"  # where deploy/README.md installs the venv


def _unit_lines(path: Path, section: str) -> list[str]:
    lines, cur = [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            cur = line
        elif cur == section and line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_units_pass_systemd_analyze_verify(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed here (Debian: apt-get install systemd)")
    patronus = Path(sys.prefix) / "bin" / "patronus"
    if not patronus.exists():
        pytest.skip(f"no {patronus} to stand in for {EXEC} (verify checks that ExecStart is executable)")
    units = []
    for unit in sorted(UNITS.glob("*.service")):
        text = unit.read_text()
        assert EXEC in text, f"{unit.name} does not start {EXEC}"
        name = unit.name.replace("@.service", "@hq.service")  # an instance of a template
        (tmp_path / name).write_text(text.replace(EXEC, str(patronus)))
        units.append(str(tmp_path / name))
    assert units, f"no units in {UNITS}"
    r = subprocess.run([exe, "verify", *units], capture_output=True, text=True, timeout=120)
    # verify exits 0 on a unit with unknown keys or unparsable values: it only warns
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def _options(*cmd: str) -> set[str]:
    r = subprocess.run([sys.executable, "-m", "patronus.cli", *cmd, "--help"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return set(re.findall(r"--[a-z][a-z-]*", r.stdout))


def test_units_use_real_agent_options_and_the_same_hardening():
    real = {"agent": _options("agent"), "controller": _options("controller", "run")}
    real["controller"] |= _options("controller", "init")   # the unit's comment shows the init command
    for f in [*UNITS.glob("*.service"), *UNITS.glob("*.example")]:
        kind = "controller" if "controller" in f.name else "agent"
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", f.read_text()))
        if kind == "controller":
            used -= {"--system", "--home-dir", "--shell"}   # useradd's, in the comment that makes the user
        assert used and not used - real[kind], \
            f"{f.name}: {sorted(used - real[kind])} are not options of `patronus {kind}`"
    one, tmpl = UNITS / "patronus-agent.service", UNITS / "patronus-agent@.service"
    differ = {"Description", "EnvironmentFile", "ExecStart"}  # the instance name is the site

    def kept(p: Path) -> list[str]:
        return [x for x in _unit_lines(p, "[Service]") + _unit_lines(p, "[Install]") + _unit_lines(p, "[Unit]")
                if x.split("=", 1)[0] not in differ]

    assert kept(one) == kept(tmpl)
    assert "--site %i" in " ".join(_unit_lines(tmpl, "[Service]"))


# -- patronus._sources -------------------------------------------------------


def test_source_dirs_of_the_checkout(monkeypatch):
    from patronus import _sources

    monkeypatch.delenv(_sources.ENV, raising=False)
    if _sources.PACKAGE_DATA.is_dir():
        pytest.skip(f"{_sources.PACKAGE_DATA} exists: this patronus is an installed copy, not the checkout")
    assert _sources.source_dirs() == (ROOT / "bpf", ROOT / "csrc")


def test_source_dirs_from_the_environment_name_what_is_missing(monkeypatch, tmp_path):
    from patronus import DataplaneUnavailable, _sources

    for d in ("bpf", "csrc"):
        shutil.copytree(ROOT / d, tmp_path / d)
    monkeypatch.setenv(_sources.ENV, str(tmp_path))
    assert _sources.source_dirs() == (tmp_path / "bpf", tmp_path / "csrc")
    (tmp_path / "csrc" / "patronus_abi.h").unlink()  # included by both programs
    with pytest.raises(DataplaneUnavailable, match=r"patronus_abi\.h") as e:
        _sources.source_dirs()
    assert _sources.ENV in e.value.cause and _sources.ENV in e.value.fix
    monkeypatch.setenv(_sources.ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataplaneUnavailable, match="patronus_xdp.c"):
        _sources.source_dirs()
