"""FineTuneJob handlers: reconciles driven by the resource's and its children's watch events.

A reconcile builds the desired children (pure builders), writes only the ones whose live object
differs, and patches the status only where it changed: a cluster of idle FineTuneJobs receives no
writes from kubetune, and a restart with nothing changed writes nothing. The only periodic work is
a read of each Running job once a minute, to notice a trainer that stopped reporting (no event
says so): one thread for all of them, not a kopf timer per job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kubetune import metrics, planner
from kubetune.api.v1alpha1.base import API_VERSION, Condition, ConditionStatus
from kubetune.api.v1alpha1.finetunejob import KIND, PLURAL, FineTuneJob, Phase, RunPolicy
from kubetune.api.v1alpha1.reasons import VALIDATED, ConditionType, Reason, ValidatedReason
from kubetune.builders import preflight, training
from kubetune.builders.common import COMPONENT_LABEL, FTJ_LABEL, MANAGED_BY, Owner
from kubetune.builders.drift import differs
from kubetune.builders.training_status import (
    FINISHED,
    Observation,
    gpu_usage,
    heartbeat_condition,
    heartbeat_look_needed,
    observe,
    rejected_conditions,
    verdict_conditions,
    workload_message,
)
from kubetune.handlers import children
from kubetune.handlers.common import (
    Context,
    apply_children,
    blocking,
    conditions_of,
    context,
    describe_validation_error,
    is_new,
    later,
    post_event,
    reconcile_fresh,
    refused,
    with_conditions,
    write_status,
)
from kubetune.handlers.indexes import pod_view
from kubetune.kube import FIELD_MANAGER, KubeError

GROUP, VERSION = API_VERSION.split("/")
log = logging.getLogger("kubetune")
ReconcileFn = Callable[[Context, dict[str, Any]], None]
CHILD_SELECTOR: dict[str, Any] = {
    MANAGED_BY: "kubetune",
    FTJ_LABEL: kopf.PRESENT,
}
HEARTBEAT_CHECK_SECONDS = 60
KUEUE_WORKLOAD = ("kueue.x-k8s.io/v1beta2", "Workload")
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"


class SpecRejected(Exception):
    """The spec can never work as written (or waits for a dependency); the message names the
    field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_heartbeat(ctx: Context, namespace: str, name: str) -> None:
    """A running job's trainer that went silent produces no event: this periodic check (every
    HEARTBEAT_CHECK_SECONDS, for the jobs `refresh_status` last saw running) notices it. It reads
    the job only when the status its watch last showed says that a look could change something
    (`heartbeat_look_needed`): 1,000 running jobs cost no reads a minute, not 2,000."""
    seen = ctx.running.get((namespace, name))
    if seen is not None and not heartbeat_look_needed(seen[0], seen[1], datetime.now(UTC)):
        return
    stub = {"metadata": {"name": name, "namespace": namespace}}
    # Read from the server: the look may mark the trainer silent and restart its pods, which
    # must not rest on a watch that fell silent itself.
    reconcile_fresh(ctx, KIND, stub, _refresh_locked, read=True)


HEARTBEAT_TIMEOUT_DEFAULT = float(RunPolicy.model_fields["heartbeat_timeout_seconds"].default)


def _note_running(ctx: Context, body: dict[str, Any]) -> None:
    """Keep what the heartbeat check decides on for a running job, from its latest event."""
    meta, status = body["metadata"], body.get("status") or {}
    key = (meta["namespace"], meta["name"])
    if status.get("phase") != Phase.RUNNING.value:
        ctx.running.pop(key, None)
        return
    policy = (body.get("spec") or {}).get("runPolicy") or {}
    timeout = float(policy.get("heartbeatTimeoutSeconds") or HEARTBEAT_TIMEOUT_DEFAULT)
    heartbeat = [
        c
        for c in status.get("conditions") or []
        if c.get("type") == ConditionType.TRAINER_HEARTBEAT
    ]
    beat = (status.get("progress") or {}).get("lastHeartbeat")
    view = {"conditions": heartbeat, "progress": {"lastHeartbeat": beat} if beat else {}}
    ctx.running[key] = (view, timeout)


def reconcile_body(ctx: Context, body: dict[str, Any]) -> None:
    """Make the children match the spec, then say in status what the children show."""
    reconcile_fresh(ctx, KIND, body, _reconcile_locked, read=True)


def _reconcile_locked(ctx: Context, body: dict[str, Any]) -> None:
    owner = Owner.from_body(body)
    fresh = is_new(body)
    try:
        ftj = _parse(body)
        # Read from the server: a finished run whose Job went while the watch was down must
        # see it gone (a copy would have it train again).
        live_job = None if fresh else _live_job(ctx, owner, read=True)
        if _finished(body) and live_job is None:
            # Its Job went (ttlSecondsAfterFinished, or a person): the run is over, the status
            # keeps what it showed. Creating the Job again would train again. A later spec edit
            # is acted on by doing nothing, which observedGeneration says.
            status = {"observedGeneration": owner.generation}
            write_status(ctx.kube, KIND, "FineTuneJob", body, status, ctx.latest)
            return
        _check_dependencies(ctx, ftj, owner)
        children = _children(ctx, ftj, owner)
        checking = preflight.wanted(body, ctx.settings.preflight) and live_job is None
        if checking and not preflight_passed(ctx, body, ftj, owner, children[:-1]):
            return  # checking (its Job's events come back here), or refused
        stale_job = _stale_job(live_job, children[-1])
        if (_spec_changed(body) and not fresh) or refused(body):
            _apply_all(ctx, children[:-1] if stale_job else children, dry_run=True)
        if stale_job:
            # A Job's pod template is immutable: a changed template means a new Job, which
            # resumes from the last checkpoint.
            ctx.kube.delete("batch/v1", "Job", stale_job, owner.namespace)
            post_event(
                body, False, "Recreating", f"pod template changed; recreating Job {stale_job}"
            )
            live_job = None
        # Also for a Job that exists: its next pod (a retry, a replacement) needs the account,
        # which may have gone while no operator watched (read once per namespace and process).
        ensure_trainer_identity(ctx, owner.namespace)
        if live_job is None:
            _create_suspended_for_kueue(ctx, ftj, children[-1])
        applied = _apply_all(ctx, children, dry_run=False, fresh=fresh)
    except SpecRejected as err:
        _report_rejected(ctx, body, owner, err)
        return
    ctx.refusal_over(KIND, owner.namespace, owner.name)
    job = applied.get(("Job", children[-1]["metadata"]["name"]))
    if job is not None:
        ctx.latest.answered("Job", job)
    refresh_status(ctx, body, ftj, job)


def ensure_trainer_identity(ctx: Context, namespace: str) -> None:
    """The namespace's trainer ServiceAccount, Role and RoleBinding, as built: read and (where
    missing or changed) applied the first time this process needs them in `namespace`; after
    that their own watch (handlers/children.py, `identity_event`) says when one went or
    changed. Under a per-namespace lock: a burst's first reconciles do not all apply them."""
    if namespace in ctx.identities:
        return
    with ctx.lock("TrainerIdentity", namespace, ""):
        if namespace in ctx.identities:
            return
        _apply_all(ctx, training.build_trainer_identity(namespace), dry_run=False)
        ctx.identities.add(namespace)


def identity_event(ctx: Context, event: dict[str, Any]) -> Callable[[], None] | None:
    """The trainer identity's edit or deletion (or a label taken away, which the selected watch
    sends as a deletion): restore it while the namespace has a FineTuneJob (a job's retried pod
    needs it). Once none is left, a person may remove it for good."""
    obj = event.get("object") or {}
    meta = obj.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    if event.get("type") == "MODIFIED":
        wanted = [
            c
            for c in training.build_trainer_identity(namespace)
            if c["kind"] == obj.get("kind") and c["metadata"]["name"] == meta.get("name")
        ]
        if not wanted or not differs(wanted[0], obj):
            return None  # the apply's own echo, or a change to a field kubetune does not set

    def run() -> None:
        ctx.identities.discard(namespace)
        if ctx.kube.list(API_VERSION, KIND, namespace, limit=1):
            try:
                ensure_trainer_identity(ctx, namespace)
            except (SpecRejected, kopf.TemporaryError) as err:
                log.warning("%s: could not restore the trainer identity: %s", namespace, err)

    return run


def _behind(body: dict[str, Any]) -> bool:
    """Whether this generation of the spec has not been reconciled yet (a new resource, or a
    spec edit: the API server moves metadata.generation only on a spec change)."""
    return _spec_changed(body) and not body["metadata"].get("deletionTimestamp")


def _reconcile_if_behind(ctx: Context, body: dict[str, Any]) -> None:
    """An event's reconcile, on the object as the server has it now: an earlier event's
    reconcile may have caught up with it meanwhile (then nothing is done)."""
    if _behind(body):
        _reconcile_locked(ctx, body)


def _reconcile_event(
    ctx: Context, body: dict[str, Any], reconcile: ReconcileFn, read: bool = False
) -> None:
    """Reconcile from a watch event (on the body that event brought, or newer). A passing
    failure (kopf.TemporaryError, e.g. a claim not there yet) is tried again after its delay, as
    kopf's own retries did: one retry waiting per resource, and a retry reconciles whether or not
    the generation moved (a missing dependency was already reported for it), on the object read
    from the server (no event vouches for a copy by then)."""
    meta = body["metadata"]

    def again() -> None:
        _reconcile_event(ctx, body, _reconcile_locked, read=True)

    try:
        reconcile_fresh(ctx, KIND, body, reconcile, read=read)
    except kopf.TemporaryError as err:
        log.info("%s/%s: will retry in %ss: %s", meta["namespace"], meta["name"], err.delay, err)
        ctx.retry_once(KIND, meta["namespace"], meta["name"], float(err.delay or 10), again)
    except Exception:
        log.exception("reconciling %s/%s failed; retrying in 60s", meta["namespace"], meta["name"])
        ctx.retry_once(KIND, meta["namespace"], meta["name"], 60.0, again)


def _retry_locked(ctx: Context, body: dict[str, Any]) -> None:
    """The refusal's retry: only while this generation is still the refused one (a spec edit
    was reconciled by its own handler)."""
    if refused(body):
        _reconcile_locked(ctx, body)


def _restore_locked(ctx: Context, body: dict[str, Any]) -> None:
    """A child went or drifted: restore it, unless the spec was refused (then the children's
    removal is what the refusal did, and building them again would loop)."""
    if not refused(body):
        _reconcile_locked(ctx, body)


# -- issue 10: the pre-flight check, before any GPU is held ----------------------------------


def preflight_passed(
    ctx: Context, body: dict[str, Any], ftj: FineTuneJob, owner: Owner, setup: list[dict[str, Any]]
) -> bool:
    """True when the pre-flight Job's verdict lets the training Job be created.

    Until then the Job runs (with the ConfigMap and the rest of `setup` it needs) and the status
    says Validated=Unknown; a refusal is Validated=False and Stalled, and no training Job is
    made. A changed spec or GPU size is checked again (the Job's digest differs)."""
    res = ftj.spec.resources
    nodes = [
        view.get("labels") or {}
        for view in ctx.indexes.node_list()
        if (view.get("gpus") or {}).get(res.gpu_resource_name)
        and all((view.get("labels") or {}).get(k) == v for k, v in res.node_selector.items())
    ]
    size, source = planner.device_memory(ftj.spec, nodes)
    job = preflight.build_preflight_job(ftj, owner, ctx.settings, size, source)
    name, namespace = job["metadata"]["name"], owner.namespace
    live = ctx.kube.get("batch/v1", "Job", name, namespace)
    if live is not None and preflight.checked_digest(live) != preflight.checked_digest(job):
        ctx.kube.delete("batch/v1", "Job", name, namespace)  # its DELETED event comes back
        return False
    if live is None:
        _apply_all(ctx, [*setup, job], dry_run=False)
        message = "the pre-flight pod checks the sources and plans memory"
        _write_preflight(
            ctx,
            body,
            owner,
            [
                (VALIDATED, ConditionStatus.UNKNOWN, ValidatedReason.CHECKING, message),
                (ConditionType.READY, False, ValidatedReason.CHECKING, message),
                (ConditionType.RECONCILING, True, ValidatedReason.CHECKING, message),
                (ConditionType.STALLED, False, "AsExpected", ""),
            ],
            {"phase": Phase.PENDING.value},
        )
        return False
    finished = (live.get("status") or {}).get("succeeded") or (live.get("status") or {}).get(
        "failed"
    )
    pods = (
        ctx.kube.list("v1", "Pod", namespace, f"batch.kubernetes.io/job-name={name}")
        if finished
        else []
    )
    result = preflight.outcome(live, pods)
    if result is None:
        return False
    plan = result.plan.to_wire() if result.plan else None
    if result.validated:
        _write_preflight(
            ctx, body, owner, [(VALIDATED, True, result.reason, result.message)], {"plan": plan}
        )
        return True
    updates = [
        *rejected_conditions(result.reason, result.message),
        (VALIDATED, False, result.reason, result.message),
    ]
    status = {
        "phase": Phase.FAILED.value,
        "observedGeneration": owner.generation,
        "failureReason": str(result.reason),
        "failureMessage": result.message,
        "plan": plan,
    }
    if _write_preflight(ctx, body, owner, updates, status):
        post_event(body, True, str(result.reason), result.message)
    return False


def _write_preflight(
    ctx: Context,
    body: dict[str, Any],
    owner: Owner,
    updates: Sequence[tuple[str, bool | ConditionStatus, str, str]],
    fields: dict[str, Any],
) -> bool:
    conditions = with_conditions(conditions_of(body), owner.generation, updates)
    status = {**fields, "conditions": _wire(conditions)}
    written = write_status(ctx.kube, KIND, "FineTuneJob", body, status, ctx.latest)
    body["status"] = {**(body.get("status") or {}), **status}  # what follows builds on it
    return written


def _gave_up(job: dict[str, Any]) -> str | None:
    """The reason of the Job's own failure condition (BackoffLimitExceeded, PodFailurePolicy)."""
    conditions = (job.get("status") or {}).get("conditions") or []
    for type_ in ("Failed", "FailureTarget"):  # as training_status.observe reads them
        for cond in conditions:
            if cond.get("type") == type_ and cond.get("status") == "True":
                return str(cond.get("reason") or "Failed")
    return None


def _refresh_locked(ctx: Context, body: dict[str, Any], job: dict[str, Any] | None = None) -> None:
    try:
        ftj = FineTuneJob.model_validate(body)
    except ValidationError:
        return  # the parent's own reconcile reports a bad spec
    refresh_status(ctx, body, ftj, job)


def _finished(body: dict[str, Any]) -> bool:
    status = body.get("status") or {}
    return status.get("phase") in FINISHED and bool(status.get("completionTime"))


def _live_job(ctx: Context, owner: Owner, read: bool = False) -> dict[str, Any] | None:
    """The training Job: its watch's newest copy (handlers/latest.py), else (or with `read`)
    what the server has."""
    name = training.names(owner.name)["job"]
    job = None if read else ctx.latest.recall("Job", owner.namespace, name)
    return job or ctx.kube.get("batch/v1", "Job", name, owner.namespace)


def _parse(body: dict[str, Any]) -> FineTuneJob:
    try:
        ftj = FineTuneJob.model_validate(body)
    except ValidationError as err:
        raise SpecRejected(Reason.INVALID_SPEC, describe_validation_error(err)) from err
    problems = training.check_spec(ftj.spec)
    if problems:
        raise SpecRejected(Reason.INVALID_SPEC, "; ".join(str(p) for p in problems))
    return ftj


def _check_dependencies(ctx: Context, ftj: FineTuneJob, owner: Owner) -> None:
    """The claims the spec names exist (from the claims index: no read per reconcile)."""
    missing = []
    for dep in training.dependencies(ftj.spec):
        if dep.kind == "PersistentVolumeClaim":
            exists = ctx.indexes.has_claim(owner.namespace, dep.name)
        else:
            exists = ctx.kube.get("v1", dep.kind, dep.name, owner.namespace) is not None
        if not exists:
            missing.append(f"{dep.field}: {dep.kind} {dep.name!r} not found in {owner.namespace}")
    if missing:
        raise SpecRejected(Reason.MISSING_DEPENDENCY, "; ".join(missing))


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
    what happens to a field its only applier stops sending. Called only when no Job exists."""
    meta = job["metadata"]
    if not _kueue_decides(ftj):
        return
    suspended = {**job, "spec": {**job["spec"], "suspend": True}}
    try:
        ctx.kube.apply(suspended, field_manager=f"{FIELD_MANAGER}-kueue-handoff")
    except KubeError as err:
        raise kopf.TemporaryError(
            f"creating Job {meta['name']} suspended: {err}", delay=10
        ) from err


def _workload_message(ctx: Context, job: dict[str, Any] | None) -> str | None:
    """Why Kueue has not admitted the suspended Job yet, from its Workload (Kueue labels it with
    the Job's uid); None while the Job runs, and where Kueue is not installed."""
    if not ctx.kueue or job is None or not (job.get("spec") or {}).get("suspend"):
        return None  # no Kueue (yet): the status names the queue only
    meta = job["metadata"]
    selector = f"{KUEUE_JOB_UID}={meta['uid']}"
    try:
        workloads = ctx.kube.list(*KUEUE_WORKLOAD, meta["namespace"], selector)
    except KubeError:
        return None
    return workload_message(workloads)


def _stale_job(live: dict[str, Any] | None, job: dict[str, Any]) -> str | None:
    """The name of the live Job when its pod template differs from the one we would build."""
    if live is None:
        return None
    live_hash = (live["metadata"].get("annotations") or {}).get(training.TEMPLATE_HASH)
    meta = job["metadata"]
    return None if live_hash == meta["annotations"][training.TEMPLATE_HASH] else str(meta["name"])


def _spec_changed(body: dict[str, Any]) -> bool:
    observed = (body.get("status") or {}).get("observedGeneration")
    return bool(observed != body["metadata"].get("generation"))


def _apply_all(
    ctx: Context, children: list[dict[str, Any]], dry_run: bool, fresh: bool = False
) -> dict[tuple[str, str], dict[str, Any]]:
    return apply_children(
        ctx.kube,
        children,
        dry_run,
        lambda message: SpecRejected(Reason.CHILD_REJECTED, message),
        fresh=fresh,
    )


def _report_rejected(ctx: Context, body: dict[str, Any], owner: Owner, err: SpecRejected) -> None:
    waiting = err.reason == Reason.MISSING_DEPENDENCY
    conditions = with_conditions(
        conditions_of(body), owner.generation, rejected_conditions(err.reason, str(err))
    )
    status = {
        "phase": Phase.PENDING.value if waiting else Phase.FAILED.value,
        "conditions": _wire(conditions),
        "observedGeneration": owner.generation,
        "failureReason": err.reason,
        "failureMessage": str(err),
    }
    write_status(ctx.kube, KIND, "FineTuneJob", body, status, ctx.latest)
    if err.reason == Reason.CHILD_REJECTED:
        ctx.retry_refusal(
            KIND, body, lambda: reconcile_fresh(ctx, KIND, body, _retry_locked, read=True)
        )
    if waiting:
        raise kopf.TemporaryError(str(err), delay=15)  # it may appear: look again


def refresh_status(
    ctx: Context, body: dict[str, Any], ftj: FineTuneJob, job: dict[str, Any] | None = None
) -> None:
    """Say in status what the Job and pods show. `job`: the training Job as the server just
    returned it (an apply's answer, a watch event), else it is read."""
    owner = Owner.from_body(body)
    if job is None:
        job = _live_job(ctx, owner)
    if job is None and _finished(body):
        return  # the finished run's Job is gone: the status keeps what it showed
    pods = ctx.indexes.pods_of(owner.namespace, KIND, owner.name)
    queue_message = _workload_message(ctx, job) if _kueue_decides(ftj) else None
    seen = observe(ftj, job, pods, queue_message)
    if job is not None and seen.phase == Phase.FAILED and seen.failure_reason == _gave_up(job):
        # The Job failed, and no pod in the index says why yet: the pod's own event (on another
        # watch) may come after the Job's. The Job controller acted on what the server has, so
        # its pods are read from there, once, and the trainer's reason is not lost.
        name = job["metadata"]["name"]
        listed = ctx.kube.list("v1", "Pod", owner.namespace, f"batch.kubernetes.io/job-name={name}")
        pods = [pod_view(pod) for pod in listed]
        seen = observe(ftj, job, pods, queue_message)
    old = body.get("status") or {}
    now = datetime.now(UTC)
    heartbeat = (
        heartbeat_condition(
            old.get("progress") or {}, now, ftj.spec.run_policy.heartbeat_timeout_seconds
        )
        if seen.phase == Phase.RUNNING
        else None
    )
    status = _status(ctx, ftj, owner, seen, old, conditions_of(body), heartbeat, pods, now)
    write_status(ctx.kube, KIND, "FineTuneJob", body, status, ctx.latest)
    ctx.watch(
        "heartbeat",
        owner.namespace,
        owner.name,
        seen.phase == Phase.RUNNING,
        HEARTBEAT_CHECK_SECONDS,
        lambda namespace, name: _check_heartbeat(ctx, namespace, name),
    )
    if (
        heartbeat is not None
        and heartbeat[2] == Reason.HEARTBEAT_STALE
        and ftj.spec.run_policy.restart_on_stale_heartbeat
    ):
        _restart_silent_pods(ctx, body, owner, pods, heartbeat[3])


def _restart_silent_pods(
    ctx: Context, body: dict[str, Any], owner: Owner, pods: list[dict[str, Any]], why: str
) -> None:
    """The Job replaces the deleted pods; the trainer resumes from its last checkpoint."""
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    for pod in running:
        ctx.kube.delete("v1", "Pod", pod["metadata"]["name"], owner.namespace)
    if running:
        post_event(body, True, "RestartingSilentTrainer", f"{why}; restarting the training pods")


def _status(
    ctx: Context,
    ftj: FineTuneJob,
    owner: Owner,
    seen: Observation,
    old: dict[str, Any],
    conditions: list[Condition],
    heartbeat: tuple[str, bool, str, str] | None,
    pods: list[dict[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    phase = seen.phase
    queued = _kueue_decides(ftj)
    updates = verdict_conditions(seen, queued, heartbeat)
    res = ftj.spec.resources
    gpus = res.nodes * res.gpus_per_node
    status: dict[str, Any] = {
        "phase": phase.value,
        "conditions": _wire(with_conditions(conditions, owner.generation, updates)),
        "observedGeneration": owner.generation,
        "trainingJob": training.names(owner.name)["job"],
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
    hours, kwh = gpu_usage(
        pods, res.gpus_per_node, _watts_by_node(ctx, pods), ctx.settings.default_gpu_watts, now
    )
    status["gpuHours"], status["energyKwh"] = hours, kwh
    if phase == Phase.SUCCEEDED:
        status["progressText"] = "100%"
    elif text := progress_text(old.get("progress") or {}):
        status["progressText"] = text
    return status


def _watts_by_node(ctx: Context, pods: list[dict[str, Any]]) -> dict[str, float]:
    nodes = {view["name"]: view for view in ctx.indexes.node_list()}
    watts = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        product = ((nodes.get(node) or {}).get("labels") or {}).get("nvidia.com/gpu.product")
        if node and isinstance(product, str) and product in ctx.settings.gpu_watts:
            watts[node] = ctx.settings.gpu_watts[product]
    return watts


def progress_text(progress: dict[str, Any]) -> str | None:
    """'42% 84/200' for `kubectl get ftj`, from the progress the trainer reports."""
    if not progress.get("totalSteps"):
        return None
    return f"{progress.get('percent', 0)}% {progress.get('step', 0)}/{progress['totalSteps']}"


def _wire(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [c.to_wire() for c in conditions]


# -- children: mirror their changes into the parent, restore them when deleted or edited ---------


def _owner_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The owning FineTuneJob's metadata (name, namespace, uid when known), from the child alone:
    the reconcile reads the FineTuneJob itself, once, under its lock."""
    meta = obj.get("metadata", {})
    if obj.get("kind") == "Pod":  # pods are owned by the Job; the label names the FineTuneJob
        name = (meta.get("labels") or {}).get(FTJ_LABEL)
        return {"metadata": {"name": name, "namespace": meta["namespace"]}} if name else None
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION:
            return {
                "metadata": {"name": ref["name"], "namespace": meta["namespace"], "uid": ref["uid"]}
            }
    return None


def _child_drifted(ctx: Context, parent: dict[str, Any], obj: dict[str, Any]) -> bool:
    """Whether `obj` (a child the reconcile applies: not a pod) no longer holds what kubetune
    would apply to it. Only that child is built (a burst brings several Job events per job)."""
    if obj.get("kind") == "Pod":
        return False
    try:
        ftj = FineTuneJob.model_validate(parent)
    except ValidationError:
        return False
    meta = obj.get("metadata") or {}
    child = training.build_child(ftj, Owner.from_body(parent), ctx.settings, str(obj.get("kind")))
    if child is None or child["metadata"]["name"] != meta.get("name"):
        return False
    if child["kind"] == "Job" and _kueue_decides(ftj):
        del child["spec"]["suspend"]  # as _children builds it
    return differs(child, obj)


def _child_event(ctx: Context, event: dict[str, Any]) -> Callable[[], None] | None:
    """A child changed: what to do about it (blocking), or None when nothing. Events of the
    initial listing (type None) are skipped: the resume handler reconciles every FineTuneJob
    once at start-up anyway. So are the creations of children (ADDED, but for pods, which the
    Job controller creates): they are kubetune's own.

    The event is noted for its FineTuneJob (Context.note_child); the returned work looks at all
    the events noted for it by the time it runs, under the job's lock, and is returned only to
    the first of them: the later ones are folded into that look."""
    kind = event.get("type")
    obj = event.get("object") or {}
    if obj.get("kind") == "Job" and not preflight.is_preflight_job(obj):
        ctx.latest.seen("Job", kind, obj)
    if kind is None or (kind == "ADDED" and obj.get("kind") != "Pod"):
        return None  # a child's creation is the reconcile's own write, which refreshes the status
    owner = _owner_of(obj)
    if owner is None:
        return None
    meta = obj.get("metadata") or {}
    if obj.get("kind") == "Pod":  # a pod is read from the index: its kind and labels suffice
        obj = {"kind": "Pod", "metadata": {"labels": meta.get("labels") or {}}}
    if not ctx.note_child(
        KIND, owner, (obj.get("kind"), meta.get("name")), {**event, "object": obj}
    ):
        return None
    owner_meta = owner["metadata"]

    def run() -> None:
        stub, events = ctx.take_children(KIND, owner_meta["namespace"], owner_meta["name"])
        with later():
            reconcile_fresh(ctx, KIND, stub, lambda c, parent: _on_children(c, parent, events))

    return run


def _on_children(ctx: Context, parent: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """What the children's noted events ask of their FineTuneJob: a reconcile when one went,
    drifted or is the pre-flight Job (whose verdict decides whether the training Job comes),
    else one refresh of the status."""
    if parent["metadata"].get("deletionTimestamp") or refused(parent):
        return
    reconcile, read_job, refresh = False, False, False
    for event in events:
        obj = event.get("object") or {}
        gone = event.get("type") == "DELETED"
        if gone or preflight.is_preflight_job(obj) or _child_drifted(ctx, parent, obj):
            reconcile = True
        elif obj.get("kind") == "Job" and (obj.get("status") or {}).get("conditions"):
            # A Job that finished is read again: the pod event that says why (its exit code,
            # on another watch) may still be on its way, and the read gives it the time.
            read_job = True
        elif obj.get("kind") in ("Pod", "Job"):
            refresh = True  # the Job as its watch last showed it (handlers/latest.py)
    if reconcile:
        # It writes children: on the job as the server has it, not on a copy (a job deleted
        # while its watch was down is in no event, and its copy would build them again).
        meta = parent["metadata"]
        server = ctx.kube.get(API_VERSION, KIND, meta["name"], meta["namespace"])
        if server is not None and server["metadata"].get("uid") == meta.get("uid"):
            _reconcile_locked(ctx, server)
    elif read_job or refresh:
        _refresh_locked(ctx, parent, _live_job(ctx, Owner.from_body(parent), read=read_job))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def progress_event(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """The resource's own events. A new generation of the spec (a creation, an edit) is
    reconciled, and so is every FineTuneJob at the first listing (a start) and one listed again
    after a broken watch (Context.relisted). These events, not kopf's create/update/resume
    handlers, drive the reconcile: those keep the last handled spec in an annotation on every
    object, one more write per creation and per edit, and a second copy of the spec in every
    body the operator receives. The trainer reported progress: keep the printer column in
    step (one cheap patch)."""
    body = _object(event)
    status = body.get("status") or {}
    ctx = context(memo, kwargs)
    kind = _event(event).get("type")
    if body:
        ctx.latest.seen(KIND, kind, body)  # before any reconcile this event starts reads it
    relisted = ctx.relisted(KIND, _event(event))
    if body and kind != "DELETED":
        reconcile: ReconcileFn | None = None
        if relisted:
            reconcile = _restore_locked
        elif kind is None and not body["metadata"].get("deletionTimestamp"):
            reconcile = _reconcile_locked  # the first listing of this process: resume
        elif _behind(body):
            reconcile = _reconcile_if_behind
        if reconcile is not None:
            chosen = reconcile
            await blocking(ctx, lambda: _reconcile_event(ctx, body, chosen))
        if relisted:
            return
    if body:  # every change of every job, the trainer's progress included: the per-job series
        meta = body["metadata"]
        gone = _event(event).get("type") == "DELETED"
        metrics.record_job(meta["namespace"], meta["name"], None if gone else status)
        if gone:
            metrics.record_phase(KIND, f"{meta['namespace']}/{meta['name']}", None)
            ctx.watch("heartbeat", meta["namespace"], meta["name"], False, 0, lambda *_: None)
            ctx.running.pop((meta["namespace"], meta["name"]), None)
            return
        _note_running(ctx, body)
    if not body or status.get("phase") != Phase.RUNNING.value:
        return
    text = progress_text(status.get("progress") or {})
    if text and text != status.get("progressText"):
        meta = body["metadata"]

        def write() -> None:
            with ctx.lock(KIND, meta["namespace"], meta["name"]), later():
                write_status(
                    ctx.kube, KIND, "FineTuneJob", body, {"progressText": text}, ctx.latest
                )

        await blocking(ctx, write)


@kopf.on.event("", "v1", "persistentvolumeclaims")
def claim_event(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """A claim was created: the FineTuneJobs of its namespace that wait for it (Pending,
    MissingDependency) are reconciled at once, not at their next retry."""
    if _event(event).get("type") != "ADDED":
        return  # the initial listing (type None): the resume handlers run anyway
    meta = _object(event).get("metadata") or {}
    ctx = context(memo, kwargs)
    for body in ctx.kube.list(API_VERSION, KIND, meta.get("namespace")):
        status = body.get("status") or {}
        waiting = status.get("failureReason") == Reason.MISSING_DEPENDENCY
        if waiting and f"PersistentVolumeClaim {meta.get('name')!r}" in str(
            status.get("failureMessage")
        ):
            with later():
                reconcile_body(ctx, body)


@kopf.on.event("kueue.x-k8s.io", "v1beta2", "workloads")
def workload_event(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """Kueue's Workload for a training Job changed (queued, quota reserved, admitted): the
    FineTuneJob's status says what Kueue says. kopf starts this watch when Kueue's CRDs exist."""
    obj = _object(event)
    ctx = context(memo, kwargs)
    ctx.kueue = True
    if _event(event).get("type") in (None, "DELETED") or not obj:
        return
    meta = obj.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") != "Job" or ref.get("apiVersion") != "batch/v1":
            continue
        job = ctx.kube.get("batch/v1", "Job", ref["name"], meta["namespace"])
        labels = (job or {}).get("metadata", {}).get("labels") or {}
        ours = job is not None and labels.get(MANAGED_BY) == "kubetune" and FTJ_LABEL in labels
        if ours and (work := _child_event(ctx, {"type": "MODIFIED", "object": job})):
            work()


# The ConfigMap and the namespace's trainer identity (ServiceAccount, Role, RoleBinding) come
# through handlers/children.py, which keeps no per-object state for them; the Job, its pods and
# a multi-node job's Service through kopf.
@kopf.on.event("batch", "v1", "jobs", labels=CHILD_SELECTOR)
@kopf.on.event("", "v1", "pods", labels=CHILD_SELECTOR)
@kopf.on.event("", "v1", "services", labels=CHILD_SELECTOR)
async def child_event(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    ctx = context(memo, kwargs)
    if (work := _child_event(ctx, _event(event))) is not None:
        await blocking(ctx, work)


_WORK: set[asyncio.Future[None]] = set()  # kept, so the loop does not drop what is running


@kopf.on.startup()
async def watch_setup_children(
    settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any
) -> None:
    """The setup children's streams (handlers/children.py). Their edits and deletions are
    noted for the FineTuneJob on the event loop, as child_event does; the look that follows runs
    on the handler threads, without the stream waiting for it."""

    def handle(event: dict[str, Any]) -> None:
        ctx = context(memo, kwargs)  # configure (a later start-up handler) made it by now
        labels = ((event.get("object") or {}).get("metadata") or {}).get("labels") or {}
        shared = labels.get(COMPONENT_LABEL) == training.TRAINER_IDENTITY
        if (work := (identity_event if shared else _child_event)(ctx, event)) is not None:
            future = asyncio.ensure_future(blocking(ctx, work))
            _WORK.add(future)
            future.add_done_callback(_WORK.discard)

    log.debug("watching the setup children: %d streams", children.start(settings, handle))


@kopf.on.cleanup()
async def stop_watching_setup_children(**_: Any) -> None:
    children.stop()


def _event(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], event)


def _object(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], _event(event).get("object") or {})
