"""Regenerate raycluster.schema.json and rayjob.schema.json from KubeRay's real CRDs.

The manifests in docker/kuberay/ are checked (tests/test_deploy.py) against the ray.io/v1
openAPIV3Schema that KubeRay itself ships, so that a field KubeRay accepts is never rejected
and a field it rejects is never accepted. The CRDs are ~1 MB of YAML each; this script keeps
what validation needs and writes it as plain JSON Schema (draft 2020-12):

* only the served, storage version v1; `description` and `default` text dropped;
* what the API server does with a CRD schema, made explicit for a generic validator:
  an object with `properties` and no `additionalProperties` / `x-kubernetes-preserve-unknown-fields`
  rejects other fields (kubectl's default `--validate=strict`), `nullable` admits null,
  `x-kubernetes-int-or-string` is integer-or-string, a `required` field that has a `default`
  is not required (defaulting runs before validation);
* `metadata` is not in the CRD schema (the API server validates ObjectMeta itself); KubeRay's
  controller rejects a name that is not a DNS-1035 label, or longer than 53 characters for a
  RayCluster and 47 for a RayJob (ray-operator/controllers/ray/utils/validation.go,
  constant.go MaxRayClusterNameLength / MaxRayJobNameLength): added here as a metadata schema;
* CEL rules (`x-kubernetes-validations`) are not translated; their number is recorded;
* repeated subtrees (the PodSpec of head, workers and submitter, containers, probes...) are
  stored once under `$defs` and referenced, which keeps the files small.

Usage, with a clone of https://github.com/ray-project/kuberay:
    python docker/kuberay/schema/vendor_crds.py --git-dir /path/to/kuberay/.git [--rev <commit>]
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {
    "raycluster": ("ray-operator/config/crd/bases/ray.io_rayclusters.yaml", "RayCluster", 53),
    "rayjob": ("ray-operator/config/crd/bases/ray.io_rayjobs.yaml", "RayJob", 47),
}
DNS1035_LABEL = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
DROP = {"description", "default", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type"}
MIN_SHARED_CHARS = 200  # subtrees smaller than this stay inline


def k8s_to_jsonschema(node, counts: dict):
    """One CRD schema node -> JSON Schema with the API server's semantics spelled out."""
    if isinstance(node, list):
        return [k8s_to_jsonschema(v, counts) for v in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "x-kubernetes-validations" in node:
        counts["cel_rules"] += len(node.pop("x-kubernetes-validations"))
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    int_or_string = node.pop("x-kubernetes-int-or-string", False)
    nullable = node.pop("nullable", False)
    props = node.get("properties", {})
    if "required" in node:
        node["required"] = [r for r in node["required"] if "default" not in props.get(r, {})]
        if not node["required"]:
            del node["required"]
    out = {}
    for key, value in node.items():
        if key in DROP:
            continue
        if key == "properties":
            out[key] = {name: k8s_to_jsonschema(sub, counts) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            out[key] = k8s_to_jsonschema(value, counts)
        else:
            out[key] = value
    if int_or_string and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if out.get("type") == "object" and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if nullable and "type" in out:
        out["type"] = sorted(set([out["type"]] if isinstance(out["type"], str) else out["type"]) | {"null"})
    return out


def dedupe(schema: dict) -> dict:
    """Move every repeated subtree (largest first) to $defs, replacing it by a $ref."""
    schema = copy.deepcopy(schema)
    defs: dict = {}
    names: dict[str, str] = {}

    def walk(node, key, seen):
        if isinstance(node, dict):
            if "$ref" not in node:
                text = json.dumps(node, sort_keys=True)
                if len(text) >= MIN_SHARED_CHARS:
                    seen.setdefault(text, []).append(key)
            for k, v in node.items():
                if k == "properties":
                    for name, sub in v.items():
                        walk(sub, name, seen)
                elif k in ("items", "additionalProperties"):
                    walk(v, key, seen)
                elif k in ("anyOf", "allOf", "oneOf"):
                    for sub in v:
                        walk(sub, key, seen)
        return seen

    def replace(node, text, ref):
        if isinstance(node, dict):
            if json.dumps(node, sort_keys=True) == text:
                return {"$ref": ref}
            return {k: replace(v, text, ref) for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v, text, ref) for v in node]
        return node

    while True:
        seen = walk(schema, "root", {})
        for body in defs.values():
            walk(body, "def", seen)
        repeated = [(len(t), t, keys) for t, keys in seen.items() if len(keys) > 1]
        if not repeated:
            break
        _, text, keys = max(repeated)
        base = keys[0][:1].upper() + keys[0][1:]
        name, i = base, 2
        while name in defs:
            name, i = f"{base}{i}", i + 1
        ref = f"#/$defs/{name}"
        names[text] = name
        schema = replace(schema, text, ref)
        defs = {k: replace(v, text, ref) for k, v in defs.items()}
        defs[name] = json.loads(text)
    if defs:
        schema["$defs"] = dict(sorted(defs.items()))
    return schema


def vendor(crd_text: str, kind: str, max_name: int, source: str) -> dict:
    crd = yaml.safe_load(crd_text)
    assert crd["spec"]["names"]["kind"] == kind, crd["spec"]["names"]
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    counts = {"cel_rules": 0}
    body = k8s_to_jsonschema(v1["schema"]["openAPIV3Schema"], counts)
    body["properties"].pop("status", None)  # written by the operator, never by a manifest
    body["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    body["properties"]["kind"] = {"const": kind}
    body["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": DNS1035_LABEL, "maxLength": max_name},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    body["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"Generated by docker/kuberay/schema/vendor_crds.py from {source} (ray.io/v1 openAPIV3Schema). "
            f"metadata.name: DNS-1035 label of at most {max_name} characters (KubeRay validation.go). "
            f"{counts['cel_rules']} CEL rules (x-kubernetes-validations) not translated. Do not edit by hand."
        ),
        "title": f"{kind} ray.io/v1",
    }
    schema.update(body)
    return dedupe(schema)


def dumps(schema: dict) -> str:
    """Compact JSON, one top-level key and one shared definition per line (small, diffable)."""
    compact = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731
    lines = [f" {json.dumps(k)}: {compact(v)}" for k, v in schema.items() if k != "$defs"]
    defs = [f"  {json.dumps(k)}: {compact(v)}" for k, v in schema.get("$defs", {}).items()]
    if defs:
        lines.append(' "$defs": {\n' + ",\n".join(defs) + "\n }")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--git-dir", required=True, help="a kuberay clone's .git directory")
    parser.add_argument("--rev", default="HEAD", help="kuberay commit to read (default HEAD)")
    args = parser.parse_args()
    git = ["git", f"--git-dir={args.git_dir}"]
    commit = subprocess.run(git + ["rev-parse", args.rev], check=True, capture_output=True, text=True).stdout.strip()
    for name, (path, kind, max_name) in CRDS.items():
        text = subprocess.run(git + ["show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout
        schema = vendor(text, kind, max_name, f"ray-project/kuberay@{commit}:{path}")
        out = HERE / f"{name}.schema.json"
        out.write_text(dumps(schema))
        print(f"{out}: {out.stat().st_size} bytes, {len(schema.get('$defs', {}))} shared definitions")


if __name__ == "__main__":
    main()
