#!/usr/bin/env python3
"""Validate the Kubernetes manifests of envoy/istio/ and envoy/envoy-gateway/
against the CRD schemas their projects publish. No CRD is kept in this
repository: the schemas come from outside, in one of two ways.

  validate-crds.py --crds DIR [--crds DIR ...] MANIFEST_DIR ...
      Schemas from CRD YAML files (any number per file, e.g. Istio's
      crd-all.gen.yaml, Envoy Gateway's generated CRDs, Gateway API's
      standard channel). Every served version's openAPIV3Schema is turned
      into a JSON Schema and checked with Python's jsonschema (pip install
      jsonschema==4.26.0 pyyaml==6.0.3). A document of a group the CRDs
      define whose kind or version they do not define is an error.

  validate-crds.py --registry MANIFEST_DIR ...
      Schemas from the npm registry: @kubernetes-models/istio (generated from
      Istio's crd-all.gen.yaml) and @kubernetes-models/gateway-api, whose
      validators run in node (scripts/validate-crds.mjs). No npm package
      carries Envoy Gateway's CRDs, so gateway.envoyproxy.io kinds are listed
      as not validated in this mode.

What neither mode checks: CEL rules (x-kubernetes-validations), which only
an API server evaluates, and core kinds (Namespace, ServiceAccount, Job),
which have no CRD. The exit status is non-zero on any invalid document.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
NPM_DIR = ROOT / ".tools" / "crd-models"
# Pinned: the Istio models are generated from Istio 1.29.2's CRDs.
NPM_PACKAGES = [
    "@kubernetes-models/istio@3.0.1",
    "@kubernetes-models/gateway-api@2.0.0",
    "yaml@2.9.1",
]
CORE_GROUPS = {"", "apps", "batch", "policy", "rbac.authorization.k8s.io"}


def documents(dirs: list[str]):
    for d in dirs:
        for path in sorted(pathlib.Path(d).rglob("*.yaml")):
            with open(path, encoding="utf-8") as f:
                for index, doc in enumerate(yaml.safe_load_all(f)):
                    if doc:
                        yield path, index, doc


def to_json_schema(node):
    """An OpenAPI v3 structural schema as a JSON Schema with the API server's
    strict field validation: unknown fields are errors where the schema does
    not preserve them (kubectl apply validates strictly by default)."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format", "description"):
            continue
        out[key] = to_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = out.get("anyOf", []) + [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schemas(dirs: list[str]):
    schemas, groups = {}, set()
    for d in dirs:
        for path in sorted(pathlib.Path(d).rglob("*.yaml")):
            with open(path, encoding="utf-8") as f:
                for doc in yaml.safe_load_all(f):
                    if not doc or doc.get("kind") != "CustomResourceDefinition":
                        continue
                    spec = doc["spec"]
                    groups.add(spec["group"])
                    for version in spec["versions"]:
                        if not version.get("served", True):
                            continue
                        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                        # apiVersion, kind and metadata are the API server's, not the
                        # CRD's (Istio's CRDs do not list them).
                        top = schema.setdefault("properties", {})
                        top["metadata"] = {"type": "object"}
                        top["apiVersion"] = {"type": "string"}
                        top["kind"] = {"type": "string"}
                        key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                        schemas[key] = to_json_schema(schema)
    return schemas, groups


def validate_with_crds(crd_dirs: list[str], manifest_dirs: list[str]) -> int:
    import jsonschema

    schemas, groups = crd_schemas(crd_dirs)
    print(f"{len(schemas)} kind/version schemas from {len(groups)} groups")
    passed = failed = skipped = 0
    for path, index, doc in documents(manifest_dirs):
        api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        group = api.rsplit("/", 1)[0] if "/" in api else ""
        name = f"{path}#{index} {kind} {doc.get('metadata', {}).get('name', '')}"
        schema = schemas.get((api, kind))
        if schema is None:
            if group in CORE_GROUPS or group not in groups:
                print(f"skip  {name} ({api}: no CRD)")
                skipped += 1
            else:
                print(f"FAIL  {name}: {api} {kind} is not a kind these CRDs serve")
                failed += 1
            continue
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
        )
        if errors:
            failed += 1
            for e in errors:
                print(f"FAIL  {name}: {'/'.join(map(str, e.path))}: {e.message}")
        else:
            passed += 1
            print(f"ok    {name}")
    print(f"crd schemas: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


def validate_with_registry(manifest_dirs: list[str]) -> int:
    stamp = NPM_DIR / (".installed-" + "-".join(p.replace("/", "_") for p in NPM_PACKAGES))
    if not stamp.exists():
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        (NPM_DIR / "package.json").write_text('{"private": true, "type": "module"}\n')
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(NPM_DIR)]
            + NPM_PACKAGES,
            check=True,
        )
        stamp.touch()
    env = dict(os.environ, NODE_PATH=str(NPM_DIR / "node_modules"))
    script = ROOT / "scripts" / "validate-crds.mjs"
    return subprocess.run(
        ["node", str(script), str(NPM_DIR / "node_modules"), *manifest_dirs], env=env
    ).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crds", action="append", default=[], help="a directory of CRD YAML files")
    parser.add_argument("--registry", action="store_true", help="validate with npm packages")
    parser.add_argument("manifests", nargs="+", help="directories of manifests (*.yaml)")
    args = parser.parse_args()
    if args.registry == bool(args.crds):
        parser.error("give either --crds DIR (one or more) or --registry")
    if args.registry:
        return validate_with_registry(args.manifests)
    return validate_with_crds(args.crds, args.manifests)


if __name__ == "__main__":
    sys.exit(main())
