"""How GitOps tools read kubetune's status: the real kstatus library (Flux, kpt) and Argo CD's
Lua health scripts from docs/install.md, on both kinds in every state.

Two sets of objects:

- hand-written statuses (the contract): what the operator must write in each state, with the
  condition types kstatus reads (Ready, Reconciling, Stalled) and the details beside them;
- statuses built from the operator's own verdict functions (builders/training_status.py and
  serving_status.py) for the same states, so a change in the operator's condition logic that
  GitOps tools would misread fails here, without a cluster.

`tests.tools.health.assert_health` is the one check, usable on objects a real operator wrote.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.api.v1alpha1.base import Condition, ConditionStatus
from kubetune.api.v1alpha1.finetunejob import Phase as FtjPhase
from kubetune.api.v1alpha1.modelserver import Phase as MsPhase
from kubetune.api.v1alpha1.reasons import ConditionType as T
from kubetune.api.v1alpha1.reasons import Reason
from kubetune.api.v1alpha1.reasons import ServingReason as R
from kubetune.builders.serving_status import Rollout, Verdict, conditions_for
from kubetune.builders.training_status import (
    Observation,
    heartbeat_condition,
    rejected_conditions,
    verdict_conditions,
)
from kubetune.conditions import set_condition
from tests.tools.argocd import argocd_health, health_scripts
from tests.tools.health import EXPECTED, assert_health
from tests.tools.kstatus import kstatus, kstatus_all

AT = "2026-12-01T09:00:00Z"


def cond(type_: str, status: bool, reason: str, message: str = "", gen: int = 3) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": gen,
        "lastTransitionTime": AT,
    }


def verdict(
    ready: bool, reconciling: bool, stalled: bool, reason: str, message: str, *details: Any
) -> list[Any]:
    """The three kstatus conditions (a False one carries an idle reason, as the operator's do),
    then the detail conditions."""
    return [
        cond(T.READY, ready, reason, message),
        cond(
            T.RECONCILING, reconciling, reason if reconciling else "Idle", _if(reconciling, message)
        ),
        cond(T.STALLED, stalled, reason if stalled else "AsExpected", _if(stalled, message)),
        *details,
    ]


def _if(holds: bool, message: str) -> str:
    return message if holds else ""


def ftj(phase: str, conditions: list[Any], generation: int = 3, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "intents", "namespace": "ml", "generation": generation, "uid": "u1"},
        "spec": {
            "model": {"source": "hf://sentence-transformers/all-MiniLM-L6-v2"},
            "dataset": {"source": "pvc://datasets/intents.jsonl"},
            "output": {"uri": "pvc://models/intents"},
            "resources": {"nodes": 2, "gpusPerNode": 4},
        },
        "status": {"phase": phase, "observedGeneration": 3, "conditions": conditions, **status},
    }


def ms(phase: str, conditions: list[Any], generation: int = 3, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "intents", "namespace": "ml", "generation": generation, "uid": "u2"},
        "spec": {"model": {"fineTuneJobRef": {"name": "intents"}}, "replicas": 2},
        "status": {
            "phase": phase,
            "observedGeneration": 3,
            "conditions": conditions,
            "replicas": 2,
            "desiredReplicas": 2,
            **status,
        },
    }


def detail(type_: str, status: bool, reason: str, message: str = "") -> dict[str, Any]:
    return cond(type_, status, reason, message)


OOM = "CUDA out of memory on rank 0 (exit code 3); the job gave up: BackoffLimitExceeded"
ROLLED_BACK = "revision ftj-2 was rolled back to ftj-1: the answer was 'shipping', not 'billing'"

# state -> (object, a phrase both tools must pass on to a person)
CONTRACT: dict[str, tuple[dict[str, Any], str]] = {
    "ftj-pending": (
        ftj(
            "Pending",
            verdict(
                False,
                True,
                False,
                Reason.STARTING,
                "training pods are starting",
                detail(T.SUCCEEDED, False, Reason.NOT_FINISHED),
            ),
        ),
        "training pods are starting",
    ),
    "ftj-running": (
        ftj(
            "Running",
            verdict(False, True, False, Reason.RUNNING, "2/2 training pods running"),
            progressText="42% 84/200",
            active=2,
        ),
        "2/2 training pods running",
    ),
    "ftj-queued": (
        ftj(
            "Suspended",
            verdict(
                False,
                True,
                False,
                Reason.WAITING_FOR_QUEUE,
                "waiting for Kueue 'team-a'",
                detail(T.SUSPENDED, True, Reason.WAITING_FOR_QUEUE, "waiting for Kueue 'team-a'"),
            ),
        ),
        "waiting for Kueue",
    ),
    "ftj-unschedulable": (
        ftj(
            "Pending",
            verdict(
                False,
                True,
                False,
                Reason.UNSCHEDULABLE,
                "0/5 nodes have 4 nvidia.com/gpu free",
                detail(T.SCHEDULED, False, Reason.UNSCHEDULABLE, "0/5 nodes have 4 free"),
            ),
        ),
        "0/5 nodes",
    ),
    "ftj-succeeded": (
        ftj(
            "Succeeded",
            verdict(
                True,
                False,
                False,
                Reason.SUCCEEDED,
                "training finished",
                detail(T.SUCCEEDED, True, Reason.SUCCEEDED, "training finished"),
            ),
            completionTime=AT,
        ),
        "",  # kstatus says "Resource is Ready"
    ),
    "ftj-failed": (
        # The case issue 9 found read as Current: Ready must not be True next to Failed.
        ftj(
            "Failed",
            verdict(
                False, False, True, "OutOfMemory", OOM, detail(T.FAILED, True, "OutOfMemory", OOM)
            ),
            failureReason="OutOfMemory",
        ),
        "CUDA out of memory",
    ),
    "ftj-heartbeat-lost": (
        ftj(
            "Running",
            verdict(
                False,
                False,
                True,
                Reason.HEARTBEAT_STALE,
                "no report for 600 s",
                detail(T.TRAINER_HEARTBEAT, False, Reason.HEARTBEAT_STALE, "no report for 600 s"),
            ),
        ),
        "no report for 600 s",
    ),
    "ftj-invalid": (
        ftj(
            "Failed",
            verdict(False, False, True, Reason.INVALID_SPEC, "spec.lora needs method lora"),
        ),
        "spec.lora",
    ),
    "ftj-suspended": (
        ftj(
            "Suspended",
            verdict(
                False,
                False,
                False,
                Reason.SUSPENDED,
                "spec.runPolicy.suspend is true",
                detail(T.SUSPENDED, True, Reason.SUSPENDED, "spec.runPolicy.suspend is true"),
            ),
        ),
        "spec.runPolicy.suspend is true",
    ),
    "ftj-spec-not-yet-seen": (
        ftj(
            "Succeeded",
            verdict(True, False, False, Reason.SUCCEEDED, "training finished"),
            generation=4,
        ),
        "latest",
    ),
    "ms-waiting-for-job": (
        ms(
            "Pending",
            verdict(
                False,
                True,
                False,
                R.WAITING_FOR_FINE_TUNE_JOB,
                "FineTuneJob intents runs",
                detail(T.MODEL_LOADED, False, R.WAITING_FOR_FINE_TUNE_JOB),
            ),
            replicas=0,
        ),
        "FineTuneJob intents runs",
    ),
    "ms-rolling-out": (
        # Still serving the old revision, which is not what the spec asks for: not Ready.
        ms(
            "Progressing",
            verdict(
                False,
                True,
                False,
                R.ROLLING_OUT,
                "1/2 replicas updated, 2 ready",
                detail(T.MODEL_LOADED, True, R.MODEL_READY),
            ),
            readyReplicas=2,
        ),
        "1/2 replicas updated",
    ),
    "ms-rolling-back": (
        ms(
            "Degraded",
            verdict(
                False,
                True,
                False,
                R.SMOKE_TEST_FAILED,
                "wrong answer; rolling back",
                detail(T.SMOKE_TEST_PASSED, False, R.SMOKE_TEST_FAILED, "wrong answer"),
            ),
            readyReplicas=2,
        ),
        "rolling back",
    ),
    "ms-unschedulable": (
        ms(
            "Degraded",
            verdict(
                False,
                True,
                False,
                R.REPLICAS_UNAVAILABLE,
                "0/2 replicas ready",
                detail(T.MODEL_LOADED, False, R.NO_READY_REPLICA),
            ),
        ),
        "0/2 replicas ready",
    ),
    "ms-serving": (
        ms(
            "Ready",
            verdict(
                True,
                False,
                False,
                R.MODEL_ANSWERING,
                "2/2 replicas serve the model",
                detail(T.SMOKE_TEST_PASSED, True, R.SMOKE_TEST_PASSED, "billing"),
            ),
            readyReplicas=2,
            served={"revision": "ftj-2"},
        ),
        "",
    ),
    "ms-scaled-to-zero": (
        ms(
            "Pending",
            verdict(True, False, False, R.SCALED_TO_ZERO, "no replicas are wanted"),
            replicas=0,
            desiredReplicas=0,
        ),
        "",
    ),
    "ms-rolled-back": (
        ms(
            "Degraded",
            verdict(
                False,
                False,
                True,
                R.ROLLED_BACK,
                ROLLED_BACK,
                detail(T.SMOKE_TEST_PASSED, False, R.SMOKE_TEST_FAILED, "'shipping'"),
            ),
            readyReplicas=2,
            failedRevision="ftj-2",
        ),
        "rolled back to ftj-1",
    ),
    "ms-failed": (
        # Issue 9: a smoke test that failed read as InProgress forever.
        ms(
            "Failed",
            verdict(
                False,
                False,
                True,
                R.SMOKE_TEST_FAILED,
                "Triton answered 500; no earlier model to go back to",
            ),
        ),
        "no earlier model",
    ),
    "ms-spec-not-yet-seen": (
        ms(
            "Ready",
            verdict(True, False, False, R.MODEL_ANSWERING, "2/2 replicas serve the model"),
            generation=4,
        ),
        "latest",
    ),
}


def test_every_state_has_a_contract_object() -> None:
    assert set(CONTRACT) == set(EXPECTED)


@pytest.mark.parametrize("state", sorted(CONTRACT))
def test_contract_objects_read_right_in_kstatus_and_argo_cd(state: str) -> None:
    obj, says = CONTRACT[state]
    assert_health(obj, state, says)


def test_kstatus_reads_the_generation_as_an_integer_and_compares_it() -> None:
    """The JSON decoding is kstatus's own (int64): generation 10 vs observed 9 is InProgress,
    equal is Current (a float or string comparison would get one of these wrong)."""
    obj, _ = CONTRACT["ftj-succeeded"]
    obj = {**obj, "metadata": {**obj["metadata"], "generation": 10}}
    behind = {**obj, "status": {**obj["status"], "observedGeneration": 9}}
    caught_up = {**obj, "status": {**obj["status"], "observedGeneration": 10}}
    assert kstatus_all([behind, caught_up]) == [
        ("InProgress", "FineTuneJob generation is 10, but latest observed generation is 9"),
        ("Current", "Resource is Ready"),
    ]


def test_an_object_without_status_is_in_progress_for_both() -> None:
    obj, _ = CONTRACT["ms-serving"]
    bare = {key: value for key, value in obj.items() if key != "status"}
    status, message = argocd_health(bare)
    assert (status, message.startswith("Waiting for the kubetune operator")) == (
        "Progressing",
        True,
    )
    # kstatus has nothing to go on and calls it Current: the operator must write status early.
    assert kstatus(bare) == ("Current", "Resource is current")


def test_the_docs_give_the_same_script_for_both_kinds() -> None:
    scripts = health_scripts()
    assert set(scripts) == {"FineTuneJob", "ModelServer"}
    assert scripts["FineTuneJob"] == scripts["ModelServer"]


# -- the operator's own verdicts -------------------------------------------------------------------


def _conditions(updates: list[Any]) -> list[dict[str, Any]]:
    conditions: list[Condition] = []
    for type_, status, reason, message in updates:
        conditions = set_condition(conditions, type_, status, reason, message, 3)
    return [c.to_wire() for c in conditions]


STALE = heartbeat_condition(
    {"lastHeartbeat": "2026-12-01T08:00:00Z"},
    now=datetime(2026, 12, 1, 9, 0, tzinfo=UTC),
    timeout_seconds=600,
)

# state -> (Observation, queued?, heartbeat)
TRAINING: dict[str, tuple[Observation, bool, Any]] = {
    "ftj-pending": (Observation(FtjPhase.PENDING, Reason.CREATING, "creating pods"), False, None),
    "ftj-running": (Observation(FtjPhase.RUNNING, Reason.RUNNING, "2/2 running"), False, None),
    "ftj-queued": (
        Observation(FtjPhase.SUSPENDED, Reason.WAITING_FOR_QUEUE, "waiting for Kueue"),
        True,
        None,
    ),
    "ftj-unschedulable": (
        Observation(FtjPhase.PENDING, Reason.UNSCHEDULABLE, "0/5 nodes", unschedulable="0/5 nodes"),
        False,
        None,
    ),
    "ftj-succeeded": (Observation(FtjPhase.SUCCEEDED, Reason.SUCCEEDED, "done"), False, None),
    "ftj-failed": (
        Observation(FtjPhase.FAILED, "OutOfMemory", OOM, failure_reason="OutOfMemory"),
        False,
        None,
    ),
    "ftj-heartbeat-lost": (Observation(FtjPhase.RUNNING, Reason.RUNNING, "2/2"), False, STALE),
    "ftj-suspended": (
        Observation(FtjPhase.SUSPENDED, Reason.SUSPENDED, "spec.runPolicy.suspend is true"),
        False,
        None,
    ),
}


@pytest.mark.parametrize("state", sorted(TRAINING))
def test_the_operators_training_verdicts_read_right(state: str) -> None:
    seen, queued, heartbeat = TRAINING[state]
    conditions = _conditions(verdict_conditions(seen, queued, heartbeat))
    assert_health(ftj(seen.phase.value, conditions), state)


def test_the_operators_verdict_on_an_invalid_spec_reads_as_failed() -> None:
    conditions = _conditions(rejected_conditions(Reason.INVALID_SPEC, "spec.lora needs lora"))
    assert_health(ftj("Failed", conditions), "ftj-invalid", "spec.lora needs lora")


ROLLED_OUT = Rollout(desired=2, ready=2, updated=2, total=2, rolled_out=True)
HALF = Rollout(desired=2, ready=2, updated=1, total=3, rolled_out=False)
NONE_READY = Rollout(desired=2, ready=0, updated=2, total=2, rolled_out=True)
ZERO = Rollout(desired=0, ready=0, updated=0, total=0, rolled_out=True)

# state -> (Verdict, Rollout, waiting for the FineTuneJob?)
SERVING: dict[str, tuple[Verdict, Rollout, tuple[str, str] | None]] = {
    "ms-waiting-for-job": (
        Verdict(MsPhase.READY, R.MODEL_ANSWERING, "2/2 serve ftj-1", answering=True),
        ROLLED_OUT,
        (R.WAITING_FOR_FINE_TUNE_JOB, "FineTuneJob intents runs"),
    ),
    "ms-rolling-out": (Verdict(MsPhase.PROGRESSING, R.ROLLING_OUT, "1/2 updated"), HALF, None),
    "ms-rolling-back": (
        Verdict(MsPhase.DEGRADED, R.SMOKE_TEST_FAILED, "wrong answer; rolling back"),
        ROLLED_OUT,
        None,
    ),
    "ms-unschedulable": (
        Verdict(MsPhase.DEGRADED, R.REPLICAS_UNAVAILABLE, "0/2 replicas ready"),
        NONE_READY,
        None,
    ),
    "ms-serving": (
        Verdict(MsPhase.READY, R.MODEL_ANSWERING, "2/2 serve", answering=True),
        ROLLED_OUT,
        None,
    ),
    "ms-scaled-to-zero": (
        Verdict(MsPhase.PENDING, R.SCALED_TO_ZERO, "no replicas are wanted", answering=True),
        ZERO,
        None,
    ),
    "ms-rolled-back": (
        Verdict(MsPhase.DEGRADED, R.ROLLED_BACK, ROLLED_BACK, stalled=True),
        ROLLED_OUT,
        None,
    ),
    "ms-failed": (
        Verdict(MsPhase.FAILED, R.SMOKE_TEST_FAILED, "no earlier model", stalled=True),
        ROLLED_OUT,
        None,
    ),
}


@pytest.mark.parametrize("state", sorted(SERVING))
def test_the_operators_serving_verdicts_read_right(state: str) -> None:
    verdict_, counts, waiting = SERVING[state]
    smoke = [(T.SMOKE_TEST_PASSED, ConditionStatus.UNKNOWN, R.SMOKE_TEST_DISABLED, "")]
    conditions = _conditions(conditions_for(verdict_, counts, "ftj-2", waiting, smoke))
    assert_health(ms(verdict_.phase.value, conditions), state)
