"""The Helm chart deploy/helm/patronus-operator, with the real helm binary.

No Kubernetes API server runs here, so the chart is checked as far as that
allows, with real tools at each step:

- ``helm lint --strict`` passes, for the default values and each variant;
- ``helm template`` renders each variant (cluster-wide, a list of
  namespaces, the ServiceMonitor, existing and chart-made Secrets, a PDB),
  and every manifest validates against the Kubernetes API schemas
  (kubernetes-validate, strict: unknown fields are errors) of the oldest
  Kubernetes the chart declares and of the newest the package ships; the
  ServiceMonitor against the schema of the Prometheus Operator's own CRD
  (tests/fixtures/k8s/, unknown fields refused as the API server's strict
  field validation does); the CRDs in crds/ (when there) too;
- the RBAC rules are exactly the ones the operator uses (kopf in standalone
  mode with annotation storage; the chart's README says which kopf call needs
  which rule), with no wildcard and no Secrets, and they cover exactly the
  namespaces the operator is told to serve;
- the Deployment's command line is accepted by the real ``patronus``
  argument parser, and the API key appears nowhere but in its Secret;
- bad values are refused by values.schema.json (or the templates) with an
  error naming the value, and the API key is never echoed in an error;
- the ``kubectl create secret`` command NOTES.txt prints works
  (``--dry-run=client``, no cluster).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from . import k8s_tools

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "patronus-operator"
SERVICEMONITOR_CRD = Path(__file__).parent / "fixtures" / "k8s" / "monitoring.coreos.com_servicemonitors.yaml"
RELEASE, NAMESPACE = "pn", "sdwan"
FULLNAME = f"{RELEASE}-patronus-operator"
GROUP = "sdwan.patronus.dev"

# The operator's whole Kubernetes API use (kopf 1.x, standalone, annotation
# progress storage, scanning off): LIST + WATCH per served resource, PATCH of
# the resource (finalizers, annotations) and of its status subresource, and a
# POST of core/v1 Events. Nothing else, in a Role or in a ClusterRole.
EXPECTED_RULES = [
    {"apiGroups": [GROUP], "resources": ["sites", "policies"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": ["sites/status", "policies/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]

TIMEOUT = 60


def _api_key() -> str:
    return f"pnk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def _certificate_pem() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "patronus controller")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


API_KEY = _api_key()
CA_PEM = _certificate_pem()

# name -> values given on top of values.yaml
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "all-namespaces": {"allNamespaces": True},
    "watch-list": {"watchNamespaces": ["branch-a", "branch-b", NAMESPACE]},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "existing-secrets": {"controller": {
        "urls": ["https://ctl-0.ctl:8443", "https://ctl-1.ctl:8443"],
        "apiKey": {"secretName": "sdwan-operator-key", "secretKey": "token"},
        "ca": {"kind": "Secret", "name": "controller-tls", "key": "tls.crt"}}},
    "chart-made-secrets": {"controller": {
        "apiKey": {"create": True, "value": API_KEY},
        "ca": {"create": True, "pem": CA_PEM}}},
    "chart-made-ca-secret": {"controller": {"ca": {"create": True, "kind": "Secret", "pem": CA_PEM}}},
    "pdb-and-scheduling": {
        "podDisruptionBudget": {"enabled": True},
        "image": {"repository": "registry.example:5000/sdwan/patronus", "tag": "0.1.0", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "netops"},
        "podLabels": {"team": "netops"},
        "serviceAccount": {"annotations": {"example.com/role": "sdwan"}},
        "metrics": {"service": {"annotations": {"prometheus.io/scrape": "true"}}},
        "logFormat": "text",
        "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"memory": "192Mi"}},
    },
    "no-rbac-no-sa": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "sdwan-operator"},
                      "metrics": {"service": {"enabled": False}}},
}


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    return k8s_tools.ensure()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return k8s_tools.offline_env(tmp_path_factory.mktemp("helm"))


def _values_file(tmp: Path, values: dict[str, Any]) -> Path:
    p = tmp / f"values-{secrets.token_hex(4)}.yaml"
    p.write_text(yaml.safe_dump(values))
    return p


def helm(tools: dict[str, Path], env: dict[str, str], *args: str | Path,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(tools["helm"]), *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=TIMEOUT)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def render(tools: dict[str, Path], env: dict[str, str], tmp: Path, values: dict[str, Any],
           *extra: str) -> list[dict[str, Any]]:
    out = helm(tools, env, "template", RELEASE, CHART, "--namespace", NAMESPACE,
               "--values", _values_file(tmp, values), *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (d,) = _kinds(docs, kind)
    return d


def _kube_versions() -> list[str]:
    """The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest with schemas."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    m = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", chart["kubeVersion"])
    assert m, chart["kubeVersion"]
    return [f"{m.group(1)}.0", f"{kubernetes_validate.latest_version()}.0"]


def _strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema with unknown fields refused, as the API
    server's strict field validation (kubectl --validate=strict) does:
    every object schema that lists properties and does not preserve unknown
    fields gets ``additionalProperties: false``."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(crd_path: Path, version: str) -> jsonschema.protocols.Validator:
    (crd,) = [d for d in yaml.safe_load_all(crd_path.read_text()) if d]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(v["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def validate_manifest(doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "ServiceMonitor":
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in _crd_validator(SERVICEMONITOR_CRD, "v1").iter_errors(doc)]
        assert not errors, f"ServiceMonitor {doc['metadata']['name']}: {errors}"
        return
    for version in _kube_versions():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']} {doc['metadata'].get('name')} is not valid Kubernetes "
                                 f"{version}: {'/'.join(map(str, e.path))}: {e.message}") from None


# -- lint and render ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict(tools, env, tmp_path, variant):
    r = helm(tools, env, "lint", "--strict", CHART, "--namespace", NAMESPACE,
             "--values", _values_file(tmp_path, VARIANTS[variant]))
    assert "0 chart(s) failed" in r.stdout, r.stdout
    assert "[WARNING]" not in r.stdout and "[ERROR]" not in r.stdout, r.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_validates(tools, env, tmp_path, variant):
    docs = render(tools, env, tmp_path, VARIANTS[variant], "--include-crds")
    assert docs
    for doc in docs:
        validate_manifest(doc)
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert d["metadata"].get("namespace"), f"{d['kind']} {d['metadata']['name']} has no namespace"


def test_default_objects(tools, env, tmp_path):
    docs = render(tools, env, tmp_path, {})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"], kinds
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs)


def test_crds_are_shipped_and_validate(tools, env, tmp_path):
    crd_files = sorted((CHART / "crds").glob("*.yaml")) if (CHART / "crds").is_dir() else []
    if not crd_files:
        pytest.skip("no CRDs in the chart's crds/ yet (patronus crdgen writes them)")
    docs = [d for d in render(tools, env, tmp_path, {}, "--include-crds") if d["kind"] == "CustomResourceDefinition"]
    assert len(docs) == sum(1 for f in crd_files for d in yaml.safe_load_all(f.read_text()) if d)
    plurals = {d["spec"]["names"]["plural"] for d in docs if d["spec"]["group"] == GROUP}
    assert plurals == {"sites", "policies"}
    for d in docs:
        validate_manifest(d)
        assert d["spec"]["scope"] == "Namespaced"
        served = [v for v in d["spec"]["versions"] if v["served"]]
        assert served and all("status" in v.get("subresources", {}) for v in served), \
            f"{d['metadata']['name']}: the operator patches the status subresource"


# -- RBAC -------------------------------------------------------------------------------------


def _rules(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in role["rules"]]


def _served_namespaces(docs: list[dict[str, Any]]) -> list[str] | None:
    """The namespaces the Deployment's command line serves; None for --all-namespaces."""
    args = _container(docs)["args"]
    if "--all-namespaces" in args:
        assert "--namespace" not in args
        return None
    return [args[i + 1] for i, a in enumerate(args) if a == "--namespace"]


@pytest.mark.parametrize("variant", ["default", "watch-list"])
def test_rbac_namespaced_exact(tools, env, tmp_path, variant):
    docs = render(tools, env, tmp_path, VARIANTS[variant])
    assert not _kinds(docs, "ClusterRole") and not _kinds(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in _kinds(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in _kinds(docs, "RoleBinding")}
    served = _served_namespaces(docs)
    assert served == (VARIANTS[variant].get("watchNamespaces") or [NAMESPACE])
    # RBAC exactly where the operator looks: no namespace served without it, none granted in vain
    assert sorted(roles) == sorted(bindings) == sorted(served)
    sa = _one(docs, "ServiceAccount")["metadata"]
    for ns, role in roles.items():
        assert _rules(role) == EXPECTED_RULES
        b = bindings[ns]
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                "name": role["metadata"]["name"]}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]


def test_rbac_cluster_wide_exact(tools, env, tmp_path):
    docs = render(tools, env, tmp_path, VARIANTS["all-namespaces"])
    assert not _kinds(docs, "Role") and not _kinds(docs, "RoleBinding")
    assert _served_namespaces(docs) is None
    role, binding = _one(docs, "ClusterRole"), _one(docs, "ClusterRoleBinding")
    assert _rules(role) == EXPECTED_RULES
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    sa = _one(docs, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["name"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rbac_no_wildcards_no_secrets(tools, env, tmp_path, variant):
    docs = render(tools, env, tmp_path, VARIANTS[variant])
    roles = _kinds(docs, "Role") + _kinds(docs, "ClusterRole")
    if not VARIANTS[variant].get("rbac", {}).get("create", True):
        assert not roles and not _kinds(docs, "RoleBinding") and not _kinds(docs, "ClusterRoleBinding")
        assert not _kinds(docs, "ServiceAccount")
        assert _one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "sdwan-operator"
        return
    assert roles
    for role in roles:
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule   # no resourceNames, no nonResourceURLs
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field] and not any("*" in x for x in rule[field]), rule
            assert "secrets" not in rule["resources"] and "configmaps" not in rule["resources"], rule
            assert not {"escalate", "bind", "impersonate", "delete", "deletecollection"} & set(rule["verbs"]), rule


def test_rbac_matches_the_operator_package():
    """The group and plurals in the rules are the ones patronus.operator declares."""
    from patronus.operator import GROUP as PKG_GROUP, KINDS

    assert PKG_GROUP == GROUP
    plurals = sorted(k.plural for k in KINDS.values())
    assert sorted(EXPECTED_RULES[0]["resources"]) == plurals
    assert sorted(EXPECTED_RULES[1]["resources"]) == [f"{p}/status" for p in plurals]


def test_rbac_assumptions_hold_in_the_operator():
    """The rules are enough only for kopf as the operator sets it up: standalone
    (no peering objects), scanning off (no CRD or namespace list/watch),
    progress and diff base in annotations (patches of the resource, never of
    other objects), events posted (create)."""
    kopf = pytest.importorskip("kopf")
    from patronus.operator import run

    s = run.kopf_settings()
    assert s.peering.standalone is True and s.peering.mandatory is False
    assert s.scanning.disabled is True
    assert isinstance(s.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(s.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert s.persistence.finalizer.startswith(GROUP + "/")
    assert s.posting.enabled is True


# -- the Deployment ----------------------------------------------------------------------------


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def _parse_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``argv`` as the real ``patronus`` parser reads it (SystemExit 2 on an unknown option)."""
    from patronus import cli

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def spy(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    with pytest.raises(Parsed) as e:
        cli.main(argv)
    monkeypatch.undo()
    return e.value.args[0]


def test_deployment_hardening(tools, env, tmp_path):
    docs = render(tools, env, tmp_path, {})
    dep = _one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    c = _container(docs)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c["env"]
    # every mount but the in-memory /tmp is read-only
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["mountPath"] != "/tmp")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_command_line_is_the_operators(tools, env, tmp_path, variant, monkeypatch):
    """The args parse with the real ``patronus operator`` parser, and name files the pod mounts."""
    docs = render(tools, env, tmp_path, VARIANTS[variant])
    c = _container(docs)
    args = c["args"]
    assert args[0] == "operator"
    ns = _parse_cli(args, monkeypatch)
    assert ns.cmd == "operator"
    values = copy.deepcopy(VARIANTS[variant])
    ctl = values.get("controller", {})
    assert args[args.index("--controller") + 1] == ",".join(ctl.get("urls", ["https://patronus-controller:8443"]))
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    key_file = args[args.index("--api-key-file") + 1]
    key = ctl.get("apiKey", {})
    assert key_file == f"{mounts['api-key']}/{key.get('secretKey', 'api-key')}"
    assert volumes["api-key"]["secret"]["secretName"] == key.get("secretName", f"{FULLNAME}-api-key")
    ca = ctl.get("ca", {})
    if ca.get("name") or ca.get("create"):
        ca_file = args[args.index("--ca") + 1]
        assert ca_file == f"{mounts['controller-ca']}/{ca.get('key', 'ca.crt')}"
        src = volumes["controller-ca"]
        name = ca.get("name") or f"{FULLNAME}-controller-ca"
        if ca.get("kind") == "Secret":
            assert src["secret"]["secretName"] == name
        else:
            assert src["configMap"]["name"] == name
    else:
        assert "--ca" not in args and "controller-ca" not in volumes


def test_chart_made_secrets(tools, env, tmp_path):
    docs = render(tools, env, tmp_path, VARIANTS["chart-made-secrets"])
    import base64

    secret = _one(docs, "Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-api-key"
    assert base64.b64decode(secret["data"]["api-key"]).decode() == API_KEY
    cm = _one(docs, "ConfigMap")
    assert cm["data"]["ca.crt"].strip() == CA_PEM.strip()
    # the key is in its Secret and nowhere else (not in args, env, annotations, labels)
    for d in docs:
        if d is not secret:
            text = json.dumps(d)
            assert API_KEY not in text and base64.b64encode(API_KEY.encode()).decode() not in text, d["kind"]
    ann = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/api-key" in ann and "checksum/controller-ca" in ann


def test_api_key_with_a_newline_from_set_file(tools, env, tmp_path):
    """``--set-file`` keeps the file's trailing newline; the chart strips it."""
    import base64

    f = tmp_path / "operator.key"
    f.write_text(API_KEY + "\n")
    docs = render(tools, env, tmp_path, {"controller": {"apiKey": {"create": True}}},
                  "--set-file", f"controller.apiKey.value={f}")
    assert base64.b64decode(_one(docs, "Secret")["data"]["api-key"]).decode() == API_KEY


def test_metrics_service_and_service_monitor_select_the_pod(tools, env, tmp_path):
    docs = render(tools, env, tmp_path, VARIANTS["service-monitor"])
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = _one(docs, "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "metrics" and port["port"] == 8080 and port["targetPort"] == "metrics"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    sm = _one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics"


def test_pdb_selects_the_pod(tools, env, tmp_path):
    docs = render(tools, env, tmp_path, VARIANTS["pdb-and-scheduling"])
    pdb = _one(docs, "PodDisruptionBudget")
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert _container(docs)["image"] == "registry.example:5000/sdwan/patronus:0.1.0"


# -- bad values -------------------------------------------------------------------------------

BAD = [
    # (values, what the error must name)
    ({"replicaCount": 2}, "replicaCount"),
    ({"logFormat": "yaml"}, "/logFormat"),
    ({"metrics": {"port": 80}}, "/metrics/port"),
    ({"health": {"port": 70000}}, "/health/port"),
    ({"metrics": {"port": 9000}, "health": {"port": 9000}}, "metrics.port and health.port must differ"),
    ({"controller": {"urls": ["http://ctl:8443"]}}, "/controller/urls/0"),
    ({"controller": {"urls": ["https://a:8443,https://b:8443"]}}, "/controller/urls/0"),
    ({"controller": {"urls": []}}, "/controller/urls"),
    ({"controller": {"apiKey": {"create": True}}}, "/controller/apiKey/value"),
    ({"controller": {"apiKey": {"secretName": "Not_A_Name"}}}, "/controller/apiKey/secretName"),
    ({"controller": {"ca": {"kind": "Volume"}}}, "/controller/ca/kind"),
    ({"controller": {"ca": {"create": True}}}, "/controller/ca/pem"),
    ({"controller": {"ca": {"create": True, "pem": "not a certificate"}}}, "/controller/ca/pem"),
    ({"watchNamespaces": ["Bad_Namespace"]}, "/watchNamespaces/0"),
    ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
    ({"allNamespaces": True, "watchNamespaces": ["a"]}, "/watchNamespaces"),
    ({"allNamespaces": "yes"}, "/allNamespaces"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ({"resources": {"limits": {"gpu": 1}}}, "gpu"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"metrics": {"serviceMonitor": {"enabled": True}, "service": {"enabled": False}}},
     "metrics.serviceMonitor.enabled needs metrics.service.enabled"),
    ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": None}}, "set minAvailable or maxUnavailable"),
    ({"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}, "not both"),
    ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
    ({"terminationGracePeriodSeconds": 2}, "/terminationGracePeriodSeconds"),
]


@pytest.mark.parametrize("values,named", BAD, ids=[n for _, n in BAD])
def test_bad_values_are_refused(tools, env, tmp_path, values, named):
    r = helm(tools, env, "template", RELEASE, CHART, "--namespace", NAMESPACE,
             "--values", _values_file(tmp_path, values), check=False)
    assert r.returncode != 0, f"accepted: {values}\n{r.stdout[:2000]}"
    assert named in r.stderr, r.stderr


@pytest.mark.parametrize("bad_key", ["hunter2-not-a-key-at-all", API_KEY[:-1] + "!", "pnk_" + API_KEY],
                         ids=["not-a-key", "bad-character", "double-prefix"])
def test_a_malformed_api_key_is_refused_without_showing_it(tools, env, tmp_path, bad_key):
    r = helm(tools, env, "template", RELEASE, CHART, "--namespace", NAMESPACE, "--values",
             _values_file(tmp_path, {"controller": {"apiKey": {"create": True, "value": bad_key}}}), check=False)
    assert r.returncode != 0
    assert "controller.apiKey.value" in r.stderr and "not shown" in r.stderr, r.stderr
    assert bad_key not in r.stderr + r.stdout


# -- NOTES.txt and the commands it prints ------------------------------------------------------


def test_notes_and_the_secret_command(tools, env, tmp_path):
    r = helm(tools, env, "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client")
    notes = r.stdout.split("NOTES:", 1)[1]
    assert f"create secret generic {FULLNAME}-api-key" in notes
    m = re.search(r"kubectl (-n \S+ create secret generic \S+) \\\n\s+(--from-file=\S+)", notes)
    assert m, notes
    key_file = tmp_path / "operator.key"
    key_file.write_text(API_KEY)
    argv = [str(tools["kubectl"]), *m.group(1).split(), m.group(2).replace("./operator.key", str(key_file)),
            "--dry-run=client", "-o", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=True).stdout
    secret = json.loads(out)
    validate_manifest(secret)
    dep = [d for d in yaml.safe_load_all(r.stdout.split("NOTES:", 1)[0].split("MANIFEST:", 1)[1]) if d
           and d["kind"] == "Deployment"][0]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-key"]
    # the Secret the command makes is the one the pod mounts, under the key it reads
    assert secret["metadata"]["name"] == vol["secret"]["secretName"]
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert list(secret["data"]) == [i["key"] for i in vol["secret"]["items"]]

    made = helm(tools, env, "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client",
                "--values", _values_file(tmp_path, VARIANTS["chart-made-secrets"])).stdout
    notes = made.split("NOTES:", 1)[1]
    assert "create secret generic" not in notes and API_KEY not in notes


# -- the chart's documentation -----------------------------------------------------------------


def _leaf_paths(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _leaf_paths(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def test_readme_documents_every_value():
    """Every value of values.yaml is a row of the chart README's values table, and has a comment."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    table = readme.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    leaves = _leaf_paths(values)
    missing = [p for p in leaves if p not in rows]
    assert not missing, f"values without a README row: {missing}"
    extra = [r for r in rows if r not in leaves]
    assert not extra, f"README rows for values that do not exist: {extra}"
    # each top-level value has its own comment block in values.yaml
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z]\w*:", line):
            assert i and lines[i - 1].startswith("#"), f"values.yaml line {i + 1} ({line}) has no comment above"


def test_schema_knows_every_value():
    """values.schema.json describes each value of values.yaml (additionalProperties is false throughout)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)

    def walk(s: dict[str, Any], path: str) -> None:
        s = schema["definitions"][s["$ref"].rsplit("/", 1)[1]] if "$ref" in s else s
        if s.get("type") == "object" and "properties" in s:
            assert s.get("additionalProperties") is False, f"{path or 'values'} accepts unknown keys"
            for k, sub in s["properties"].items():
                walk(sub, f"{path}.{k}" if path else k)

    walk(schema, "")
