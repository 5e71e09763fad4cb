"""Job and pods -> what the FineTuneJob's status says. Pure: the handler fetches, this judges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.api.v1alpha1.finetunejob import FineTuneJob, Phase

# First line of a trainer's termination message: "Reason: message" (see kubetune.trainer.errors).
KNOWN_FAILURE_REASONS = {
    "BadData",
    "OutOfMemory",
    "AccessDenied",
    "ModelNotFound",
    "NcclTimeout",
    "Preempted",
}


@dataclass(frozen=True)
class Observation:
    """The training's state as seen from the Job and its pods."""

    phase: Phase
    reason: str
    message: str
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    unschedulable: str | None = None
    failure_reason: str | None = None
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _training_started(pods: list[dict[str, Any]]) -> str | None:
    """When the first training container started: the Job's own startTime is set even while its
    pods wait for GPUs, and the training spec stays editable until a container really runs."""
    started = [
        str(p["status"]["startTime"])
        for p in pods
        if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")
        and p["status"].get("startTime")
    ]
    return min(started) if started else None


def _unschedulable(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return str(cond.get("message") or "no node can run the training pod")
    return None


def classify_termination(message: str) -> tuple[str, str]:
    """("OutOfMemory", "CUDA out of memory ...") from a trainer's termination message."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    head, sep, rest = first.partition(":")
    if sep and head.strip() in KNOWN_FAILURE_REASONS:
        return head.strip(), rest.strip()
    if "out of memory" in message.lower() or "OOMKilled" in message:
        return "OutOfMemory", first
    return "TrainerFailed", first or "the trainer exited with an error"


def _last_failure(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    failed = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (status.get("state") or {}).get("terminated") or {}
            if term and term.get("exitCode", 0) != 0:
                failed.append((term.get("finishedAt") or "", term))
    if not failed:
        return None
    _, term = max(failed, key=lambda item: item[0])
    if term.get("reason") == "OOMKilled":
        return "OutOfMemory", "the training container was killed for exceeding its memory limit"
    reason, message = classify_termination(str(term.get("message") or ""))
    return reason, f"{message} (exit code {term.get('exitCode')})"


def observe(
    ftj: FineTuneJob, job: dict[str, Any] | None, pods: list[dict[str, Any]]
) -> Observation:
    if job is None:
        return Observation(Phase.PENDING, "Creating", "creating the training pods")
    status = job.get("status") or {}
    counts: dict[str, Any] = {
        "active": int(status.get("active") or 0),
        "succeeded": int(status.get("succeeded") or 0),
        "failed": int(status.get("failed") or 0),
        "start_time": _training_started(pods),
        "completion_time": status.get("completionTime"),
    }
    if done := _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        return Observation(
            Phase.SUCCEEDED,
            "Succeeded",
            "training finished",
            **{
                **counts,
                "completion_time": counts["completion_time"] or done.get("lastTransitionTime"),
            },
        )
    if failed := _job_condition(job, "Failed") or _job_condition(job, "FailureTarget"):
        classified = _last_failure(pods)
        job_reason = str(failed.get("reason") or "Failed")
        if classified is not None:
            reason, detail = classified
            message = f"{detail}; the job gave up: {job_reason}"
        else:
            reason, message = job_reason, str(failed.get("message") or job_reason)
        return Observation(
            Phase.FAILED,
            reason,
            message,
            failure_reason=reason,
            **{**counts, "completion_time": failed.get("lastTransitionTime")},
        )
    if (job.get("spec") or {}).get("suspend"):
        queued = bool(ftj.spec.queue_name) and not ftj.spec.run_policy.suspend
        reason = "WaitingForQueue" if queued else "Suspended"
        message = (
            f"waiting for admission by Kueue queue {ftj.spec.queue_name!r}"
            if queued
            else "spec.runPolicy.suspend is true; no pods run"
        )
        return Observation(Phase.SUSPENDED, reason, message, **counts)
    if unschedulable := _unschedulable(pods):
        return Observation(
            Phase.PENDING,
            "Unschedulable",
            f"training pods cannot be scheduled: {unschedulable}",
            unschedulable=unschedulable,
            **counts,
        )
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    restarts = counts["failed"]
    finished = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    if (counts["succeeded"] or finished) and not running:
        return Observation(
            Phase.RUNNING, "Finishing", "training pods finished; completing", **counts
        )
    if running:
        message = f"{len(running)}/{ftj.spec.resources.nodes} training pods running"
        if restarts:
            last = _last_failure(pods)
            detail = f": {last[0]}: {last[1]}" if last else ""
            message += f" (retry {restarts} of {ftj.spec.run_policy.backoff_limit}{detail})"
        return Observation(Phase.RUNNING, "Running", message, restarts=restarts, **counts)
    return Observation(
        Phase.PENDING, "Starting", "training pods are starting", restarts=restarts, **counts
    )
