"""The committed CRDs are exactly what the typed API generates, and they are structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.crdgen import all_crds, render, render_chart_template

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_committed_crds_match_the_models(name: str) -> None:
    committed = (REPO / "crds" / name).read_text()
    assert committed == render(all_crds()[name]), f"crds/{name} is stale: run `make crds`"


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_chart_crds_match_the_models(name: str) -> None:
    committed = (REPO / "charts" / "kubetune" / "templates" / "crds" / name).read_text()
    assert committed == render_chart_template(all_crds()[name]), (
        "chart CRDs are stale: run `make crds`"
    )


def _walk(node: Any, path: str = "") -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title"}:
                found.append((path, key))
            if key == "default" and value is None:
                found.append((path, "default: null"))
            if key == "additionalProperties" and value is False:
                found.append((path, "additionalProperties: false"))
            found.extend(_walk(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for item in node:
            found.extend(_walk(item, path))
    return found


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_schemas_are_structural(name: str) -> None:
    schema = all_crds()[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []


def test_every_spec_field_has_a_description() -> None:
    def missing(node: dict[str, Any], path: str) -> list[str]:
        out = []
        for key, child in (node.get("properties") or {}).items():
            if not child.get("description"):
                out.append(f"{path}.{key}")
            out.extend(missing(child, f"{path}.{key}"))
            if isinstance(child.get("items"), dict):
                out.extend(missing(child["items"], f"{path}.{key}[]"))
        return out

    for crd in all_crds().values():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert missing(spec, "spec") == []


def test_printer_columns_short_names_and_scale() -> None:
    ftj, ms = all_crds()["finetunejob.yaml"], all_crds()["modelserver.yaml"]
    assert ftj["spec"]["names"]["shortNames"] == ["ftj"]
    assert ms["spec"]["names"]["shortNames"] == ["ms"]
    cols = [
        c["name"]
        for c in ftj["spec"]["versions"][0]["additionalPrinterColumns"]
        if "priority" not in c
    ]
    assert cols == ["Phase", "Progress", "Loss", "GPUs", "Age"]
    cols = [c["name"] for c in ms["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols == ["Phase", "Ready", "Model", "Endpoint", "Age"]
    assert (
        ms["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    )
    assert yaml.safe_load(render(ms))["kind"] == "CustomResourceDefinition"
