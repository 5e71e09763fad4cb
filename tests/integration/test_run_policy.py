"""runPolicy's limits are the Job controller's, honoured on the cluster: backoffLimit bounds the
retries, activeDeadlineSeconds ends a run that takes too long; the FineTuneJob says which."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from kubetune.devcluster.cluster import EXIT_CODE_ANNOTATION, OUTCOME_ANNOTATION
from tests.cluster_fixtures import Resources
from tests.integration.test_finetunejob import _finish_pods, _pods, finetunejob
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
FTJ = "finetunejobs"
ONE_GPU = {"nodes": 1, "gpusPerNode": 1}


def test_backoff_limit_bounds_the_retries(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    """backoffLimit 2: the first pod and two retries, then the Job gives up (exit 1 is a
    failure a retry may fix, so the podFailurePolicy counts it)."""
    resources.create(FTJ, finetunejob("retry", resources=ONE_GPU, runPolicy={"backoffLimit": 2}))
    core = client.CoreV1Api(api_client)
    failure = {OUTCOME_ANNOTATION: "fail", EXIT_CODE_ANNOTATION: "1"}
    for attempt in (1, 2, 3):
        wait_for(lambda n=attempt: len(_pods(core, namespace, "retry-train")) == n, 90, "a pod")
        _finish_pods(core, namespace, "retry-train", attempt, **failure)
    resources.wait_phase(FTJ, "retry", "Failed")
    job = client.BatchV1Api(api_client).read_namespaced_job("retry-train", namespace)
    reasons = {c.type: c.reason for c in job.status.conditions or []}
    assert reasons.get("Failed") == "BackoffLimitExceeded"
    # The Job's failed count can follow its Failed condition by one update.
    obj = wait_for(
        lambda: (o := resources.get(FTJ, "retry"))["status"].get("failed") == 3 and o,
        what="status.failed to count the three attempts",
    )
    assert len(_pods(core, namespace, "retry-train")) == 3  # no fourth attempt
    assert "BackoffLimitExceeded" in obj["status"]["failureMessage"]


def test_active_deadline_seconds_ends_a_run_that_takes_too_long(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    """The pod keeps running (it is never told to finish); the Job controller ends it at the
    deadline and the FineTuneJob fails with the Job's reason."""
    resources.create(
        FTJ,
        finetunejob(
            "slow", resources=ONE_GPU, runPolicy={"backoffLimit": 3, "activeDeadlineSeconds": 5}
        ),
    )
    job = wait_for(
        lambda: (
            client.BatchV1Api(api_client)
            .list_namespaced_job(namespace, field_selector="metadata.name=slow-train")
            .items
        ),
        what="the Job",
    )[0]
    assert job.spec.active_deadline_seconds == 5
    obj = resources.wait_phase(FTJ, "slow", "Failed", timeout=120)
    assert obj["status"]["failureReason"] == "DeadlineExceeded"
    assert resources.condition(FTJ, "slow", "Stalled")["status"] == "True"  # type: ignore[index]
