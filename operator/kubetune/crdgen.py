"""Typed API models -> structural CustomResourceDefinitions.

Pydantic's JSON schema is not a Kubernetes structural schema: it emits `$ref`/`$defs`,
`anyOf [X, null]` for optionals, `additionalProperties: false`, numeric `exclusiveMinimum`, `title`s
and `default: null`. `_structural` fixes exactly those. Written here rather than taken from
azimuth-cloud's kube-custom-resource because that library brings its own model base classes and
runtime; we only need this one pure transformation of the schema pydantic already produces.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api.v1alpha1 import finetunejob, modelserver
from kubetune.api.v1alpha1.base import GROUP, VERSION

_DROP = {"title", "discriminator"}
CHART_CRD_DIR = Path("charts") / "kubetune" / "templates" / "crds"


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        merged = {**_inline(target, defs), **_inline(extra, defs)}
        return merged
    return {k: _inline(v, defs) for k, v in node.items()}


def _structural(node: Any) -> Any:
    """Rewrite one (inlined) pydantic schema node into a Kubernetes structural schema node."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for variant in ("anyOf", "oneOf"):
        if variant in node:
            options = [o for o in node.pop(variant) if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"only Optional[X] unions are supported, got {options}")
            node = {**options[0], **node}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
    if node.get("default", 0) is None:
        node.pop("default")
    for key in _DROP:
        node.pop(key, None)
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[inclusive] = node[bound]
            node[bound] = True
    if node.get("type") == "object":
        extra = node.get("additionalProperties")
        if extra is False:
            node.pop("additionalProperties")
        elif extra is True or (isinstance(extra, dict) and not extra):
            node.pop("additionalProperties")
            node["x-kubernetes-preserve-unknown-fields"] = True
        if "properties" not in node and "additionalProperties" not in node:
            node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") is None:
        node["type"] = "object"
    if "required" in node and not node["required"]:
        node.pop("required")
    return {k: _structural(v) if isinstance(v, dict | list) else v for k, v in node.items()}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    structural: dict[str, Any] = _structural(_inline(raw, defs))
    return structural


def _resource_schema(spec: type[BaseModel], status: type[BaseModel], doc: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": doc,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            "metadata": {"type": "object"},
            "spec": schema_of(spec),
            "status": schema_of(status),
        },
    }


def _crd(
    kind: str,
    plural: str,
    short: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _col(name: str, path: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "jsonPath": path, **extra}


AGE = _col("Age", ".metadata.creationTimestamp", "date")


def finetunejob_crd() -> dict[str, Any]:
    schema = _resource_schema(
        finetunejob.FineTuneJobSpec,
        finetunejob.FineTuneJobStatus,
        "FineTuneJob fine-tunes a model on a dataset with the GPUs it asks for, and leaves the "
        "result, packaged for Triton, where spec.output says.",
    )
    unchanged = " && ".join(
        f"((has(self.spec.{f}) && has(oldSelf.spec.{f})) ? self.spec.{f} == oldSelf.spec.{f} "
        f": has(self.spec.{f}) == has(oldSelf.spec.{f}))"
        for f in finetunejob.IMMUTABLE_AFTER_START
    )
    schema["x-kubernetes-validations"] = [
        {
            "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) || "
            "(self.spec.resources.nodes == oldSelf.spec.resources.nodes && "
            "self.spec.resources.gpusPerNode == oldSelf.spec.resources.gpusPerNode && "
            f"{unchanged})",
            "message": "the training spec (model, dataset, task, method, lora, hyperparameters, "
            "output, resources.nodes, resources.gpusPerNode) is immutable once the job has "
            "started; create a new FineTuneJob instead",
        }
    ]
    return _crd(
        finetunejob.KIND,
        finetunejob.PLURAL,
        "ftj",
        schema,
        [
            _col("Phase", ".status.phase"),
            _col("Progress", ".status.progressText"),
            _col("Loss", ".status.progress.loss", "number"),
            _col("GPUs", ".status.gpus", "integer"),
            _col("Model", ".spec.model.source", priority=1),
            _col("Reason", ".status.failureReason", priority=1),
            AGE,
        ],
        {"status": {}},
    )


def modelserver_crd() -> dict[str, Any]:
    schema = _resource_schema(
        modelserver.ModelServerSpec,
        modelserver.ModelServerStatus,
        "ModelServer serves a model with NVIDIA Triton Inference Server: a Deployment with GPU "
        "requests, a Service, autoscaling on Triton's load signals, and a status that says Ready "
        "only when the model answers.",
    )
    return _crd(
        modelserver.KIND,
        modelserver.PLURAL,
        "ms",
        schema,
        [
            _col("Phase", ".status.phase"),
            _col("Ready", ".status.readyText"),
            _col("Model", ".status.modelName"),
            _col("Endpoint", ".status.endpoints.http"),
            AGE,
        ],
        {
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
    )


def all_crds() -> dict[str, dict[str, Any]]:
    return {"finetunejob.yaml": finetunejob_crd(), "modelserver.yaml": modelserver_crd()}


HEADER = "# GENERATED by `make crds` from operator/kubetune/api/v1alpha1 - do not edit.\n"


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)


def render_chart_template(crd: dict[str, Any]) -> str:
    """The chart's copy: behind `crds.enabled`, kept on uninstall when `crds.keep`."""
    body = yaml.safe_dump(crd, sort_keys=False, width=100)
    keep = (
        "  annotations:\n"
        "    {{- if .Values.crds.keep }}\n"
        "    helm.sh/resource-policy: keep\n"
        "    {{- end }}\n"
    )
    body = body.replace("metadata:\n", "metadata:\n" + keep, 1)
    return HEADER + "{{- if .Values.crds.enabled }}\n" + body + "{{- end }}\n"


def write_crds(out: Path, chart_dir: Path | None = CHART_CRD_DIR) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, crd in all_crds().items():
        path = out / name
        path.write_text(render(crd))
        written.append(path)
        if chart_dir is not None and chart_dir.parent.exists():
            chart_dir.mkdir(exist_ok=True)
            chart_path = chart_dir / name
            chart_path.write_text(render_chart_template(crd))
            written.append(chart_path)
    return written
