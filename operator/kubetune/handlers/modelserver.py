"""ModelServer handlers: one reconcile for create, resume, update, timer, children and jobs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kubetune import metrics
from kubetune.api.v1alpha1.base import API_VERSION, Condition, ConditionStatus
from kubetune.api.v1alpha1.finetunejob import KIND as FTJ_KIND
from kubetune.api.v1alpha1.finetunejob import PLURAL as FTJ_PLURAL
from kubetune.api.v1alpha1.modelserver import KIND, PLURAL, ModelServer, Phase
from kubetune.builders import serving
from kubetune.builders.common import (
    MANAGED_BY,
    MS_LABEL,
    Owner,
    gpu_tolerations,
    selector_labels,
)
from kubetune.builders.serving import ResolvedModel
from kubetune.conditions import now
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
    """Roll out the model the spec asks for, then say in status what the pods show."""
    reconcile_fresh(ctx, KIND, body, _reconcile_locked)


def _reconcile_locked(ctx: Context, body: dict[str, Any]) -> None:
    owner = Owner.from_body(body)
    try:
        ms = _parse(body)
        model = _rollout_target(body, _resolve_model(ctx, ms, owner))
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


def _rollout_target(body: dict[str, Any], wanted: ResolvedModel) -> ResolvedModel:
    """The wanted model, unless that very revision failed its smoke test: then the last model
    that passed keeps being served (the rollback) until a new revision comes."""
    status = body.get("status") or {}
    served = status.get("served") or {}
    if (
        wanted.revision == status.get("failedRevision")
        and served.get("revision")
        and served.get("revision") != wanted.revision
    ):
        return ResolvedModel(
            uri=str(served["uri"]),
            revision=str(served["revision"]),
            task=str(served.get("task") or "auto"),
            rolled_back_from=wanted.revision,
        )
    return wanted


def _spare_gpus(ctx: Context, ms: ModelServer) -> int:
    """GPUs of this kind free right now on the nodes these pods may use (what a surge pod
    could get): nodes that match the nodeSelector and whose NoSchedule taints are tolerated."""
    res = ms.spec.resources
    if not res.gpus or ms.spec.rollout.strategy != "auto":
        return 0
    gpu = res.gpu_resource_name
    free: dict[str, int] = {}
    for node in ctx.kube.list("v1", "Node", None):
        amount = ((node.get("status") or {}).get("allocatable") or {}).get(gpu)
        tolerations = gpu_tolerations(res.gpus, gpu) + [t.to_wire() for t in res.tolerations]
        if amount and _eligible(node, res.node_selector, tolerations):
            free[node["metadata"]["name"]] = int(amount)
    for pod in ctx.kube.list("v1", "Pod", None):
        spec, phase = pod.get("spec") or {}, (pod.get("status") or {}).get("phase")
        if spec.get("nodeName") in free and phase not in ("Succeeded", "Failed"):
            for container in spec.get("containers") or []:
                requests = (container.get("resources") or {}).get("requests") or {}
                free[spec["nodeName"]] -= int(requests.get(gpu, 0))
    return max(free.values(), default=0)


def _eligible(
    node: dict[str, Any], selector: dict[str, str], tolerations: list[dict[str, Any]]
) -> bool:
    labels = node["metadata"].get("labels") or {}
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(
            t.get("key") in (None, taint.get("key"))
            and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
            for t in tolerations
        ):
            return False
    return True


def _apply_all(ctx: Context, children: list[dict[str, Any]], dry_run: bool) -> None:
    apply_children(
        ctx.kube,
        children,
        dry_run,
        lambda message: NotServable("ChildRejected", message, Phase.FAILED),
    )


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


@dataclass(frozen=True)
class Verdict:
    """What the status says, before conditions are written."""

    phase: Phase
    reason: str
    message: str


def _rollout_verdict(deploy: dict[str, Any]) -> tuple[Verdict, dict[str, int], bool]:
    dstatus = deploy.get("status") or {}
    counts = {
        "desired": int((deploy.get("spec") or {}).get("replicas") or 0),
        "ready": int(dstatus.get("readyReplicas") or 0),
        "updated": int(dstatus.get("updatedReplicas") or 0),
        "total": int(dstatus.get("replicas") or 0),
    }
    desired, ready, updated = counts["desired"], counts["ready"], counts["updated"]
    generation = (deploy.get("metadata") or {}).get("generation")
    caught_up = dstatus.get("observedGeneration") == generation
    rolled_out = caught_up and updated == desired and counts["total"] == desired
    progress = _deployment_condition(deploy, "Progressing")
    if progress.get("reason") == "ProgressDeadlineExceeded":
        verdict = Verdict(Phase.FAILED, "ProgressDeadlineExceeded", str(progress.get("message")))
    elif desired == 0:
        verdict = Verdict(Phase.PENDING, "ScaledToZero", "no replicas are wanted")
    elif ready >= desired and rolled_out:
        verdict = Verdict(
            Phase.READY, "ModelAnswering", f"{ready}/{desired} replicas serve the model"
        )
    elif not rolled_out:
        verdict = Verdict(
            Phase.PROGRESSING, "RollingOut", f"{updated}/{desired} replicas updated, {ready} ready"
        )
    else:
        verdict = Verdict(
            Phase.DEGRADED, "ReplicasUnavailable", f"{ready}/{desired} replicas ready"
        )
    return verdict, counts, rolled_out


def _served_checksum(pods: list[dict[str, Any]]) -> str | None:
    """The weights' checksum, as the model-delivery init container reported it on exit."""
    for pod in pods:
        for item in (pod.get("status") or {}).get("initContainerStatuses") or []:
            term = (item.get("state") or {}).get("terminated") or {}
            message = str(term.get("message") or "")
            if item.get("name") == "fetch-model" and message.startswith("checksum: "):
                return message.removeprefix("checksum: ").strip()
    return None


CRASH_RESTARTS = 2  # a new pod that failed this often will not come up by itself


def _revision_pods(ctx: Context, owner: Owner, model: ResolvedModel) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(owner).items())
    return [
        pod
        for pod in ctx.kube.list("v1", "Pod", owner.namespace, label_selector=selector)
        if (pod["metadata"].get("annotations") or {}).get(serving.REVISION_ANNOTATION)
        == model.revision
        and not pod["metadata"].get("deletionTimestamp")
    ]


def _crash_looping(pods: list[dict[str, Any]]) -> str | None:
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


def _smoke_test_pods(
    ctx: Context, ms: ModelServer, owner: Owner, model: ResolvedModel
) -> tuple[bool, str, list[str]]:
    """Send the smoke-test request to every ready pod of this revision."""
    from kubetune.serving.smoketest import smoke_test  # tritonclient: only when needed

    test = ms.spec.rollout.smoke_test
    pods = [p for p in _revision_pods(ctx, owner, model) if (p.get("status") or {}).get("podIP")]
    if not pods:
        return False, "no pod of this revision to test", []
    name = serving.model_name(ms, owner)
    answers = []
    for pod in pods:
        url = f"http://{pod['status']['podIP']}:{ms.spec.service.http_port}"
        result = smoke_test(url, name, test.text, test.expected_label, timeout=10.0)
        if not result.ok:
            return (
                False,
                f"pod {pod['metadata']['name']}: {result.message}",
                [p["metadata"]["name"] for p in pods],
            )
        answers.append(result.message)
    return (
        True,
        answers[0] + (f" (and {len(answers) - 1} more pods)" if len(answers) > 1 else ""),
        [p["metadata"]["name"] for p in pods],
    )


def _smoke_gate(
    ctx: Context, body: dict[str, Any], ms: ModelServer, owner: Owner, model: ResolvedModel
) -> tuple[Verdict, dict[str, Any], list[tuple[str, bool | ConditionStatus, str, str]]]:
    """After a rollout: test the new pods once, remember the model that passed, and turn a
    failure into a rollback to it."""
    old = body.get("status") or {}
    served = {"uri": model.uri, "revision": model.revision, "task": model.task}
    if model.rolled_back_from:
        message = (
            f"revision {model.rolled_back_from} was rolled back to {model.revision}: "
            f"{old.get('failureMessage') or 'it failed'}"
        )
        return (
            Verdict(Phase.DEGRADED, "RolledBack", message),
            {},
            [
                (
                    "SmokeTestPassed",
                    False,
                    "SmokeTestFailed",
                    (old.get("smokeTest") or {}).get("message", ""),
                )
            ],
        )
    if not ms.spec.rollout.smoke_test.enabled:
        return (
            Verdict(Phase.READY, "ModelAnswering", "replicas serve the model (no smoke test)"),
            {"served": served},
            [("SmokeTestPassed", ConditionStatus.UNKNOWN, "SmokeTestDisabled", "")],
        )
    last = old.get("smokeTest") or {}
    if last.get("revision") != model.revision:
        passed, message, pods = _smoke_test_pods(ctx, ms, owner, model)
        last = {
            "revision": model.revision,
            "passed": passed,
            "message": message,
            "pods": pods,
            "time": now().isoformat().replace("+00:00", "Z"),
        }
        post_event(body, not passed, "SmokeTestPassed" if passed else "SmokeTestFailed", message)
    extra: dict[str, Any] = {"smokeTest": last}
    if last["passed"]:
        extra["served"] = served
        return (
            Verdict(Phase.READY, "ModelAnswering", last["message"]),
            extra,
            [("SmokeTestPassed", True, "SmokeTestPassed", last["message"])],
        )
    extra["failedRevision"] = model.revision
    extra["failureMessage"] = last["message"]
    rollback = (old.get("served") or {}).get("revision") not in (None, model.revision)
    verdict = Verdict(
        Phase.DEGRADED if rollback else Phase.FAILED,
        "SmokeTestFailed",
        last["message"] + ("; rolling back" if rollback else "; no earlier model to go back to"),
    )
    return verdict, extra, [("SmokeTestPassed", False, "SmokeTestFailed", last["message"])]


def refresh_status(
    ctx: Context, body: dict[str, Any], ms: ModelServer, model: ResolvedModel
) -> None:
    owner = Owner.from_body(body)
    deploy = ctx.kube.get("apps/v1", "Deployment", owner.name, owner.namespace) or {}
    verdict, counts, rolled_out = _rollout_verdict(deploy)
    extra: dict[str, Any] = {}
    smoke: list[tuple[str, bool | ConditionStatus, str, str]] = []
    if verdict.phase == Phase.READY:
        verdict, extra, smoke = _smoke_gate(ctx, body, ms, owner, model)
    elif (
        not rolled_out
        and not model.rolled_back_from
        and (crash := _crash_looping(_revision_pods(ctx, owner, model)))
    ):
        served = (body.get("status") or {}).get("served") or {}
        rollback = served.get("revision") not in (None, model.revision)
        extra = {"failedRevision": model.revision, "failureMessage": crash}
        verdict = Verdict(
            Phase.DEGRADED if rollback else Phase.FAILED,
            "RolloutFailed",
            f"revision {model.revision} does not start: {crash}"
            + ("; rolling back" if rollback else ""),
        )
    phase, reason, message = verdict.phase, verdict.reason, verdict.message
    ready = counts["ready"]
    answering = phase == Phase.READY or reason == "RolledBack"
    bad = phase in (Phase.DEGRADED, Phase.FAILED)
    conditions = with_conditions(
        conditions_of(body),
        owner.generation,
        [
            ("Ready", answering, reason, message),
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
            ("Degraded", bad, reason if bad else "AsDesired", message if bad else ""),
            *smoke,
        ],
    )
    svc = ms.spec.service
    host = f"{owner.name}.{owner.namespace}.svc"
    old = body.get("status") or {}
    status: dict[str, Any] = {
        "phase": phase.value,
        "conditions": _wire(conditions),
        "observedGeneration": owner.generation,
        "replicas": counts["total"],
        "readyReplicas": ready,
        "desiredReplicas": counts["desired"],
        "readyText": f"{ready}/{counts['desired']}",
        "selector": ",".join(f"{k}={v}" for k, v in selector_labels(owner).items()),
        "endpoints": {"http": f"{host}:{svc.http_port}", "grpc": f"{host}:{svc.grpc_port}"},
        "modelName": serving.model_name(ms, owner),
        **extra,
    }
    if "served" in extra:
        if ms.spec.model.fine_tune_job_ref:
            status["served"]["fineTuneJobUid"] = _ftj_uid(ctx, ms, owner)
        if checksum := _served_checksum(_revision_pods(ctx, owner, model)):
            status["served"]["checksum"] = checksum
    write_status(ctx.kube, KIND, "ModelServer", body, status)
    if old.get("phase") != phase.value or _condition_reason(old, "Ready") != reason:
        post_event(body, bad, reason, message)
    if extra.get("failedRevision") and extra["failedRevision"] != old.get("failedRevision"):
        raise kopf.TemporaryError(f"rolling back: {message}", delay=1)


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


@kopf.on.event(GROUP, VERSION, PLURAL)
def modelserver_event(event: kopf.RawEvent, **_: Any) -> None:
    """A ModelServer is gone: it leaves the per-phase gauge."""
    body = _object(event)
    if body and _event(event).get("type") == "DELETED":
        meta = body["metadata"]
        metrics.record_phase(KIND, f"{meta['namespace']}/{meta['name']}", None)


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
