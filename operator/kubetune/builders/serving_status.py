"""Deployment and pods -> what the ModelServer's status says. Pure: the handler fetches and runs
the smoke test, this judges.

The verdict maps onto kstatus's three conditions (see `api.v1alpha1.reasons`): Ready when the
revision the spec asks for answers; Reconciling while a rollout, a scale-up or the FineTuneJob it
follows is under way; Stalled when a person must act (the new revision was rolled back, it does
not start and there is nothing to go back to, the progress deadline passed, the spec is bad).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1.base import ConditionStatus
from kubetune.api.v1alpha1.modelserver import Phase
from kubetune.api.v1alpha1.reasons import ConditionType as T
from kubetune.api.v1alpha1.reasons import Reason
from kubetune.api.v1alpha1.reasons import ServingReason as R

CRASH_RESTARTS = 2  # a new pod that failed this often will not come up by itself
Update = tuple[str, bool | ConditionStatus, str, str]


@dataclass(frozen=True)
class Verdict:
    """What the status says, before conditions are written."""

    phase: Phase
    reason: str
    message: str
    stalled: bool = False  # a person must act
    answering: bool = False  # the wanted revision serves


@dataclass(frozen=True)
class Rollout:
    """The Deployment's replica counts, and whether its latest template is fully rolled out."""

    desired: int
    ready: int
    updated: int
    total: int
    rolled_out: bool


def _deployment_condition(deploy: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (deploy.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def rollout_verdict(deploy: dict[str, Any]) -> tuple[Verdict, Rollout]:
    dstatus = deploy.get("status") or {}
    desired = int((deploy.get("spec") or {}).get("replicas") or 0)
    ready = int(dstatus.get("readyReplicas") or 0)
    updated = int(dstatus.get("updatedReplicas") or 0)
    total = int(dstatus.get("replicas") or 0)
    generation = (deploy.get("metadata") or {}).get("generation")
    caught_up = dstatus.get("observedGeneration") == generation
    rolled_out = caught_up and updated == desired and total == desired
    counts = Rollout(desired, ready, updated, total, rolled_out)
    progress = _deployment_condition(deploy, "Progressing")
    if progress.get("reason") == "ProgressDeadlineExceeded":
        return Verdict(
            Phase.FAILED, R.PROGRESS_DEADLINE_EXCEEDED, str(progress.get("message")), stalled=True
        ), counts
    if desired == 0:
        return Verdict(
            Phase.PENDING, R.SCALED_TO_ZERO, "no replicas are wanted", answering=True
        ), counts
    if ready >= desired and rolled_out:
        return Verdict(
            Phase.READY,
            R.MODEL_ANSWERING,
            f"{ready}/{desired} replicas serve the model",
            answering=True,
        ), counts
    if not rolled_out:
        return Verdict(
            Phase.PROGRESSING, R.ROLLING_OUT, f"{updated}/{desired} replicas updated, {ready} ready"
        ), counts
    return Verdict(
        Phase.DEGRADED, R.REPLICAS_UNAVAILABLE, f"{ready}/{desired} replicas ready"
    ), counts


def served_checksum(pods: list[dict[str, Any]]) -> str | None:
    """The weights' checksum, as the model-delivery init container reported it on exit."""
    for pod in pods:
        for item in (pod.get("status") or {}).get("initContainerStatuses") or []:
            term = (item.get("state") or {}).get("terminated") or {}
            message = str(term.get("message") or "")
            if item.get("name") == "fetch-model" and message.startswith("checksum: "):
                return message.removeprefix("checksum: ").strip()
    return None


def crash_looping(pods: list[dict[str, Any]]) -> str | None:
    """Why the new revision's pods cannot start (model fetch failing, Triton exiting on a model
    it cannot load), once a container has failed repeatedly: then waiting for the progress
    deadline would only keep the old pods down longer."""
    for pod in pods:
        status = pod.get("status") or {}
        for item in (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        ):
            if int(item.get("restartCount") or 0) < CRASH_RESTARTS:
                continue
            state = item.get("lastState") or item.get("state") or {}
            term = state.get("terminated") or (item.get("state") or {}).get("terminated") or {}
            detail = str(term.get("message") or term.get("reason") or "it keeps exiting").strip()
            return f"container {item.get('name')} of pod {pod['metadata']['name']}: {detail[-500:]}"
    return None


def conditions_for(
    verdict: Verdict,
    counts: Rollout,
    revision: str,
    waiting: tuple[str, str] | None,
    smoke: list[Update],
) -> list[Update]:
    """Every condition the status carries. `waiting` is (reason, message) while the FineTuneJob
    this server follows is missing or re-running: the last good revision keeps serving and the
    server stays Reconciling until a new one comes."""
    ready = counts.ready
    bad = verdict.phase in (Phase.DEGRADED, Phase.FAILED)
    under_way = not verdict.stalled and (
        waiting is not None or not counts.rolled_out or not verdict.answering
    )
    if waiting is not None and not verdict.stalled:
        reconciling_reason, reconciling_message = waiting
    else:
        reconciling_reason, reconciling_message = verdict.reason, verdict.message
    return [
        (T.READY, verdict.answering, verdict.reason, verdict.message),
        (
            T.RECONCILING,
            under_way,
            reconciling_reason if under_way else "Idle",
            reconciling_message if under_way else "",
        ),
        (
            T.STALLED,
            verdict.stalled,
            verdict.reason if verdict.stalled else "AsExpected",
            verdict.message if verdict.stalled else "",
        ),
        (
            T.MODEL_LOADED,
            ready > 0,
            R.MODEL_READY if ready else R.NO_READY_REPLICA,
            f"{ready} replicas report the model ready"
            if ready
            else "no replica has loaded the model yet",
        ),
        (
            T.DEGRADED,
            bad,
            verdict.reason if bad else Reason.AS_DESIRED,
            verdict.message if bad else "",
        ),
        *smoke,
    ]


def not_servable_conditions(reason: str, message: str, waiting: bool) -> list[Update]:
    """Nothing to serve yet (waiting for the FineTuneJob: Reconciling) or ever (a bad spec:
    Stalled)."""
    return [
        (T.READY, False, reason, message),
        (T.RECONCILING, waiting, reason if waiting else "Idle", message if waiting else ""),
        (T.STALLED, not waiting, "AsExpected" if waiting else reason, "" if waiting else message),
        (T.MODEL_LOADED, False, reason, message),
    ]
