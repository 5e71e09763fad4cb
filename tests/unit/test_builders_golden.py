"""Golden manifests: each input resource in golden/ sits beside the children it must produce.

Regenerate after an intended change with `UPDATE_GOLDEN=1 make unit`, then review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.v1alpha1 import FineTuneJob, ModelServer
from kubetune.builders import serving, training
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import ResolvedModel

GOLDEN = Path(__file__).with_name("golden")
SETTINGS = Settings(trainer_image="example.test/trainer:1", fetcher_image="example.test/fetcher:1")


class _PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases: golden files read as the manifests they are."""

    def ignore_aliases(self, data: object) -> bool:
        return True


CASES = sorted(p.name.removesuffix(".input.yaml") for p in GOLDEN.glob("*.input.yaml"))


def render(body: dict[str, Any]) -> list[dict[str, Any]]:
    owner = Owner.from_body(body)
    if body["kind"] == "FineTuneJob":
        return training.build_children(FineTuneJob.model_validate(body), owner, SETTINGS)
    model = ResolvedModel(
        uri="pvc://models/out/intents/triton-repository",
        revision="ftj-1234",
        task="sequence-classification",
    )
    children, _ = serving.build_children(
        ModelServer.model_validate(body), owner, model, SETTINGS, spare_gpus=4
    )
    return children


@pytest.mark.parametrize("case", CASES)
def test_children_match_the_golden_manifests(case: str) -> None:
    body = yaml.safe_load((GOLDEN / f"{case}.input.yaml").read_text())
    actual = render(body)
    expected_file = GOLDEN / f"{case}.expected.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_file.write_text(yaml.dump_all(actual, Dumper=_PlainDumper, sort_keys=True))
    expected = list(yaml.safe_load_all(expected_file.read_text()))
    assert actual == expected


def test_there_are_golden_cases_for_both_kinds() -> None:
    kinds = {yaml.safe_load((GOLDEN / f"{c}.input.yaml").read_text())["kind"] for c in CASES}
    assert kinds == {"FineTuneJob", "ModelServer"}
