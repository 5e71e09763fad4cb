"""Job and pods -> what the FineTuneJob's status says. Pure: the handler fetches, this judges."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune.api.v1alpha1.finetunejob import FineTuneJob, Phase
from kubetune.api.v1alpha1.reasons import ConditionType as T
from kubetune.api.v1alpha1.reasons import Reason
from kubetune.builders.training import secret_fields

# First line of a trainer's termination message: "Reason: message" (see kubetune.trainer.errors).
KNOWN_FAILURE_REASONS = {
    "BadData",
    "OutOfMemory",
    "AccessDenied",
    "ModelNotFound",
    "NcclTimeout",
    "Preempted",
}

# The Job's failure reasons for which it ended the pods, not the pods the Job.
JOB_STOPPED_PODS = {"DeadlineExceeded"}


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


def _config_error(ftj: FineTuneJob, pods: list[dict[str, Any]]) -> str | None:
    """A pod the kubelet cannot start for a missing Secret or key (CreateContainerConfigError):
    the kubelet's message, with the field that names the Secret. The kubelet tries again by
    itself, so creating the Secret is all it takes."""
    fields = secret_fields(ftj.spec)
    for pod in pods:
        status = pod.get("status") or {}
        for item in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            waiting = (item.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") != "CreateContainerConfigError":
                continue
            detail = str(waiting.get("message") or "the pod's configuration cannot be made")
            named = [
                field
                for name, where in fields.items()
                if f'"{name}"' in detail or f"/{name}" in detail
                for field in where
            ]
            where = f"{', '.join(named)}: " if named else ""
            return f"{where}{detail}; the pod starts once it exists"
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


def _first_failure(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The earliest failed container: in a multi-node job one rank's failure (rank 0 out of
    memory) makes the others fail after it (NCCL timeouts), so the first one is the cause."""
    failed = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (status.get("state") or {}).get("terminated") or {}
            if term and term.get("exitCode", 0) != 0:
                failed.append((term.get("finishedAt") or "", term))
    if not failed:
        return None
    _, term = min(failed, key=lambda item: item[0])
    if term.get("reason") == "OOMKilled":
        return "OutOfMemory", "the training container was killed for exceeding its memory limit"
    reason, message = classify_termination(str(term.get("message") or ""))
    code = int(term.get("exitCode") or 0)
    if reason == "TrainerFailed" and code > 128:
        # Killed before the trainer could say why (kill -9, a crash): the termination message
        # is then the log's tail (FallbackToLogsOnError), a progress line, not a cause.
        message = f"the trainer was killed by {_signal_name(code - 128)}"
    return reason, f"{message} (exit code {code})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def gpu_usage(
    pods: list[dict[str, Any]],
    gpus_per_pod: int,
    watts_by_node: Mapping[str, float],
    default_watts: float,
    now: datetime,
) -> tuple[float, float]:
    """(GPU-hours, kWh) from the training containers' measured run time: a pod waiting for GPUs
    or a suspended job holds none, so only the time a container ran counts, at the board power
    of the GPU product of the node it ran on."""
    if not gpus_per_pod:
        return 0.0, 0.0
    hours = kwh = 0.0
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName") or ""
        watts = watts_by_node.get(node, default_watts)
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            state = status.get("state") or {}
            span = state.get("terminated") or state.get("running") or {}
            if not span.get("startedAt"):
                continue
            end = _parse_time(span["finishedAt"]) if span.get("finishedAt") else now
            ran = max((end - _parse_time(span["startedAt"])).total_seconds(), 0.0) / 3600
            hours += ran * gpus_per_pod
            kwh += ran * gpus_per_pod * watts / 1000
    return round(hours, 4), round(kwh, 4)


def observe(
    ftj: FineTuneJob,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    queue_message: str | None = None,
) -> Observation:
    """What the Job and its pods show. `queue_message`: why Kueue has not admitted the Job yet
    (its Workload's condition, see workload_message), said after the queue's name."""
    missing = _config_error(ftj, pods)  # the pre-flight pod's too, before the Job exists
    if job is None:
        if missing:
            return Observation(Phase.PENDING, Reason.MISSING_DEPENDENCY, missing)
        return Observation(Phase.PENDING, "Creating", "creating the training pods")
    status = job.get("status") or {}
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    counts: dict[str, Any] = {
        # Pods running, as the API says (Kubeflow's replica status counts the same): the Job's
        # own `active` also counts pods still pending, and following it cost a status write per
        # job (0 -> 1) that no phase or condition moved with.
        "active": len(running),
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
        job_reason = str(failed.get("reason") or "Failed")
        # Past its deadline the Job controller stops the pods itself: their exit (the trainer's
        # SIGTERM checkpoint, "Preempted") follows the failure and must not stand for its cause.
        classified = None if job_reason in JOB_STOPPED_PODS else _first_failure(pods)
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
            + (f": {queue_message}" if queue_message else "")
            if queued
            else "spec.runPolicy.suspend is true; no pods run"
        )
        return Observation(Phase.SUSPENDED, reason, message, **counts)
    if missing:
        return Observation(Phase.PENDING, Reason.MISSING_DEPENDENCY, missing, **counts)
    if unschedulable := _unschedulable(pods):
        return Observation(
            Phase.PENDING,
            "Unschedulable",
            f"training pods cannot be scheduled: {unschedulable}",
            unschedulable=unschedulable,
            **counts,
        )
    restarts = counts["failed"]
    finished = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    if (counts["succeeded"] or finished) and not running:
        return Observation(
            Phase.RUNNING, "Finishing", "training pods finished; completing", **counts
        )
    if running:
        message = f"{len(running)}/{ftj.spec.resources.nodes} training pods running"
        if restarts:
            last = _first_failure(pods)
            detail = f": {last[0]}: {last[1]}" if last else ""
            message += f" (retry {restarts} of {ftj.spec.run_policy.backoff_limit}{detail})"
        return Observation(Phase.RUNNING, "Running", message, restarts=restarts, **counts)
    return Observation(
        Phase.PENDING, "Starting", "training pods are starting", restarts=restarts, **counts
    )


# The Workload conditions that say why a Workload waits, in the order they are asked.
_WORKLOAD_WAITING = ("QuotaReserved", "Admitted")


def workload_message(workloads: list[dict[str, Any]]) -> str | None:
    """Kueue's own words for why a Job's Workload is not admitted ("couldn't assign flavors to
    pod set main: insufficient unused quota for nvidia.com/gpu in flavor default, 8 more
    needed"); None when Kueue has said nothing (no Workload yet, or admitted)."""
    for workload in workloads:
        conditions = {
            c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []
        }
        for kind in _WORKLOAD_WAITING:
            condition = conditions.get(kind)
            if condition and condition.get("status") == "False" and condition.get("message"):
                return str(condition["message"])
    return None


# -- the status the operator writes ------------------------------------------------------------

FINISHED = (Phase.SUCCEEDED.value, Phase.FAILED.value)
Update = tuple[str, bool, str, str]


def verdict_conditions(seen: Observation, queued: bool, heartbeat: Update | None) -> list[Update]:
    """Ready / Reconciling / Stalled with kstatus's meaning, then the details.

    Succeeded: Ready. Failed, or a trainer whose heartbeat went stale: Stalled (a person must
    act). Pending, starting, running, waiting for Kueue, unschedulable: Reconciling. Suspended by
    the spec: none of them true (nothing is under way, nothing is wrong, the job is not done).
    """
    phase, reason, message = seen.phase, seen.reason, seen.message
    failed = phase == Phase.FAILED
    stall_reason, stall_message = reason, message
    if not failed and heartbeat is not None and heartbeat[2] == Reason.HEARTBEAT_STALE:
        stall_reason, stall_message = heartbeat[2], heartbeat[3]
    stalled = failed or stall_reason == Reason.HEARTBEAT_STALE
    if not stalled:
        stall_reason, stall_message = "AsExpected", ""
    held = phase == Phase.SUSPENDED and not queued
    under_way = not stalled and not held and phase != Phase.SUCCEEDED
    updates: list[Update] = [
        (T.READY, phase == Phase.SUCCEEDED, reason, message),
        (T.RECONCILING, under_way, reason if under_way else "Idle", message if under_way else ""),
        (T.STALLED, stalled, stall_reason, stall_message),
        (
            T.SUCCEEDED,
            phase == Phase.SUCCEEDED,
            reason if phase == Phase.SUCCEEDED else Reason.NOT_FINISHED,
            message if phase == Phase.SUCCEEDED else "training has not finished",
        ),
        (T.FAILED, failed, reason if failed else Reason.NOT_FAILED, message if failed else ""),
        (
            T.SUSPENDED,
            phase == Phase.SUSPENDED,
            reason if phase == Phase.SUSPENDED else Reason.NOT_SUSPENDED,
            message if phase == Phase.SUSPENDED else "",
        ),
        (
            T.SCHEDULED,
            seen.unschedulable is None,
            Reason.UNSCHEDULABLE if seen.unschedulable else Reason.SCHEDULED,
            seen.unschedulable or "",
        ),
    ]
    if heartbeat is not None:
        updates.append(heartbeat)
    return updates


def rejected_conditions(reason: str, message: str) -> list[Update]:
    """A spec the operator cannot run: Stalled until the spec changes; a missing Secret or
    claim is waited for (Reconciling), since it may still be created."""
    waiting = reason == Reason.MISSING_DEPENDENCY
    return [
        (T.READY, False, reason, message),
        (T.RECONCILING, waiting, reason if waiting else "Idle", message if waiting else ""),
        (
            T.STALLED,
            not waiting,
            reason if not waiting else "AsExpected",
            "" if waiting else message,
        ),
    ]


def heartbeat_look_needed(status: Mapping[str, Any], timeout_seconds: float, now: datetime) -> bool:
    """Whether a look at a running job, whose status the watch last showed as `status`, could
    change its TrainerHeartbeat condition now: its last report is past the timeout, or the
    condition says stale (a report since then sets it back). Otherwise the look would read the
    job and its Job and write nothing."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == T.TRAINER_HEARTBEAT and cond.get("status") == "False":
            return True
    beat = (status.get("progress") or {}).get("lastHeartbeat")
    return bool(beat) and (now - _parse_time(str(beat))).total_seconds() > timeout_seconds


def heartbeat_condition(progress: dict[str, Any], now: datetime, timeout_seconds: float) -> Update:
    """Whether the trainer still reports (it beats during download, training and evaluation)."""
    beat = progress.get("lastHeartbeat")
    if not beat:
        return (T.TRAINER_HEARTBEAT, True, Reason.NO_HEARTBEAT_YET, "")
    age = (now - _parse_time(str(beat))).total_seconds()
    if age > timeout_seconds:
        return (
            T.TRAINER_HEARTBEAT,
            False,
            Reason.HEARTBEAT_STALE,
            f"the trainer has reported nothing for {age:.0f}s (timeout {timeout_seconds:.0f}s)",
        )
    return (T.TRAINER_HEARTBEAT, True, Reason.HEARTBEAT_FRESH, "")
