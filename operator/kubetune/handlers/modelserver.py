"""ModelServer handlers: one reconcile for create, resume, update, timer, children and jobs."""

from __future__ import annotations

import hashlib
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kubetune.api.v1alpha1.base import API_VERSION, Condition
from kubetune.api.v1alpha1.finetunejob import KIND as FTJ_KIND
from kubetune.api.v1alpha1.finetunejob import PLURAL as FTJ_PLURAL
from kubetune.api.v1alpha1.modelserver import KIND, PLURAL, ModelServer, Phase
from kubetune.builders import serving
from kubetune.builders.common import MANAGED_BY, MS_LABEL, Owner, selector_labels
from kubetune.builders.serving import ResolvedModel
from kubetune.handlers.common import (
    Context,
    conditions_of,
    context,
    describe_validation_error,
    later,
    post_event,
    with_conditions,
    write_status,
)
from kubetune.kube import Forbidden, Invalid, KubeError

GROUP, VERSION = API_VERSION.split("/")
CHILD_SELECTOR: dict[str, Any] = {
    MANAGED_BY: "kubetune",
    MS_LABEL: kopf.PRESENT,
}


class NotServable(Exception):
    """Nothing to roll out (yet or ever): the reason says which."""

    def __init__(self, reason: str, message: str, phase: Phase, retry: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.phase = phase
        self.retry = retry


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.timer(GROUP, VERSION, PLURAL, interval=30, initial_delay=30, idle=10)
def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconcile_body(context(memo), dict(body))


def reconcile_body(ctx: Context, body: dict[str, Any]) -> None:
    meta = body["metadata"]
    with ctx.lock(KIND, meta["namespace"], meta["name"]):
        fresh = ctx.kube.get(API_VERSION, KIND, meta["name"], meta["namespace"])
        if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
            return
        _reconcile_locked(ctx, fresh)


def _reconcile_locked(ctx: Context, body: dict[str, Any]) -> None:
    owner = Owner.from_body(body)
    try:
        ms = _parse(body)
        model = _resolve_model(ctx, ms, owner)
        spare = _spare_gpus(ctx, ms)
        children, absent = serving.build_children(ms, owner, model, ctx.settings, spare)
        if (body.get("status") or {}).get("observedGeneration") != owner.generation:
            _apply_all(ctx, children, dry_run=True)
        _apply_all(ctx, children, dry_run=False)
        for api_version, kind in absent:
            ctx.kube.delete(api_version, kind, owner.name, owner.namespace)
    except NotServable as err:
        _report_not_servable(ctx, body, owner, err)
        return
    refresh_status(ctx, body, ms, model)


def _parse(body: dict[str, Any]) -> ModelServer:
    try:
        return ModelServer.model_validate(body)
    except ValidationError as err:
        raise NotServable("InvalidSpec", describe_validation_error(err), Phase.FAILED) from err


def _resolve_model(ctx: Context, ms: ModelServer, owner: Owner) -> ResolvedModel:
    source = ms.spec.model
    if source.source is not None:
        digest = hashlib.sha256(source.source.encode()).hexdigest()[:12]
        return ResolvedModel(uri=source.source, revision=f"source-{digest}", task="auto")
    assert source.fine_tune_job_ref is not None  # the CRD's CEL rule: exactly one is set
    name = source.fine_tune_job_ref.name
    job = ctx.kube.get(API_VERSION, FTJ_KIND, name, owner.namespace)
    if job is None:
        raise NotServable(
            "FineTuneJobNotFound",
            f"spec.model.fineTuneJobRef.name: FineTuneJob {name!r} not found in {owner.namespace}",
            Phase.PENDING,
            retry=30,
        )
    status = job.get("status") or {}
    output = status.get("output") or {}
    uri = output.get("tritonRepositoryUri") or output.get("modelUri")
    if status.get("phase") != "Succeeded" or not uri:
        raise NotServable(
            "WaitingForFineTuneJob",
            f"waiting for FineTuneJob {name!r} to succeed "
            f"(it is {status.get('phase') or 'Pending'})",
            Phase.PENDING,
        )
    run = f"{job['metadata']['uid'][:8]}-{status.get('completionTime') or ''}"
    task = (job.get("spec") or {}).get("task") or "sequence-classification"
    return ResolvedModel(uri=uri, revision=f"ftj-{run}", task=task)


def _spare_gpus(ctx: Context, ms: ModelServer) -> int:
    """GPUs of this kind free on the nodes right now (what a surge pod could get)."""
    res = ms.spec.resources
    if not res.gpus or ms.spec.rollout.strategy != "auto":
        return 0
    gpu = res.gpu_resource_name
    free: dict[str, int] = {}
    for node in ctx.kube.list("v1", "Node", None):
        amount = ((node.get("status") or {}).get("allocatable") or {}).get(gpu)
        if amount and not (node.get("spec") or {}).get("unschedulable"):
            free[node["metadata"]["name"]] = int(amount)
    for pod in ctx.kube.list("v1", "Pod", None):
        spec, phase = pod.get("spec") or {}, (pod.get("status") or {}).get("phase")
        if spec.get("nodeName") in free and phase not in ("Succeeded", "Failed"):
            for container in spec.get("containers") or []:
                requests = (container.get("resources") or {}).get("requests") or {}
                free[spec["nodeName"]] -= int(requests.get(gpu, 0))
    return max(free.values(), default=0)


def _apply_all(ctx: Context, children: list[dict[str, Any]], dry_run: bool) -> None:
    for child in children:
        what = f"{child['kind']} {child['metadata']['name']}"
        try:
            ctx.kube.apply(child, dry_run=dry_run)
        except (Invalid, Forbidden) as err:
            raise NotServable(
                "ChildRejected", f"the API server refused {what}: {err}", Phase.FAILED
            ) from err
        except KubeError as err:
            raise kopf.TemporaryError(f"applying {what} failed: {err}", delay=10) from err


def _report_not_servable(
    ctx: Context, body: dict[str, Any], owner: Owner, err: NotServable
) -> None:
    waiting = err.phase == Phase.PENDING
    conditions = with_conditions(
        conditions_of(body),
        owner.generation,
        [
            ("Ready", False, err.reason, str(err)),
            ("ModelLoaded", False, err.reason, str(err)),
        ],
    )
    old = body.get("status") or {}
    write_status(
        ctx.kube,
        KIND,
        "ModelServer",
        body,
        {
            "phase": err.phase.value,
            "conditions": _wire(conditions),
            "observedGeneration": owner.generation,
        },
    )
    if old.get("phase") != err.phase.value or _condition_reason(old, "Ready") != err.reason:
        post_event(body, not waiting, err.reason, str(err))
    if err.retry:
        raise kopf.TemporaryError(str(err), delay=err.retry)


def _condition_reason(status: dict[str, Any], type_: str) -> str | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return str(cond.get("reason"))
    return None


def _deployment_condition(deploy: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (deploy.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def refresh_status(
    ctx: Context, body: dict[str, Any], ms: ModelServer, model: ResolvedModel
) -> None:
    owner = Owner.from_body(body)
    deploy = ctx.kube.get("apps/v1", "Deployment", owner.name, owner.namespace) or {}
    dstatus = deploy.get("status") or {}
    desired = int((deploy.get("spec") or {}).get("replicas") or 0)
    ready = int(dstatus.get("readyReplicas") or 0)
    updated = int(dstatus.get("updatedReplicas") or 0)
    total = int(dstatus.get("replicas") or 0)
    caught_up = dstatus.get("observedGeneration") == (deploy.get("metadata") or {}).get(
        "generation"
    )
    rolled_out = caught_up and updated == desired and total == desired
    progress = _deployment_condition(deploy, "Progressing")
    stuck = progress.get("reason") == "ProgressDeadlineExceeded"
    if stuck:
        phase, reason, message = (
            Phase.FAILED,
            "ProgressDeadlineExceeded",
            str(progress.get("message")),
        )
    elif desired == 0:
        phase, reason, message = Phase.PENDING, "ScaledToZero", "no replicas are wanted"
    elif ready >= desired and rolled_out:
        phase, reason, message = (
            Phase.READY,
            "ModelAnswering",
            f"{ready}/{desired} replicas serve the model",
        )
    elif not rolled_out:
        phase, reason, message = (
            Phase.PROGRESSING,
            "RollingOut",
            f"{updated}/{desired} replicas updated, {ready} ready",
        )
    else:
        phase, reason, message = (
            Phase.DEGRADED,
            "ReplicasUnavailable",
            f"{ready}/{desired} replicas ready",
        )
    is_ready = phase == Phase.READY
    conditions = with_conditions(
        conditions_of(body),
        owner.generation,
        [
            ("Ready", is_ready, reason, message),
            (
                "ModelLoaded",
                ready > 0,
                "ModelReady" if ready else "NoReadyReplica",
                f"{ready} replicas report the model ready"
                if ready
                else "no replica has loaded the model yet",
            ),
            (
                "Progressing",
                not rolled_out,
                "RollingOut" if not rolled_out else "RolloutComplete",
                message if not rolled_out else f"revision {model.revision} rolled out",
            ),
            (
                "Degraded",
                phase in (Phase.DEGRADED, Phase.FAILED),
                reason if phase in (Phase.DEGRADED, Phase.FAILED) else "AsDesired",
                message if phase in (Phase.DEGRADED, Phase.FAILED) else "",
            ),
        ],
    )
    svc = ms.spec.service
    host = f"{owner.name}.{owner.namespace}.svc"
    status: dict[str, Any] = {
        "phase": phase.value,
        "conditions": _wire(conditions),
        "observedGeneration": owner.generation,
        "replicas": total,
        "readyReplicas": ready,
        "desiredReplicas": desired,
        "readyText": f"{ready}/{desired}",
        "selector": ",".join(f"{k}={v}" for k, v in selector_labels(owner).items()),
        "endpoints": {"http": f"{host}:{svc.http_port}", "grpc": f"{host}:{svc.grpc_port}"},
        "modelName": serving.model_name(ms, owner),
        "served": {
            "uri": model.uri,
            **(
                {"fineTuneJobUid": _ftj_uid(ctx, ms, owner)}
                if ms.spec.model.fine_tune_job_ref
                else {}
            ),
        },
    }
    old = body.get("status") or {}
    write_status(ctx.kube, KIND, "ModelServer", body, status)
    if old.get("phase") != phase.value:
        post_event(body, phase in (Phase.DEGRADED, Phase.FAILED), reason, message)


def _ftj_uid(ctx: Context, ms: ModelServer, owner: Owner) -> str | None:
    ref = ms.spec.model.fine_tune_job_ref
    job = ctx.kube.get(API_VERSION, FTJ_KIND, ref.name, owner.namespace) if ref else None
    return None if job is None else str(job["metadata"]["uid"])


def _wire(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [c.to_wire() for c in conditions]


# -- children and the FineTuneJobs being served --------------------------------------------------


def _parent(ctx: Context, obj: dict[str, Any]) -> dict[str, Any] | None:
    meta = obj.get("metadata") or {}
    name = (meta.get("labels") or {}).get(MS_LABEL)
    return ctx.kube.get(API_VERSION, KIND, name, meta["namespace"]) if name else None


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_SELECTOR)
@kopf.on.event("", "v1", "services", labels=CHILD_SELECTOR)
@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD_SELECTOR)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=CHILD_SELECTOR)
def child_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctx = context(memo)
    parent = _parent(ctx, _object(event))
    if parent is not None and not parent["metadata"].get("deletionTimestamp"):
        with later():
            reconcile_body(ctx, parent)


@kopf.on.event(GROUP, VERSION, FTJ_PLURAL)
def finetunejob_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A FineTuneJob changed: the ModelServers that serve it may have a new model to roll out."""
    ctx = context(memo)
    job = _object(event)
    meta = job.get("metadata") or {}
    if (job.get("status") or {}).get("phase") != "Succeeded" and event.get("type") != "DELETED":
        return
    for server in ctx.kube.list(API_VERSION, KIND, meta.get("namespace")):
        ref = ((server.get("spec") or {}).get("model") or {}).get("fineTuneJobRef") or {}
        if ref.get("name") == meta.get("name"):
            with later():
                reconcile_body(ctx, server)


def _event(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], event)


def _object(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], _event(event).get("object") or {})
