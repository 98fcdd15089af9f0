"""The Site and Policy CRDs (patronus.operator.crd): regenerating gives the
committed files; the CRDs pass the Kubernetes apiextensions/v1 schema
(kubernetes-validate, strict) and the structural-schema rules; the examples
pass the generated OpenAPI v3 schemas (openapi-schema-validator, ECMA-262
patterns through `regress`) and load in the model; invalid resources are
rejected; and, by hypothesis, the schema never rejects what the model
builds, and what the schema accepts the model accepts, but for the gaps the
module's docstring lists."""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import regress  # noqa: F401  (openapi-schema-validator evaluates `pattern` as ECMA-262 with it, as OpenAPI says)
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import validators
from openapi_schema_validator import OAS30Validator

from patronus import _validate as v
from patronus.errors import ConfigError
from patronus.model import Match, Policy, QoS, Site, Uplink
from patronus.operator import API_VERSION, GROUP, KINDS, crd

from .strategies import addresses, endpoint_names, names, networks

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / crd.DEFAULT_OUT
EXAMPLES = REPO / "deploy" / "examples"
MODEL = {"Site": Site, "Policy": Policy}
SCHEMA = {k: crd.openapi_schema(k) for k in KINDS}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- validators


def _null_skips_junctors(keyword: Callable[..., Any]) -> Callable[..., Any]:
    """kube-openapi validates a null value against type and enum only
    (SchemaValidator.Validate: `if data == nil` runs the type and common
    validators and returns), so a nullable int-or-string node takes null
    although neither anyOf branch does."""

    def check(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if instance is None and schema.get("nullable") is True:
            return
        yield from keyword(validator, value, instance, schema)

    return check


KubeValidator = validators.extend(OAS30Validator, {"anyOf": _null_skips_junctors(OAS30Validator.VALIDATORS["anyOf"])})


def list_type_problems(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """What the API server's x-kubernetes-list-type checks report (duplicate
    items of a set, duplicate keys of a map): OpenAPI validators ignore the
    extension."""
    out: list[str] = []
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "set":
            seen = [json.dumps(x, sort_keys=True) for x in value]
            out += [f"{path}: duplicate {x}" for i, x in enumerate(seen) if x in seen[:i]]
        elif kind == "map":
            keys = [tuple(json.dumps(x.get(k)) for k in schema["x-kubernetes-list-map-keys"])
                    for x in value if isinstance(x, dict)]
            out += [f"{path}: duplicate key {k}" for i, k in enumerate(keys) if k in keys[:i]]
        if isinstance(schema.get("items"), dict):
            for i, x in enumerate(value):
                out += list_type_problems(schema["items"], x, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                out += list_type_problems(sub, value[k], f"{path}.{k}")
    return out


def resource(kind: str, name: str, spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def schema_errors(kind: str, res: dict[str, Any], validator: Any = KubeValidator) -> list[str]:
    schema = SCHEMA[kind]
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(schema).iter_errors(res)]
    return found + list_type_problems(schema, res)


def model_error(kind: str, name: str, spec: Any) -> ConfigError | None:
    try:
        MODEL[kind].from_dict({"name": name, **spec})
    except ConfigError as e:
        return e
    return None


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


# ---------------------------------------------------------------- the files


def test_committed_crds_are_what_the_model_gives(tmp_path: Path) -> None:
    assert crd.check(CRD_DIR) == []
    written = crd.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in CRD_DIR.glob(f"*.{GROUP}.yaml"))
    assert sorted(p.name for p in written) == [f"{k.plural}.{GROUP}.yaml" for k in
                                                sorted(KINDS.values(), key=lambda k: k.plural)]
    for p in written:
        assert p.read_bytes() == (CRD_DIR / p.name).read_bytes()


def test_files_are_the_crds_as_yaml() -> None:
    for doc in crd.crds():
        text = (CRD_DIR / crd.filename(doc)).read_text()
        assert text.startswith("# generated by `patronus crdgen`; do not edit\n")
        assert yaml.safe_load(text) == doc
    assert crd.crds() == crd.crds()   # deterministic


def test_crdgen_main_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crds"
    assert crd.main(argparse.Namespace(out=str(out), check=True)) == 1
    assert "missing" in capsys.readouterr().out
    assert crd.main(argparse.Namespace(out=str(out), check=False)) == 0
    assert f"sites.{GROUP}.yaml" in capsys.readouterr().out
    assert crd.main(argparse.Namespace(out=str(out), check=True)) == 0
    assert "up to date" in capsys.readouterr().out
    site = out / f"sites.{GROUP}.yaml"
    site.write_text(site.read_text().replace("maximum: 65535", "maximum: 65536", 1))
    (out / f"stale.{GROUP}.yaml").write_text("---\n")
    assert crd.main(argparse.Namespace(out=str(out), check=True)) == 1
    said = capsys.readouterr().out
    assert f"sites.{GROUP}.yaml: differs from the model" in said
    assert "-                      maximum: 65536" in said and "+                      maximum: 65535" in said
    assert f"stale.{GROUP}.yaml: not a CRD of this version" in said


def test_write_to_an_unwritable_place_is_a_named_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(crd.CRDError, match="cannot write the CRDs"):
        crd.write(blocker / "crds")
    assert crd.main(argparse.Namespace(out=str(blocker / "crds"), check=False)) == 1


# ------------------------------------------------------- the CRDs themselves


@pytest.mark.parametrize("version", sorted(set(kubernetes_validate.utils.all_versions())))
def test_crds_pass_the_kubernetes_apiextensions_schema(version: str) -> None:
    for doc in crd.crds():
        assert kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_is_strict_here() -> None:
    doc = crd.crds()[0]
    doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["maxItem"] = 3  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


SCALAR_TYPES = {"string", "integer", "number", "boolean"}
TYPES = SCALAR_TYPES | {"object", "array"}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
NOT_IN_JUNCTORS = {"type", "description", "default", "additionalProperties", "nullable", "title", "externalDocs",
                   "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
                   "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type",
                   "x-kubernetes-map-type", "x-kubernetes-validations"}
UNSUPPORTED = {"$ref", "definitions", "patternProperties", "additionalItems", "dependencies", "id"}
ROOT_WITH_STATUS = {"description", "type", "format", "title", "maximum", "exclusiveMaximum", "minimum",
                    "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems",
                    "multipleOf", "required", "items", "properties", "externalDocs", "example",
                    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations"}
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
# RE2 (the API server) and ECMA-262 (OpenAPI) share none of these
NON_PORTABLE_REGEX = re.compile(r"\(\?[=!<iPmsux]|\\[1-9AZzbBdDsSwWpP]|\[\[:")


def structural_problems(schema: dict[str, Any], *, status_subresource: bool = True) -> list[str]:
    """The rules the API server applies to a CRD's openAPIV3Schema
    (apiextensions-apiserver: structural.ValidateStructural and
    validation.ValidateCustomResourceDefinitionOpenAPISchema), for the
    features these schemas use."""
    out: list[str] = []

    def nested(node: Any, path: str, int_or_string_anyof: bool = False) -> None:
        subs = node if isinstance(node, list) else [node]
        for i, sub in enumerate(subs):
            p = f"{path}[{i}]" if isinstance(node, list) else path
            if not isinstance(sub, dict):
                out.append(f"{p}: not a schema")
                continue
            allowed = {"type"} if int_or_string_anyof and list(sub) == ["type"] else set()
            out.extend(f"{p}.{k}: must not be set inside a logical junctor"
                       for k in (NOT_IN_JUNCTORS & set(sub)) - allowed)
            if "metadata" in sub.get("properties", {}):
                out.append(f"{p}.properties.metadata: must not be specified in a nested context")
            if "properties" in sub or "items" in sub:
                out.append(f"{p}: fields and items in a junctor must also be specified outside it "
                           "(these schemas specify none)")
            for j in JUNCTORS:
                if j in sub:
                    nested(sub[j], f"{p}.{j}")

    def walk(node: Any, path: str, level: str) -> None:
        if not isinstance(node, dict):
            out.append(f"{path}: not a schema object")
            return
        out.extend(f"{path}.{k}: not supported" for k in UNSUPPORTED & set(node))
        t = node.get("type")
        ios = node.get("x-kubernetes-int-or-string") is True
        preserve = node.get("x-kubernetes-preserve-unknown-fields")
        if t is not None and t not in TYPES:
            out.append(f"{path}.type: {t!r} is not an OpenAPI v3 type")
        if not t and not ios and preserve is not True:
            out.append(f"{path}.type: must not be empty ({level})")
        if preserve is False:
            out.append(f"{path}.x-kubernetes-preserve-unknown-fields: must be true or undefined")
        if ios and preserve:
            out.append(f"{path}: int-or-string and preserve-unknown-fields together")
        if ios and t:
            out.append(f"{path}: int-or-string with a type")
        if ios and "anyOf" in node and node["anyOf"] != INT_OR_STRING:
            out.append(f"{path}.anyOf: int-or-string takes exactly anyOf [integer, string]")
        if node.get("uniqueItems"):
            out.append(f"{path}.uniqueItems: forbidden (quadratic)")
        if t == "array" and "items" not in node:
            out.append(f"{path}.items: must be specified for an array")
        if "items" in node and not isinstance(node["items"], dict):
            out.append(f"{path}.items: must be one schema object")
        if "additionalProperties" in node and ("properties" in node or level == "root"):
            out.append(f"{path}.additionalProperties: with properties, or at the root")
        if t == "array" and node.get("nullable") and level == "item":
            pass
        for j in JUNCTORS:
            if j in node:
                nested(node[j], f"{path}.{j}", int_or_string_anyof=(ios and j == "anyOf"))
        if "pattern" in node:
            pattern = node["pattern"]
            re.compile(pattern)
            regress.Regex(pattern)
            if NON_PORTABLE_REGEX.search(pattern):
                out.append(f"{path}.pattern: uses syntax RE2 or ECMA-262 lacks")
        list_type = node.get("x-kubernetes-list-type")
        if list_type is not None:
            items = node.get("items", {})
            if t != "array":
                out.append(f"{path}: x-kubernetes-list-type on a non-array")
            if list_type not in ("atomic", "set", "map"):
                out.append(f"{path}.x-kubernetes-list-type: {list_type!r}")
            if list_type in ("set", "map") and items.get("nullable"):
                out.append(f"{path}.items.nullable: not with list-type {list_type}")
            if list_type == "set" and items.get("type") not in SCALAR_TYPES:
                out.append(f"{path}.items: a set of non-scalars must be atomic")
            if list_type == "map":
                keys = node.get("x-kubernetes-list-map-keys") or []
                if not keys:
                    out.append(f"{path}.x-kubernetes-list-map-keys: must not be empty")
                if items.get("type") != "object":
                    out.append(f"{path}.items.type: must be object for list-type map")
                for k in keys:
                    key = items.get("properties", {}).get(k)
                    if key is None or key.get("type") not in SCALAR_TYPES:
                        out.append(f"{path}: map key {k!r} is not a scalar property of the items")
                    elif key.get("nullable") or (k not in items.get("required", []) and "default" not in key):
                        out.append(f"{path}: map key {k!r} must be required (or defaulted) and not nullable")
        elif "x-kubernetes-list-map-keys" in node:
            out.append(f"{path}.x-kubernetes-list-map-keys: without list-type map")
        if "x-kubernetes-map-type" in node and t != "object":
            out.append(f"{path}.x-kubernetes-map-type: on a non-object")
        if level == "root":
            if t != "object":
                out.append(f"{path}.type: must be object at the root")
            if node.get("nullable"):
                out.append(f"{path}.nullable: not at the root")
            if status_subresource:
                out.extend(f"{path}.{k}: not allowed at the root with the status subresource"
                           for k in set(node) - ROOT_WITH_STATUS)
            meta = node.get("properties", {}).get("metadata")
            if meta is not None:
                if meta.get("type") != "object" or set(meta) - {"type", "properties"} \
                        or set(meta.get("properties", {})) - {"name", "generateName"}:
                    out.append(f"{path}.properties.metadata: may only restrict name and generateName")
            for k in ("apiVersion", "kind"):
                if k in node.get("properties", {}) and node["properties"][k].get("type") != "string":
                    out.append(f"{path}.properties.{k}.type: must be string")
        for k, sub in node.get("properties", {}).items():
            if not (level == "root" and k == "metadata"):
                walk(sub, f"{path}.properties.{k}", "field")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}.items", "item")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.additionalProperties", "field")

    walk(schema, "openAPIV3Schema", "root")
    return out


def test_schemas_are_structural() -> None:
    for doc in crd.crds():
        (version,) = doc["spec"]["versions"]
        assert "status" in version["subresources"]
        assert structural_problems(version["schema"]["openAPIV3Schema"]) == [], doc["metadata"]["name"]


@pytest.mark.parametrize("broken, expected", [
    ({"type": "object", "properties": {"spec": {"properties": {}}}}, "type: must not be empty"),
    ({"type": "object", "properties": {"spec": {"$ref": "#/x"}}}, "$ref: not supported"),
    ({"type": "object", "properties": {"spec": {"type": "integer", "anyOf": [{"type": "integer", "minimum": 1}]}}},
     "must not be set inside a logical junctor"),
    ({"type": "object", "properties": {"spec": {"type": "array"}}}, "items: must be specified"),
    ({"type": "object", "properties": {"spec": {"type": "object", "properties": {"a": {"type": "string"}},
                                                "additionalProperties": {"type": "string"}}}}, "additionalProperties"),
    ({"type": "object", "properties": {"spec": {"type": "array", "x-kubernetes-list-type": "map",
                                                "x-kubernetes-list-map-keys": ["name"], "items": {
                                                    "type": "object", "properties": {"name": {"type": "string"}}}}}},
     "must be required"),
    ({"type": "object", "properties": {"spec": {"type": "array", "uniqueItems": True, "items": {"type": "string"}}}},
     "uniqueItems"),
    ({"type": "object", "properties": {"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}}},
     "may only restrict name"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "at the root"),
    ({"type": "object", "properties": {"spec": {"type": "string", "pattern": "^(?!x)"}}}, "syntax RE2"),
    ({"type": "object", "properties": {"spec": {"x-kubernetes-int-or-string": True,
                                                "anyOf": [{"type": "integer"}, {"type": "boolean"}]}}},
     "exactly anyOf"),
])
def test_the_structural_check_catches_what_the_api_server_refuses(broken: dict[str, Any], expected: str) -> None:
    assert any(expected in p for p in structural_problems(broken)), structural_problems(broken)


def test_status_printer_columns_and_names() -> None:
    site, policy = crd.crds()
    for doc, kind in ((site, KINDS["Site"]), (policy, KINDS["Policy"])):
        spec = doc["spec"]
        assert doc["metadata"]["name"] == f"{kind.plural}.{GROUP}"
        assert spec["scope"] == "Namespaced" and spec["group"] == GROUP
        assert spec["names"]["shortNames"] == list(kind.short_names)
        assert (spec["names"]["plural"], spec["names"]["singular"], spec["names"]["kind"]) == \
            (kind.plural, kind.singular, kind.kind)
        (version,) = spec["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert status["observedGeneration"]["type"] == "integer"
        cond = status["conditions"]
        assert cond["x-kubernetes-list-type"] == "map" and cond["x-kubernetes-list-map-keys"] == ["type"]
        items = cond["items"]
        assert set(items["required"]) == {"type", "status"}
        assert {k: n["type"] for k, n in items["properties"].items()} == {
            "type": "string", "status": "string", "reason": "string", "message": "string",
            "lastTransitionTime": "string", "observedGeneration": "integer"}
        assert items["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
        assert items["properties"]["lastTransitionTime"]["format"] == "date-time"
    site_status = site["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {k: site_status[k]["type"] for k in ("state", "uplinks", "pathsUp", "paths")} == {
        "state": "string", "uplinks": "integer", "pathsUp": "integer", "paths": "integer"}
    pol_status = policy["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert pol_status["currentPath"]["type"] == "string"
    assert pol_status["routes"]["items"]["properties"] == {
        "site": {"type": "string"}, "remoteSite": {"type": "string"}, "path": {"type": "string"}}
    cols = {doc["spec"]["names"]["kind"]: [(c["name"], c["jsonPath"]) for c in doc["spec"]["versions"][0][
        "additionalPrinterColumns"] if c.get("priority", 0) == 0] for doc in (site, policy)}
    ready = '.status.conditions[?(@.type=="Ready")].status'
    assert cols["Site"] == [("Status", ".status.state"), ("Uplinks", ".status.uplinks"),
                            ("Paths-Up", ".status.pathsUp"), ("Ready", ready), ("Age", ".metadata.creationTimestamp")]
    assert cols["Policy"] == [("Priority", ".spec.priority"), ("App", ".spec.app"), ("Path", ".status.currentPath"),
                              ("Ready", ready), ("Age", ".metadata.creationTimestamp")]


# --------------------------------------------------- the schema is the model


def _attrs_fields(cls: type) -> list[str]:
    import attrs
    return [f.name for f in attrs.fields(cls)]


def test_every_model_field_is_in_the_spec_and_required_as_from_dict_requires() -> None:
    site, policy = crd.spec_schema("Site"), crd.spec_schema("Policy")
    uplink = site["properties"]["uplinks"]["items"]
    match, qos = policy["properties"]["match"], policy["properties"]["qos"]
    for cls, node, drop in ((Site, site, {"name"}), (Policy, policy, {"name"}), (Uplink, uplink, set()),
                            (Match, match, set()), (QoS, qos, set())):
        assert list(node["properties"]) == [f for f in _attrs_fields(cls) if f not in drop], cls
    base = {"Site": example("site.yaml")["spec"], "Policy": example("voip-policy.yaml")["spec"]}
    for kind, schema in (("Site", site), ("Policy", policy)):
        for key in schema["properties"]:
            spec = {k: x for k, x in base[kind].items() if k != key}
            missing_rejected = model_error(kind, "n1", spec) is not None
            assert missing_rejected == (key in schema.get("required", [])), (kind, key)
    up = base["Site"]["uplinks"][0]
    for key in uplink["properties"]:
        spec = {**base["Site"], "uplinks": [{k: x for k, x in up.items() if k != key}]}
        assert (model_error("Site", "n1", spec) is not None) == (key in uplink["required"]), key


def test_list_rules_hold_in_the_model() -> None:
    up = {"name": "a", "address": "192.0.2.1"}
    with pytest.raises(ConfigError, match="empty"):
        Site.from_dict({"name": "s", "subnets": [], "uplinks": []})
    with pytest.raises(ConfigError, match="duplicate uplink name"):
        Site.from_dict({"name": "s", "subnets": [], "uplinks": [up, {**up, "address": "192.0.2.2"}]})
    with pytest.raises(ConfigError, match="overlap"):
        Site.from_dict({"name": "s", "subnets": ["10.0.0.0/8", "10.0.0.0/8"], "uplinks": [up]})
    with pytest.raises(ConfigError, match="twice"):
        Policy("p", Match(), priority=1, prefer=["a", "a"])
    site = crd.spec_schema("Site")["properties"]
    assert site["uplinks"]["minItems"] == 1 and site["uplinks"]["x-kubernetes-list-map-keys"] == ["name"]
    assert site["subnets"]["x-kubernetes-list-type"] == "set"
    assert crd.spec_schema("Policy")["properties"]["prefer"]["x-kubernetes-list-type"] == "set"


def _bounded_nodes(node: dict[str, Any], path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    out = []
    if node.get("type") in ("integer", "number") and "minimum" in node:
        out.append((path, node))
    for k, sub in node.get("properties", {}).items():
        out += _bounded_nodes(sub, path + (k,))
    if node.get("type") == "array":
        out += _bounded_nodes(node["items"], path + (0,))
    return out


def _full_specs() -> dict[str, dict[str, Any]]:
    site = example("site.yaml")["spec"]
    site["uplinks"][0].update(port=51820, nat=False, cost=3)
    pol = example("voip-policy.yaml")["spec"]
    pol["match"].update(src="10.2.0.0/24", dst="10.1.0.0/16", src_ports=None, dscp=46)
    pol["qos"]["rate_kbps"] = 512
    return {"Site": site, "Policy": pol}


def _set(spec: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize("kind", ["Site", "Policy"])
def test_every_range_is_the_models_range(kind: str) -> None:
    """The bounds read from the model's converters are the ones it applies:
    each end is accepted and one step past it rejected, by both."""
    base = _full_specs()[kind]
    checked = 0
    for path, node in _bounded_nodes(crd.spec_schema(kind)):
        lo, hi = node["minimum"], node.get("maximum")
        step = 1 if node["type"] == "integer" else 1e-6
        if node.get("exclusiveMinimum"):
            cases = [(lo, False), (lo + step, True)]
        else:
            cases = [(lo, True), (lo - step, False)]
        if hi is not None:
            cases += [(hi, True), (hi + step, False)]
        for value, ok in cases:
            spec = _set(base, path, value)
            schema_ok = not schema_errors(kind, resource(kind, "n1", spec))
            model_ok = model_error(kind, "n1", spec) is None
            assert (schema_ok, model_ok) == (ok, ok), (path, value)
        checked += 1
    assert checked == {"Site": 4, "Policy": 4}[kind]   # mtu port bandwidth cost | dscp priority dscp rate


# ----------------------------------------------------------------- examples


@pytest.mark.parametrize("name, kind", [("site.yaml", "Site"), ("voip-policy.yaml", "Policy")])
def test_examples_pass_the_schema_and_load_in_the_model(name: str, kind: str) -> None:
    doc = example(name)
    assert doc["apiVersion"] == API_VERSION and doc["kind"] == kind
    assert list(OAS30Validator(SCHEMA[kind]).iter_errors(doc)) == []
    assert schema_errors(kind, doc) == []
    obj = MODEL[kind].from_dict({"name": doc["metadata"]["name"], **doc["spec"]})
    assert obj.name == doc["metadata"]["name"]
    if kind == "Site":
        assert len(obj.uplinks) == 2
    else:
        assert obj.qos.dscp == 46 and obj.qos.duplicate and obj.app == "voip" and obj.prefer
        assert obj.match.protos == (17,)


# ------------------------------------------------- invalid resources rejected

SITE = example("site.yaml")
POLICY = example("voip-policy.yaml")


def _mut(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    for k in path[:-1]:
        node = node[k]
    if value is _DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DROP = object()
INVALID: list[tuple[str, str, dict[str, Any], bool]] = [
    # (what, kind, resource, the model rejects it too)
    ("qos dscp 64", "Policy", _mut(POLICY, ("spec", "qos", "dscp"), 64), True),
    ("match dscp 64", "Policy", _mut(POLICY, ("spec", "match", "dscp"), 64), True),
    ("match dscp -1", "Policy", _mut(POLICY, ("spec", "match", "dscp"), -1), True),
    ("uplink port 70000", "Site", _mut(SITE, ("spec", "uplinks", 0, "port"), 70000), True),
    ("uplink port 0", "Site", _mut(SITE, ("spec", "uplinks", 0, "port"), 0), True),
    ("dst port 70000", "Policy", _mut(POLICY, ("spec", "match", "dst_ports"), 70000), True),
    ("dst port '70000'", "Policy", _mut(POLICY, ("spec", "match", "dst_ports"), "70000"), True),
    ("dst range to 70000", "Policy", _mut(POLICY, ("spec", "match", "dst_ports"), "5060-70000"), True),
    ("ports: empty string", "Policy", _mut(POLICY, ("spec", "match", "src_ports"), " "), True),
    ("ports: trailing comma", "Policy", _mut(POLICY, ("spec", "match", "dst_ports"), "5060,"), True),
    ("257 port items", "Policy", _mut(POLICY, ("spec", "match", "dst_ports"), ",".join(["1"] * 257)), True),
    ("ports text too long", "Policy", _mut(POLICY, ("spec", "match", "dst_ports"), "0" * 2049), True),
    ("unknown action", "Policy", _mut(POLICY, ("spec", "action"), "reject"), True),
    ("unknown protocol", "Policy", _mut(POLICY, ("spec", "match", "proto"), "sctp"), True),
    ("protocol 256", "Policy", _mut(POLICY, ("spec", "match", "proto"), 256), True),
    ("protocol -1", "Policy", _mut(POLICY, ("spec", "match", "proto"), -1), True),
    ("protocol list item 300", "Policy", _mut(POLICY, ("spec", "match", "proto"), ["udp", 300]), True),
    ("empty protocol list", "Policy", _mut(POLICY, ("spec", "match", "proto"), []), True),
    ("257 protocols", "Policy", _mut(POLICY, ("spec", "match", "proto"), [17] * 257), True),
    ("protocols 'tcp/'", "Policy", _mut(POLICY, ("spec", "match", "proto"), "tcp/"), True),
    ("site name with '.'", "Site", _mut(SITE, ("metadata", "name"), "branch.1"), True),
    ("site name of 33", "Site", _mut(SITE, ("metadata", "name"), "b" * 33), True),
    ("policy name '-voip'", "Policy", _mut(POLICY, ("metadata", "name"), "-voip"), True),
    ("policy name 'voip\\n'", "Policy", _mut(POLICY, ("metadata", "name"), "voip\n"), True),
    ("uplink name with '~'", "Site", _mut(SITE, ("spec", "uplinks", 0, "name"), "a~b"), True),
    ("prefer a bad name", "Policy", _mut(POLICY, ("spec", "prefer"), ["ok", "no way"]), True),
    ("app a bad name", "Policy", _mut(POLICY, ("spec", "app"), "v o i p"), True),
    ("no uplinks key", "Site", _mut(SITE, ("spec", "uplinks"), _DROP), True),
    ("no subnets key", "Site", _mut(SITE, ("spec", "subnets"), _DROP), True),
    ("uplink without address", "Site", _mut(SITE, ("spec", "uplinks", 0, "address"), _DROP), True),
    ("policy without priority", "Policy", _mut(POLICY, ("spec", "priority"), _DROP), True),
    ("policy without match", "Policy", _mut(POLICY, ("spec", "match"), _DROP), True),
    ("no spec", "Policy", _mut(POLICY, ("spec",), _DROP), True),
    ("no uplinks", "Site", _mut(SITE, ("spec", "uplinks"), []), True),
    ("two uplinks named alike", "Site",
     _mut(SITE, ("spec", "uplinks", 1, "name"), SITE["spec"]["uplinks"][0]["name"]), True),
    ("a subnet twice", "Site", _mut(SITE, ("spec", "subnets"), ["10.2.0.0/24", "10.2.0.0/24"]), True),
    ("an uplink preferred twice", "Policy", _mut(POLICY, ("spec", "prefer"), ["lte", "lte"]), True),
    ("prefix /33", "Site", _mut(SITE, ("spec", "subnets", 0), "10.2.0.0/33"), True),
    ("prefix /129", "Site", _mut(SITE, ("spec", "subnets", 1), "fd00:2::/129"), True),
    ("octet 300", "Site", _mut(SITE, ("spec", "subnets", 0), "10.2.300.0/24"), True),
    ("not a CIDR", "Policy", _mut(POLICY, ("spec", "match", "src"), "branch1"), True),
    ("address 300.1.1.1", "Site", _mut(SITE, ("spec", "uplinks", 0, "address"), "300.1.1.1"), True),
    ("address with a leading zero", "Site", _mut(SITE, ("spec", "uplinks", 0, "address"), "198.51.100.010"), True),
    ("address 1:2:3:4:5:6:7:8:9", "Site", _mut(SITE, ("spec", "uplinks", 0, "address"), "1:2:3:4:5:6:7:8:9"), True),
    ("mtu 575", "Site", _mut(SITE, ("spec", "uplinks", 0, "mtu"), 575), True),
    ("cost -1", "Site", _mut(SITE, ("spec", "uplinks", 0, "cost"), -1), True),
    ("bandwidth 0", "Site", _mut(SITE, ("spec", "uplinks", 0, "bandwidth_mbps"), 0), True),
    ("nat 'yes'", "Site", _mut(SITE, ("spec", "uplinks", 0, "nat"), "yes"), True),
    ("priority 2**31", "Policy", _mut(POLICY, ("spec", "priority"), 2**31), True),
    ("priority '10'", "Policy", _mut(POLICY, ("spec", "priority"), "10"), True),
    ("rate 0", "Policy", _mut(POLICY, ("spec", "qos", "rate_kbps"), 0), True),
    ("duplicate 1", "Policy", _mut(POLICY, ("spec", "qos", "duplicate"), 1), True),
    ("match a list", "Policy", _mut(POLICY, ("spec", "match"), ["udp"]), True),
    # bounds of the schema's own (the model has none): inputs stay bounded
    ("too many subnets", "Site",
     _mut(SITE, ("spec", "subnets"), [f"10.{i // 256}.{i % 256}.0/24" for i in range(crd.MAX_SUBNETS + 1)]), False),
    ("too many uplinks", "Site", _mut(SITE, ("spec", "uplinks"), [
        {"name": f"u{i}", "address": f"192.0.2.{i + 1}"} for i in range(crd.MAX_UPLINKS + 1)]), False),
    ("too many preferred", "Policy", _mut(POLICY, ("spec", "prefer"), [f"u{i}" for i in range(crd.MAX_PREFER + 1)]),
     False),
    ("a long address zone", "Site", _mut(SITE, ("spec", "uplinks", 0, "address"), "fe80::1%" + "e" * 60), False),
]


@pytest.mark.parametrize("what, kind, res, model_rejects", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_resources_are_rejected(what: str, kind: str, res: dict[str, Any], model_rejects: bool) -> None:
    assert schema_errors(kind, res), what
    if "spec" in res:
        assert (model_error(kind, res["metadata"]["name"], res["spec"]) is not None) == model_rejects, what


def test_valid_variants_are_accepted() -> None:
    """Forms the model takes and the schema must take too."""
    ok = [
        ("Policy", ("spec", "match", "dst_ports"), 53), ("Policy", ("spec", "match", "dst_ports"), " 53 - 54 ,80"),
        ("Policy", ("spec", "match", "dst_ports"), "00053"), ("Policy", ("spec", "match", "proto"), "TCP/udp"),
        ("PolicyNP", ("spec", "match", "proto"), [6, "udp", " 132 "]), ("Policy", ("spec", "match", "proto"), "6,17"),
        ("PolicyNP", ("spec", "match", "proto"), 0), ("PolicyNP", ("spec", "match", "proto"), "007"),
        ("PolicyNP", ("spec", "match", "proto"), "ICMPv6, 1"),
        ("Policy", ("spec", "qos"), None), ("Policy", ("spec", "match", "src"), "::/0"),
        ("Policy", ("spec", "match", "src"), "fe80::%eth0/64"), ("Policy", ("spec", "prefer"), []),
        ("Policy", ("metadata", "name"), "v" * 32), ("Policy", ("metadata", "name"), "a.b-c_d"),
        ("Site", ("spec", "uplinks", 0, "address"), "fe80::1%eth0"),
        ("Site", ("spec", "uplinks", 0, "address"), "::ffff:192.0.2.1"),
        ("Site", ("spec", "uplinks", 0, "address"), "2001:DB8::1"),
        ("Site", ("spec", "uplinks", 0, "bandwidth_mbps"), 0.001), ("Site", ("spec", "subnets"), []),
        ("Site", ("spec", "uplinks", 0, "port"), None),
    ]
    no_ports = _mut(POLICY, ("spec", "match", "dst_ports"), _DROP)
    for base, path, value in ok:
        kind = base[:-2] if base.endswith("NP") else base
        res = _mut({"Site": SITE, "Policy": POLICY, "PolicyNP": no_ports}[base], path, value)
        assert schema_errors(kind, res) == [], (path, value)
        assert model_error(kind, res["metadata"]["name"], res["spec"]) is None, (path, value)


# --------------------------------------------------------------- properties

long_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{20,31}", fullmatch=True)
long_endpoint_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{20,31}", fullmatch=True)
any_names = st.one_of(names, long_names)
any_endpoint_names = st.one_of(endpoint_names, long_endpoint_names)
scoped = st.builds(lambda a, z: f"{a}%{z}", st.ip_addresses(v=6).map(str),
                   st.from_regex(r"[a-z0-9]{1,15}", fullmatch=True))
any_addresses = st.one_of(addresses, scoped)
port_items = st.one_of(st.integers(0, 65535), st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(
    lambda t: (min(t), max(t))))
port_inputs = st.one_of(st.none(), st.integers(0, 65535),
                        port_items.map(lambda x: x if isinstance(x, tuple) else (x, x)),
                        st.lists(port_items, min_size=1, max_size=20))
proto_any = st.one_of(st.integers(0, 255), st.sampled_from(sorted(v.PROTOCOLS)))


@st.composite
def uplinks(draw: Any, name: Any = None) -> Uplink:
    return Uplink(name or draw(any_endpoint_names), draw(any_addresses), mtu=draw(st.integers(576, 65535)),
                  port=draw(st.one_of(st.none(), st.integers(1, 65535))), nat=draw(st.booleans()),
                  bandwidth_mbps=draw(st.one_of(st.none(), st.floats(0, 1e9, exclude_min=True),
                                                st.integers(1, 10**6))),
                  cost=draw(st.integers(0, 1_000_000)))


@st.composite
def sites(draw: Any) -> Site:
    nets: list[str] = []
    for n in draw(st.lists(networks(), max_size=6)):
        net = ipaddress.ip_network(n)
        if all(net.version != ipaddress.ip_network(o).version or not net.overlaps(ipaddress.ip_network(o))
               for o in nets):
            nets.append(n)
    up_names = draw(st.lists(any_endpoint_names, min_size=1, max_size=5, unique=True))
    return Site(draw(any_endpoint_names), subnets=nets, uplinks=[draw(uplinks(n)) for n in up_names])


@st.composite
def matches(draw: Any) -> Match:
    fam = draw(st.sampled_from([4, 6]))
    src = draw(st.one_of(st.none(), networks(fam)))
    dst = draw(st.one_of(st.none(), networks(fam)))
    sp, dp = draw(port_inputs), draw(port_inputs)
    if sp is not None or dp is not None:
        proto = draw(st.one_of(st.none(), st.sampled_from(["tcp", "udp", 6, 17, "tcp/udp", [17, "tcp"]])))
    else:
        proto = draw(st.one_of(st.none(), proto_any, st.lists(proto_any, min_size=1, max_size=8)))
    return Match(src=src, dst=dst, src_ports=sp, dst_ports=dp, proto=proto,
                 dscp=draw(st.one_of(st.none(), st.integers(0, 63))))


@st.composite
def policies(draw: Any) -> Policy:
    qos = QoS(dscp=draw(st.one_of(st.none(), st.integers(0, 63))),
              rate_kbps=draw(st.one_of(st.none(), st.integers(1, 100_000_000))), duplicate=draw(st.booleans()))
    return Policy(draw(any_names), draw(matches()), priority=draw(st.integers(0, 2**31 - 1)),
                  app=draw(st.one_of(st.sampled_from(["default", "voip", "video", "bulk"]), any_names)), qos=qos,
                  prefer=draw(st.lists(any_names, max_size=crd.MAX_PREFER, unique=True)),
                  action=draw(st.sampled_from(["forward", "drop"])))


def _spec(obj: Site | Policy) -> tuple[str, dict[str, Any]]:
    d = obj.to_dict()
    return d.pop("name"), d


@SETTINGS
@given(sites())
def test_the_schema_takes_every_site_the_model_builds(site: Site) -> None:
    name, spec = _spec(site)
    res = resource("Site", name, json.loads(json.dumps(spec)))
    assert schema_errors("Site", res) == []


@SETTINGS
@given(policies())
def test_the_schema_takes_every_policy_the_model_builds(policy: Policy) -> None:
    name, spec = _spec(policy)
    res = resource("Policy", name, json.loads(json.dumps(spec)))
    assert schema_errors("Policy", res) == []


# What the schema accepts and the model refuses: the gaps the module's
# docstring lists, each with the ConfigError reason the model gives.
GAPS: dict[str, tuple[str, str]] = {
    "host bits": (r"Site\.subnets|Match\.(src|dst)", "has host bits set"),
    "overlapping subnets": (r"Site\.subnets", "overlap"),
    "address families": (r"Match\.dst", "is not of the address family"),
    "tcp/udp": (r"Match\.proto", "cannot be combined with ports"),
    "lo > hi": (r"Match\.(src|dst)_ports", "has lo > hi"),
    "proto neither a number, a string nor a list; fractional": (r"Match\.proto",
                                                                r"is not an integer in \[0, 255\]"),
}


def test_the_gaps_are_documented() -> None:
    doc = crd.__doc__ or ""
    for words in ("host bits", "overlapping", "address families", "tcp/udp", "lo > hi", "fractional",
                  "another JSON type", "profile the mesh", "cross-object"):
        assert words in doc, words


def _is_gap(err: ConfigError) -> bool:
    return any(re.fullmatch(field, err.field) and re.search(reason, err.reason) for field, reason in GAPS.values())


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if path else []
    if isinstance(value, dict):
        for k, x in value.items():
            out += _leaves(x, path + (k,))
    elif isinstance(value, list):
        for i, x in enumerate(value):
            out += _leaves(x, path + (i,))
    return out


FULL = _full_specs()
LEAVES = {k: _leaves(s) for k, s in FULL.items()}
text_for_fields = st.text(alphabet="0123456789abcdefABCDEF:./%-, tcpudimvTCPUDIMV6_~\n", max_size=24)
hostile = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2**40), 2**40),
    st.sampled_from([63, 64, 255, 256, 575, 576, 65535, 65536, 2**31 - 1, 2**31, 100_000_000, 100_000_001]),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    text_for_fields, st.sampled_from(["10.0.0.1/8", "10.0.0.0/8", "fd00::/8", "fe80::%eth0/64", "192.0.2.1",
                                      "::1", "5060-5061", "20-10", "tcp/udp", "icmp", "forward", "drop", "voip"]),
    st.lists(st.one_of(st.integers(-1, 300), st.sampled_from(["udp", "tcp", "x", "10.0.0.0/8"])), max_size=4),
    st.just({}),
)


@SETTINGS
@given(st.sampled_from(["Site", "Policy"]), st.data())
def test_what_the_schema_accepts_the_model_accepts_but_for_the_listed_gaps(kind: str, data: Any) -> None:
    path = data.draw(st.sampled_from(LEAVES[kind]))
    value = data.draw(hostile)
    spec = _set(FULL[kind], path, value)
    res = resource(kind, "n1", spec)
    if schema_errors(kind, res):
        return
    err = model_error(kind, "n1", spec)
    assert err is None or _is_gap(err), (path, value, err)


# Field by field: a pattern against the model's converter, both directions.


def _node_ok(node: dict[str, Any], value: Any) -> bool:
    return KubeValidator(node).is_valid(value)


NODES = {
    "name": crd.spec_schema("Policy")["properties"]["app"],
    "endpoint": crd.spec_schema("Site")["properties"]["uplinks"]["items"]["properties"]["name"],
    "address": crd.spec_schema("Site")["properties"]["uplinks"]["items"]["properties"]["address"],
    "cidr": crd.spec_schema("Policy")["properties"]["match"]["properties"]["src"],
    "ports": crd.spec_schema("Policy")["properties"]["match"]["properties"]["dst_ports"],
    "proto": crd.spec_schema("Policy")["properties"]["match"]["properties"]["proto"],
}


def _accepts(convert: Callable[[Any], Any], value: Any) -> ConfigError | None:
    try:
        convert(value)
    except ConfigError as e:
        return e
    return None


@SETTINGS
@given(st.text(alphabet="aZ09_.-~ \n\u00e9", max_size=36))
def test_name_patterns_are_the_models_names(text: str) -> None:
    assert _node_ok(NODES["name"], text) == (_accepts(lambda x: v.name("f", x), text) is None)
    assert _node_ok(NODES["endpoint"], text) == (_accepts(lambda x: v.endpoint_name("f", x), text) is None)


@st.composite
def address_texts(draw: Any) -> str:
    """IP address spellings: every RFC 4291 form, then maybe one character changed."""
    if draw(st.booleans()):
        text = str(draw(st.ip_addresses(v=4)))
    else:
        a = draw(st.ip_addresses(v=6))
        form = draw(st.sampled_from(["compressed", "exploded", "v4tail", "nozeros"]))
        if form == "exploded":
            text = a.exploded
        elif form == "v4tail":
            groups = a.exploded.split(":")
            text = ":".join(groups[:6]) + ":" + str(ipaddress.IPv4Address(int(a) & 0xFFFFFFFF))
            text = str(ipaddress.IPv6Address(text)) if draw(st.booleans()) else text
        elif form == "nozeros":
            text = ":".join(g.lstrip("0") or "0" for g in a.exploded.split(":"))
        else:
            text = a.compressed
        if draw(st.booleans()):
            text = text.upper()
    if draw(st.booleans()) and text:
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from(list("0123456789aF:.%/ "))) + text[i + 1:]
    return text


@SETTINGS
@given(address_texts(), st.integers(-1, 130), st.booleans())
def test_address_and_cidr_patterns_are_ipaddress(text: str, plen: int, scope: bool) -> None:
    if scope:
        text += "%eth0"
    assert _node_ok(NODES["address"], text) == (_accepts(lambda x: v.address("f", x), text) is None), text
    cidr = f"{text}/{plen}"
    schema_ok = _node_ok(NODES["cidr"], cidr)
    model = _accepts(lambda x: v.network("f", x), cidr)
    if schema_ok:   # schema => model, but for host bits
        assert model is None or "host bits" in model.reason, cidr
    elif model is None:   # model => schema, but for the spellings the schema leaves out
        assert plen < 0 or re.search(r"/0[0-9]", cidr), cidr


def test_cidr_spellings_the_schema_leaves_out() -> None:
    for text in ("10.0.0.0", "10.0.0.0/255.0.0.0", "10.0.0.0/024"):
        assert v.network("f", text)
        assert not _node_ok(NODES["cidr"], text)


@SETTINGS
@given(st.text(alphabet="0123456789-, \t", max_size=30))
def test_port_pattern_is_the_models_port_grammar(text: str) -> None:
    model = _accepts(lambda x: v.ports("f", x), text)
    if _node_ok(NODES["ports"], text):
        assert model is None or "lo > hi" in model.reason, text
    else:
        assert model is not None, text


@SETTINGS
@given(st.one_of(st.text(alphabet="tcpudimvTCPUDIMV60123456789/, ", max_size=16),
                 st.lists(st.one_of(st.integers(-2, 300), st.text(alphabet="tcpudimv6 0129", max_size=8)),
                          max_size=5)))
def test_protocol_schema_is_the_models_protocol_grammar(value: Any) -> None:
    model = _accepts(lambda x: v.protocols("f", x), value)
    assert _node_ok(NODES["proto"], value) == (model is None), value


def test_number_grammar_helper_is_exact() -> None:
    for hi, padded in ((255, False), (255, True), (65535, True), (32, False), (128, False), (9, False)):
        rx = re.compile(f"^{crd._decimal(hi, padded=padded)}$")
        for n in range(0, hi + 1200):
            texts = [str(n)] + ([str(n).zfill(len(str(hi)))] if padded else [])
            for t in texts:
                want = n <= hi and len(t) <= len(str(hi)) and (padded or t == str(n))
                assert bool(rx.match(t)) == want, (hi, padded, t)
        if not padded:
            assert not rx.match("0" + str(hi))


def test_an_unknown_converter_is_a_named_error() -> None:
    with pytest.raises(crd.CRDError, match=r"X\.y: the converter v\.mystery"):
        crd._scalar(crd._Rule("mystery"), "X.y")
    import ast
    with pytest.raises(crd.CRDError, match="X.y: 'f\\(1\\)' is not a constant"):
        crd._literal(ast.parse("f(1)", mode="eval").body, "X.y")
    assert math.isinf(crd._literal(ast.parse("math.inf", mode="eval").body, "X.y"))
