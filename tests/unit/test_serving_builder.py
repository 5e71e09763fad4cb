from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.v1alpha1 import ModelServer
from kubetune.builders.serving import desired_replicas, rollout_strategy


def ms(**spec: Any) -> ModelServer:
    base: dict[str, Any] = {"model": {"source": "pvc://m/r"}}
    base.update(spec)
    return ModelServer.model_validate({"metadata": {"name": "x"}, "spec": base})


@pytest.mark.parametrize(
    ("gpus", "spare", "strategy", "surge"),
    [
        (1, 1, "auto", 1),
        (1, 0, "auto", 0),
        (2, 1, "auto", 0),
        (0, 0, "auto", 1),
        (1, 0, "surge", 1),
        (1, 8, "replace", 0),
    ],
)
def test_rollout_surges_only_when_a_gpu_is_free(
    gpus: int, spare: int, strategy: str, surge: int
) -> None:
    spec = ms(resources={"gpus": gpus}, rollout={"strategy": strategy}).spec
    update = rollout_strategy(spec, spare)["rollingUpdate"]
    assert update["maxSurge"] == surge
    assert update["maxUnavailable"] == 1 - surge


def test_replicas_are_left_to_the_autoscaler() -> None:
    assert desired_replicas(ms().spec) == 1
    assert desired_replicas(ms(replicas=3).spec) == 3
    assert desired_replicas(ms(autoscaling={"maxReplicas": 4, "target": 5}).spec) is None
