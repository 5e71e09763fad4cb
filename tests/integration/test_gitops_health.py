"""The real operator's status, read by the real kstatus library and Argo CD's Lua health script.

The unit tests (tests/unit/test_health_tools.py) hold the contract objects of every state; here
the same check, `assert_health`, runs on what the operator itself wrote on the local cluster: a
FineTuneJob running, succeeded, failed, suspended and unschedulable, and a ModelServer serving,
scaled to zero and failed with nothing to roll back to.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from kubetune.devcluster.cluster import (
    EXIT_CODE_ANNOTATION,
    OUTCOME_ANNOTATION,
    TERMINATION_MESSAGE_ANNOTATION,
)
from tests.cluster_fixtures import Resources
from tests.integration.test_finetunejob import FTJ, _finish_pods, finetunejob
from tests.integration.test_modelserver import MS, modelserver
from tests.tools.health import assert_health
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
ONE_GPU = {"nodes": 1, "gpusPerNode": 1}


def _condition_holds(resources: Resources, plural: str, name: str, type_: str) -> Any:
    return wait_for(
        lambda: (c := resources.condition(plural, name, type_)) and c["status"] == "True" and c,
        what=f"{plural}/{name} {type_}=True",
    )


def test_finetunejobs_read_right_in_every_phase(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    core = client.CoreV1Api(api_client)
    resources.create(FTJ, finetunejob("ok", resources=ONE_GPU))
    resources.create(FTJ, finetunejob("oom", resources=ONE_GPU))  # backoffLimit 0
    resources.create(FTJ, finetunejob("held", resources=ONE_GPU, runPolicy={"suspend": True}))
    resources.create(FTJ, finetunejob("huge", resources={"nodes": 1, "gpusPerNode": 16}))

    assert_health(resources.wait_phase(FTJ, "ok", "Running"), "ftj-running")
    _finish_pods(core, namespace, "ok-train", 1, **{OUTCOME_ANNOTATION: "succeed"})
    assert_health(resources.wait_phase(FTJ, "ok", "Succeeded"), "ftj-succeeded")

    failure = {
        OUTCOME_ANNOTATION: "fail",
        EXIT_CODE_ANNOTATION: "3",
        TERMINATION_MESSAGE_ANNOTATION: "OutOfMemory: CUDA out of memory at batch size 64",
    }
    _finish_pods(core, namespace, "oom-train", 1, **failure)
    assert_health(resources.wait_phase(FTJ, "oom", "Failed"), "ftj-failed", "CUDA out of memory")

    assert_health(resources.wait_phase(FTJ, "held", "Suspended"), "ftj-suspended")

    wait_for(
        lambda: (c := resources.condition(FTJ, "huge", "Scheduled")) and c["status"] == "False",
        what="the Scheduled=False condition",
    )
    assert_health(resources.get(FTJ, "huge"), "ftj-unschedulable", "Insufficient nvidia.com/gpu")


def test_modelservers_read_right_serving_scaled_to_zero_and_failed(
    resources: Resources, namespace: str, volumes: Any
) -> None:
    resources.create(MS, modelserver("serving", replicas=1, resources={"gpus": 0}))
    resources.create(MS, modelserver("zero", replicas=0, resources={"gpus": 0}))
    # kwok's pods have loopback addresses where nothing listens: the smoke test of the first
    # revision fails for real, and there is no earlier model to go back to.
    resources.create(
        MS,
        modelserver(
            "broken", replicas=1, resources={"gpus": 0}, rollout={"smokeTest": {"enabled": True}}
        ),
    )
    assert_health(resources.wait_phase(MS, "serving", "Ready"), "ms-serving")
    _condition_holds(resources, MS, "zero", "Ready")
    assert_health(resources.get(MS, "zero"), "ms-scaled-to-zero")
    _condition_holds(resources, MS, "broken", "Stalled")
    assert_health(resources.get(MS, "broken"), "ms-failed", "no earlier model")
