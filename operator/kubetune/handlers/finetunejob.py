"""FineTuneJob handlers: one reconcile for create, resume, update, timer and child events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kubetune import metrics
from kubetune.api.v1alpha1.base import API_VERSION, Condition
from kubetune.api.v1alpha1.finetunejob import KIND, PLURAL, FineTuneJob, Phase
from kubetune.builders import training
from kubetune.builders.common import FTJ_LABEL, MANAGED_BY, Owner
from kubetune.builders.training_status import Observation, observe
from kubetune.handlers.common import (
    Context,
    apply_children,
    conditions_of,
    context,
    describe_validation_error,
    later,
    post_event,
    reconcile_fresh,
    with_conditions,
    write_status,
)
from kubetune.kube import FIELD_MANAGER, KubeError, NotFound

GROUP, VERSION = API_VERSION.split("/")
CHILD_SELECTOR: dict[str, Any] = {
    MANAGED_BY: "kubetune",
    FTJ_LABEL: kopf.PRESENT,
}
GPU_WATTS = 700.0  # H100 SXM board power: the estimate behind status.energyKWh
STALL_AFTER_SECONDS = 900


class SpecRejected(Exception):
    """The spec can never work as written; the message names the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.timer(GROUP, VERSION, PLURAL, interval=30, initial_delay=30, idle=10)
def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconcile_body(context(memo), dict(body))


def reconcile_body(ctx: Context, body: dict[str, Any]) -> None:
    """Make the children match the spec, then say in status what the children show."""
    reconcile_fresh(ctx, KIND, body, _reconcile_locked)


def _reconcile_locked(ctx: Context, body: dict[str, Any]) -> None:
    owner = Owner.from_body(body)
    try:
        ftj = _parse(body)
        _check_dependencies(ctx, ftj, owner)
        children = _children(ctx, ftj, owner)
        stale_job = _stale_job(ctx, children[-1])
        if _spec_changed(body):
            _apply_all(ctx, children[:-1] if stale_job else children, dry_run=True)
        if stale_job:
            # A Job's pod template is immutable: a changed template means a new Job, which
            # resumes from the last checkpoint.
            ctx.kube.delete("batch/v1", "Job", stale_job, owner.namespace)
            post_event(
                body, False, "Recreating", f"pod template changed; recreating Job {stale_job}"
            )
        _create_suspended_for_kueue(ctx, ftj, children[-1])
        _apply_all(ctx, children, dry_run=False)
    except SpecRejected as err:
        _report_rejected(ctx, body, owner, err)
        return
    refresh_status(ctx, body, ftj)


def _parse(body: dict[str, Any]) -> FineTuneJob:
    try:
        ftj = FineTuneJob.model_validate(body)
    except ValidationError as err:
        raise SpecRejected("InvalidSpec", describe_validation_error(err)) from err
    problems = training.check_spec(ftj.spec)
    if problems:
        raise SpecRejected("InvalidSpec", "; ".join(str(p) for p in problems))
    return ftj


def _check_dependencies(ctx: Context, ftj: FineTuneJob, owner: Owner) -> None:
    missing = []
    for dep in training.dependencies(ftj.spec):
        if ctx.kube.get("v1", dep.kind, dep.name, owner.namespace) is None:
            missing.append(f"{dep.field}: {dep.kind} {dep.name!r} not found in {owner.namespace}")
    if missing:
        raise SpecRejected("MissingDependency", "; ".join(missing))


def _children(ctx: Context, ftj: FineTuneJob, owner: Owner) -> list[dict[str, Any]]:
    children = training.build_children(ftj, owner, ctx.settings)
    if _kueue_decides(ftj):
        del children[-1]["spec"]["suspend"]  # Kueue's field: see _create_suspended_for_kueue
    return children


def _kueue_decides(ftj: FineTuneJob) -> bool:
    return bool(ftj.spec.queue_name) and not ftj.spec.run_policy.suspend


def _create_suspended_for_kueue(ctx: Context, ftj: FineTuneJob, job: dict[str, Any]) -> None:
    """Kueue admits a Job by unsuspending it, so the Job must be created suspended. The field is
    applied once, under a field manager of its own: kubetune's applies leave it out, so they
    neither undo Kueue's decision nor make the server drop the field (back to false), which is
    what happens to a field its only applier stops sending."""
    meta = job["metadata"]
    if not _kueue_decides(ftj) or ctx.kube.get("batch/v1", "Job", meta["name"], meta["namespace"]):
        return
    suspended = {**job, "spec": {**job["spec"], "suspend": True}}
    try:
        ctx.kube.apply(suspended, field_manager=f"{FIELD_MANAGER}-kueue-handoff")
    except KubeError as err:
        raise kopf.TemporaryError(
            f"creating Job {meta['name']} suspended: {err}", delay=10
        ) from err


def _stale_job(ctx: Context, job: dict[str, Any]) -> str | None:
    """The name of the live Job when its pod template differs from the one we would build."""
    meta = job["metadata"]
    live = ctx.kube.get("batch/v1", "Job", meta["name"], meta["namespace"])
    if live is None:
        return None
    live_hash = (live["metadata"].get("annotations") or {}).get(training.TEMPLATE_HASH)
    return None if live_hash == meta["annotations"][training.TEMPLATE_HASH] else str(meta["name"])


def _spec_changed(body: dict[str, Any]) -> bool:
    observed = (body.get("status") or {}).get("observedGeneration")
    return bool(observed != body["metadata"].get("generation"))


def _apply_all(ctx: Context, children: list[dict[str, Any]], dry_run: bool) -> None:
    apply_children(
        ctx.kube, children, dry_run, lambda message: SpecRejected("ChildRejected", message)
    )


def _report_rejected(ctx: Context, body: dict[str, Any], owner: Owner, err: SpecRejected) -> None:
    conditions = with_conditions(
        conditions_of(body), owner.generation, [("Ready", False, err.reason, str(err))]
    )
    previous = (body.get("status") or {}).get("failureMessage")
    status = {
        "phase": Phase.FAILED.value if err.reason != "MissingDependency" else Phase.PENDING.value,
        "conditions": _wire(conditions),
        "observedGeneration": owner.generation,
        "failureReason": err.reason,
        "failureMessage": str(err),
    }
    write_status(ctx.kube, KIND, "FineTuneJob", body, status)
    if previous != str(err):
        post_event(body, True, err.reason, str(err))
    if err.reason == "MissingDependency":
        raise kopf.TemporaryError(str(err), delay=15)  # it may appear: look again


def refresh_status(ctx: Context, body: dict[str, Any], ftj: FineTuneJob) -> None:
    owner = Owner.from_body(body)
    names = training.names(owner.name)
    job = ctx.kube.get("batch/v1", "Job", names["job"], owner.namespace)
    pods = ctx.kube.list(
        "v1", "Pod", owner.namespace, label_selector=f"batch.kubernetes.io/job-name={names['job']}"
    )
    seen = observe(ftj, job, pods)
    old = body.get("status") or {}
    status = _status(ftj, owner, seen, old, conditions_of(body))
    write_status(ctx.kube, KIND, "FineTuneJob", body, status)
    if old.get("phase") != status["phase"] or old.get("failureReason") != status.get(
        "failureReason"
    ):
        post_event(body, seen.phase == Phase.FAILED, seen.reason, seen.message)


def _status(
    ftj: FineTuneJob,
    owner: Owner,
    seen: Observation,
    old: dict[str, Any],
    conditions: list[Condition],
) -> dict[str, Any]:
    phase = seen.phase
    finished = phase in (Phase.SUCCEEDED, Phase.FAILED)
    updates: list[tuple[str, bool, str, str]] = [
        ("Ready", True, "ChildrenReady", "training children are in place"),
        ("Running", phase == Phase.RUNNING, seen.reason, seen.message),
        (
            "Succeeded",
            phase == Phase.SUCCEEDED,
            seen.reason if finished else "NotFinished",
            seen.message if finished else "training has not finished",
        ),
        (
            "Failed",
            phase == Phase.FAILED,
            seen.reason if phase == Phase.FAILED else "NotFailed",
            seen.message if phase == Phase.FAILED else "",
        ),
        (
            "Suspended",
            phase == Phase.SUSPENDED,
            seen.reason if phase == Phase.SUSPENDED else "NotSuspended",
            seen.message if phase == Phase.SUSPENDED else "",
        ),
        (
            "Scheduled",
            seen.unschedulable is None,
            "Unschedulable" if seen.unschedulable else "Scheduled",
            seen.unschedulable or "",
        ),
    ]
    if phase == Phase.RUNNING:
        updates.append(_stall_condition(old))
    gpus = ftj.spec.resources.nodes * ftj.spec.resources.gpus_per_node
    status: dict[str, Any] = {
        "phase": phase.value,
        "conditions": _wire(with_conditions(conditions, owner.generation, updates)),
        "observedGeneration": owner.generation,
        "active": seen.active,
        "succeeded": seen.succeeded,
        "failed": seen.failed,
        "gpus": gpus if phase in (Phase.RUNNING, Phase.PENDING) else 0,
        "failureReason": seen.failure_reason,
        "failureMessage": seen.message if phase == Phase.FAILED else None,
    }
    if started := old.get("startTime") or seen.start_time:
        status["startTime"] = started
    if seen.completion_time:
        status["completionTime"] = seen.completion_time
    status.update(_usage(gpus, status.get("startTime"), seen.completion_time))
    progress = old.get("progress") or {}
    if phase == Phase.SUCCEEDED:
        status["progressText"] = "100%"
        if not (old.get("output") or {}).get("modelUri"):
            status["output"] = _expected_output(ftj)
    elif text := progress_text(progress):
        status["progressText"] = text
    return status


def progress_text(progress: dict[str, Any]) -> str | None:
    """'42% 84/200' for `kubectl get ftj`, from the progress the trainer reports."""
    if not progress.get("totalSteps"):
        return None
    return f"{progress.get('percent', 0)}% {progress.get('step', 0)}/{progress['totalSteps']}"


def _stall_condition(old: dict[str, Any]) -> tuple[str, bool, str, str]:
    beat = (old.get("progress") or {}).get("lastHeartbeat")
    if not beat:
        return ("Stalled", False, "NoHeartbeatYet", "")
    age = (datetime.now(UTC) - datetime.fromisoformat(beat.replace("Z", "+00:00"))).total_seconds()
    if age > STALL_AFTER_SECONDS:
        return ("Stalled", True, "HeartbeatStale", f"no progress reported for {age:.0f}s")
    return ("Stalled", False, "HeartbeatFresh", "")


def _usage(gpus: int, start: str | None, end: str | None) -> dict[str, Any]:
    if not start or not gpus:
        return {}
    begin = datetime.fromisoformat(start.replace("Z", "+00:00"))
    stop = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else datetime.now(UTC)
    hours = max((stop - begin).total_seconds(), 0.0) / 3600 * gpus
    return {"gpuHours": round(hours, 4), "energyKWh": round(hours * GPU_WATTS / 1000, 4)}


def _expected_output(ftj: FineTuneJob) -> dict[str, Any]:
    uri = ftj.spec.output.uri.rstrip("/")
    out: dict[str, Any] = {"modelUri": uri}
    if ftj.spec.output.triton:
        out["tritonRepositoryUri"] = f"{uri}/triton-repository"
    return out


def _wire(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [c.to_wire() for c in conditions]


# -- children: mirror their changes into the parent, restore them when deleted or edited ---------


def _owner_body(ctx: Context, obj: dict[str, Any]) -> dict[str, Any] | None:
    meta = obj.get("metadata", {})
    if obj.get("kind") == "Pod":  # pods are owned by the Job; the label names the FineTuneJob
        name = (meta.get("labels") or {}).get(FTJ_LABEL)
        return ctx.kube.get(API_VERSION, KIND, name, meta["namespace"]) if name else None
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION:
            namespace = obj["metadata"]["namespace"]
            try:
                parent = ctx.kube.get(API_VERSION, KIND, ref["name"], namespace)
            except NotFound:
                return None
            if parent is not None and parent["metadata"]["uid"] == ref["uid"]:
                return parent
    return None


def _on_child_event(ctx: Context, event: dict[str, Any], full: bool) -> None:
    with later():
        _child_event(ctx, event, full)


def _child_event(ctx: Context, event: dict[str, Any], full: bool) -> None:
    obj = event.get("object") or {}
    parent = _owner_body(ctx, obj)
    if parent is None or parent["metadata"].get("deletionTimestamp"):
        return
    if full or event.get("type") == "DELETED":
        reconcile_body(ctx, parent)
        return
    meta = parent["metadata"]
    with ctx.lock(KIND, meta["namespace"], meta["name"]):
        fresh = ctx.kube.get(API_VERSION, KIND, meta["name"], meta["namespace"])
        if fresh is None:
            return
        try:
            ftj = FineTuneJob.model_validate(fresh)
        except ValidationError:
            return  # the parent's own reconcile reports a bad spec
        refresh_status(ctx, fresh, ftj)


@kopf.on.event(GROUP, VERSION, PLURAL)
def progress_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """The trainer reported progress: keep the printer column in step (one cheap patch)."""
    body = _object(event)
    status = body.get("status") or {}
    if body and _event(event).get("type") == "DELETED":
        meta = body["metadata"]
        metrics.record_phase(KIND, f"{meta['namespace']}/{meta['name']}", None)
        return
    if not body or status.get("phase") != Phase.RUNNING.value:
        return
    text = progress_text(status.get("progress") or {})
    if text and text != status.get("progressText"):
        ctx = context(memo)
        meta = body["metadata"]
        with ctx.lock(KIND, meta["namespace"], meta["name"]), later():
            write_status(ctx.kube, KIND, "FineTuneJob", body, {"progressText": text})


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_SELECTOR)
def job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _on_child_event(context(memo), _event(event), full=True)


@kopf.on.event("", "v1", "pods", labels=CHILD_SELECTOR)
def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _on_child_event(context(memo), _event(event), full=False)


@kopf.on.event("", "v1", "configmaps", labels=CHILD_SELECTOR)
@kopf.on.event("", "v1", "services", labels=CHILD_SELECTOR)
@kopf.on.event("", "v1", "serviceaccounts", labels=CHILD_SELECTOR)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=CHILD_SELECTOR)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=CHILD_SELECTOR)
def config_child_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    if event.get("type") in ("DELETED", "MODIFIED"):
        _on_child_event(context(memo), _event(event), full=True)


def _event(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], event)


def _object(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], _event(event).get("object") or {})
