"""What Flux (kstatus) and Argo CD (the Lua scripts in docs/install.md) read from the status the
real operator writes, in every phase both kinds go through. tests/unit/test_health_tools.py
holds the same contract on hand-written objects; this is the same check on the operator's own."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from kubetune.devcluster.cluster import EXIT_CODE_ANNOTATION, OUTCOME_ANNOTATION
from tests.cluster_fixtures import Resources
from tests.integration.test_finetunejob import _finish_pods, finetunejob
from tests.integration.test_modelserver import modelserver
from tests.tools.health import assert_health, health
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
FTJ, MS = "finetunejobs", "modelservers"


def _reads_as(resources: Resources, plural: str, name: str, state: str, says: str = "") -> None:
    """Wait until the operator's status reads as `state` to both tools, then check it."""
    from tests.tools.health import EXPECTED

    wanted = EXPECTED[state]

    def reads() -> bool:
        (ks, ks_message), (argo, argo_message) = health(resources.get(plural, name))
        return (ks, argo) == wanted and says in ks_message and says in argo_message

    wait_for(reads, what=f"{plural}/{name} to read as {state} {wanted}, saying {says!r}")
    assert_health(resources.get(plural, name), state, says)


def test_finetunejob_health_in_every_phase(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    core = client.CoreV1Api(api_client)
    one_gpu = {"nodes": 1, "gpusPerNode": 1}
    resources.create(FTJ, finetunejob("runs", resources=one_gpu))
    _reads_as(resources, FTJ, "runs", "ftj-running")
    resources.create(FTJ, finetunejob("huge", resources={"nodes": 1, "gpusPerNode": 16}))
    _reads_as(resources, FTJ, "huge", "ftj-unschedulable", "Insufficient nvidia.com/gpu")
    resources.create(FTJ, finetunejob("held", resources=one_gpu, runPolicy={"suspend": True}))
    _reads_as(resources, FTJ, "held", "ftj-suspended")
    resources.create(FTJ, finetunejob("queued", resources=one_gpu, queueName="team-a"))
    _reads_as(resources, FTJ, "queued", "ftj-queued", "team-a")
    resources.create(FTJ, finetunejob("bad", dataset={"source": "pvc://datasets/data.bin"}))
    _reads_as(resources, FTJ, "bad", "ftj-invalid", "spec.dataset.format")

    resources.report_output("runs", "pvc://models/out/runs")
    _finish_pods(core, namespace, "runs-train", 1, **{OUTCOME_ANNOTATION: "succeed"})
    _reads_as(resources, FTJ, "runs", "ftj-succeeded")

    resources.create(FTJ, finetunejob("oom", resources=one_gpu, runPolicy={"backoffLimit": 0}))
    failure = {OUTCOME_ANNOTATION: "fail", EXIT_CODE_ANNOTATION: "6"}
    _finish_pods(core, namespace, "oom-train", 1, **failure)
    _reads_as(resources, FTJ, "oom", "ftj-failed")
    # `kubectl wait --for=condition=Ready` reads the same: only the run that succeeded is Ready.
    assert resources.condition(FTJ, "runs", "Ready")["status"] == "True"  # type: ignore[index]
    assert resources.condition(FTJ, "oom", "Ready")["status"] == "False"  # type: ignore[index]


def test_modelserver_health_while_waiting_serving_and_scaled_to_zero(
    resources: Resources, namespace: str, volumes: Any
) -> None:
    resources.create(MS, modelserver("follows", model={"fineTuneJobRef": {"name": "later"}}))
    _reads_as(resources, MS, "follows", "ms-waiting-for-job", "later")
    resources.create(MS, modelserver("serves", replicas=1))
    _reads_as(resources, MS, "serves", "ms-serving")
    resources.patch(MS, "serves", {"spec": {"replicas": 0}})
    _reads_as(resources, MS, "serves", "ms-scaled-to-zero")
