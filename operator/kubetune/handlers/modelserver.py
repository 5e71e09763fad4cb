"""ModelServer handlers: reconciles driven by the resource's, its children's and its pods' watch
events, and by the FineTuneJob it serves (found through an index, not a list). Children and status
are written only where they differ from what exists."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kubetune import metrics
from kubetune.api.v1alpha1.base import API_VERSION, Condition, ConditionStatus
from kubetune.api.v1alpha1.finetunejob import KIND as FTJ_KIND
from kubetune.api.v1alpha1.finetunejob import PLURAL as FTJ_PLURAL
from kubetune.api.v1alpha1.modelserver import KIND, PLURAL, ModelServer, Phase, Runtime
from kubetune.api.v1alpha1.reasons import ConditionType as T
from kubetune.api.v1alpha1.reasons import ServingReason as R
from kubetune.builders import serving
from kubetune.builders.common import (
    MANAGED_BY,
    MS_LABEL,
    Owner,
    gpu_tolerations,
    selector_labels,
)
from kubetune.builders.serving import ResolvedModel
from kubetune.builders.serving_status import (
    Update,
    Verdict,
    conditions_for,
    crash_looping,
    not_servable_conditions,
    rollout_verdict,
    served_checksum,
)
from kubetune.conditions import now
from kubetune.handlers.common import (
    Context,
    apply_children,
    blocking,
    conditions_of,
    context,
    describe_validation_error,
    is_new,
    later,
    reconcile_fresh,
    refused,
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
def reconcile(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    reconcile_body(context(memo, kwargs), dict(body))


def reconcile_body(ctx: Context, body: dict[str, Any]) -> None:
    """Roll out the model the spec asks for, then say in status what the pods show."""
    reconcile_fresh(ctx, KIND, body, _reconcile_locked)


def _reconcile_locked(ctx: Context, body: dict[str, Any]) -> None:
    owner = Owner.from_body(body)
    try:
        ms = _parse(body)
        wanted, waiting = _resolve_or_last_good(ctx, body, ms, owner)
        model = _rollout_target(body, wanted)
        spare = _spare_gpus(ctx, ms)
        children, absent = serving.build_children(ms, owner, model, ctx.settings, spare)
        fresh = is_new(body)
        changed = (body.get("status") or {}).get("observedGeneration") != owner.generation
        if (changed and not fresh) or refused(body):
            _apply_all(ctx, children, dry_run=True)
        _apply_all(ctx, children, dry_run=False, fresh=fresh)
        ctx.refusal_over(KIND, owner.namespace, owner.name)
        for api_version, kind in absent:
            if ctx.kube.get(api_version, kind, owner.name, owner.namespace) is not None:
                ctx.kube.delete(api_version, kind, owner.name, owner.namespace)
        open_gates(ctx, ms, owner, model)
    except NotServable as err:
        _report_not_servable(ctx, body, owner, err)
        return
    refresh_status(ctx, body, ms, model, waiting)


def _resolve_or_last_good(
    ctx: Context, body: dict[str, Any], ms: ModelServer, owner: Owner
) -> tuple[ResolvedModel, tuple[str, str] | None]:
    """The model to serve, and why the server still waits (if it does). While the FineTuneJob it
    follows is missing or training again, the revision that last passed keeps being served (and
    its Deployment kept as it should be) instead of the server stopping."""
    try:
        return _resolve_model(ctx, ms, owner), None
    except NotServable as err:
        served = (body.get("status") or {}).get("served") or {}
        if err.phase != Phase.PENDING or not served.get("revision"):
            raise
        last_good = ResolvedModel(
            uri=str(served["uri"]),
            revision=str(served["revision"]),
            task=str(served.get("task") or "auto"),
        )
        return last_good, (err.reason, f"{err}; serving revision {last_good.revision} meanwhile")


def _parse(body: dict[str, Any]) -> ModelServer:
    try:
        return ModelServer.model_validate(body)
    except ValidationError as err:
        raise NotServable("InvalidSpec", describe_validation_error(err), Phase.FAILED) from err


def _resolve_model(ctx: Context, ms: ModelServer, owner: Owner) -> ResolvedModel:
    source = ms.spec.model
    if source.source is not None:
        return source_model(source.source, source.revision)
    assert source.fine_tune_job_ref is not None  # the CRD's CEL rule: exactly one is set
    name = source.fine_tune_job_ref.name
    job = ctx.kube.get(API_VERSION, FTJ_KIND, name, owner.namespace)
    if job is None:
        raise NotServable(
            R.FINE_TUNE_JOB_NOT_FOUND,
            f"spec.model.fineTuneJobRef.name: FineTuneJob {name!r} not found in {owner.namespace}",
            Phase.PENDING,
        )
    status = job.get("status") or {}
    output = status.get("output") or {}
    uri = output.get("tritonRepositoryUri") or output.get("modelUri")
    if status.get("phase") != "Succeeded" or not uri:
        raise NotServable(
            R.WAITING_FOR_FINE_TUNE_JOB,
            f"waiting for FineTuneJob {name!r} to succeed "
            f"(it is {status.get('phase') or 'Pending'})",
            Phase.PENDING,
        )
    task = (job.get("spec") or {}).get("task") or "sequence-classification"
    served = ResolvedModel(uri=uri, revision=_served_run(job), task=task)
    return _as_adapter(ms, job, served) or served


def source_model(uri: str, revision: str | None) -> ResolvedModel:
    """A model at a URI. Its rollout revision is a digest of the URI and of the content revision
    the spec names (spec.model.revision): what the operator can know of the content. A hub
    revision is also what the fetcher downloads (hf://org/name@revision)."""
    key = uri if revision is None else f"{uri}@{revision}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    if revision is not None and uri.startswith("hf://"):
        uri = key
    return ResolvedModel(uri=uri, revision=f"source-{digest}", task="auto")


def _as_adapter(
    ms: ModelServer, job: dict[str, Any], served: ResolvedModel
) -> ResolvedModel | None:
    """A LoRA run exported without merging (spec.lora.merge false) left its adapter at
    status.output.modelUri: on the vLLM runtime the base model is served with that adapter
    beside it (named after the job), instead of the merged copy the python backend uses."""
    spec = job.get("spec") or {}
    base = (spec.get("model") or {}).get("source")
    adapter = ((job.get("status") or {}).get("output") or {}).get("modelUri")
    unmerged = (spec.get("lora") or {}).get("merge") is False
    if spec.get("method") not in ("lora", "qlora") or not unmerged or not base or not adapter:
        return None
    name = str(job["metadata"]["name"])
    candidate = replace(served, uri=str(base), lora_adapters=((name, str(adapter)),))
    return candidate if serving.runtime(ms.spec, candidate) == Runtime.VLLM else None


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
    could get): nodes that match the nodeSelector and whose NoSchedule taints are tolerated.
    Nodes and the GPUs their pods hold come from indexes, never from cluster-wide lists."""
    res = ms.spec.resources
    if not res.gpus or ms.spec.rollout.strategy != "auto":
        return 0
    gpu = res.gpu_resource_name
    tolerations = gpu_tolerations(res.gpus, gpu) + [t.to_wire() for t in res.tolerations]
    free = [
        node["gpus"][gpu] - ctx.indexes.gpus_in_use(node["name"]).get(gpu, 0)
        for node in ctx.indexes.node_list()
        if node["gpus"].get(gpu) and _eligible(node, res.node_selector, tolerations)
    ]
    return max(free, default=0)


def _eligible(
    node: dict[str, Any], selector: dict[str, str], tolerations: list[dict[str, Any]]
) -> bool:
    labels = node.get("labels") or {}
    if node.get("unschedulable"):
        return False
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    for taint in node.get("taints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(
            t.get("key") in (None, taint.get("key"))
            and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
            for t in tolerations
        ):
            return False
    return True


def _apply_all(
    ctx: Context, children: list[dict[str, Any]], dry_run: bool, fresh: bool = False
) -> None:
    apply_children(
        ctx.kube,
        children,
        dry_run,
        lambda message: NotServable("ChildRejected", message, Phase.FAILED),
        fresh=fresh,
    )


def _report_not_servable(
    ctx: Context, body: dict[str, Any], owner: Owner, err: NotServable
) -> None:
    waiting = err.phase == Phase.PENDING
    conditions = with_conditions(
        conditions_of(body),
        owner.generation,
        not_servable_conditions(err.reason, str(err), waiting),
    )
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
    if err.reason == "ChildRejected":
        ctx.retry_refusal(KIND, body, lambda: reconcile_fresh(ctx, KIND, body, _retry_locked))
    if err.retry:
        raise kopf.TemporaryError(str(err), delay=err.retry)


def _revision_pods(ctx: Context, owner: Owner, model: ResolvedModel) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(owner).items())
    return [
        pod
        for pod in ctx.kube.list("v1", "Pod", owner.namespace, label_selector=selector)
        if (pod["metadata"].get("annotations") or {}).get(serving.REVISION_ANNOTATION)
        == model.revision
        and not pod["metadata"].get("deletionTimestamp")
    ]


def open_gates(ctx: Context, ms: ModelServer, owner: Owner, model: ResolvedModel) -> None:
    """The readiness gate (serving/gate.py): each pod of this revision whose model has loaded is
    smoke-tested on its own IP, and its kubetune.io/smoke-test-passed condition set to the
    answer; only a True one lets the kubelet report the pod Ready. The pod's next event (its
    containers becoming ready) brings the next reconcile here, so pods the autoscaler adds are
    gated too."""
    if not (ctx.settings.smoke_test_gate and ms.spec.rollout.smoke_test.enabled):
        return
    from kubetune.serving import gate  # tritonclient: only when needed

    name = serving.model_name(ms, owner)
    for pod in _revision_pods(ctx, owner, model):
        if not gate.needs_smoke_test(pod):
            continue
        result = gate.smoke_test_pod(
            pod, name, ms.spec.rollout.smoke_test, ms.spec.service.http_port, timeout=10.0
        )
        verdict = gate.gate_verdict(pod, result)
        if verdict is not None:
            [condition] = verdict.patch(now())["status"]["conditions"]
            ctx.kube.patch_pod_conditions(pod["metadata"]["name"], owner.namespace, [condition])


def _start_failure(
    ctx: Context, body: dict[str, Any], owner: Owner, model: ResolvedModel, rolled_out: bool
) -> tuple[str, str] | None:
    """Why a new revision fails: a crash-looping pod while it rolls out, or (with the gate) a
    pod whose smoke test closed its gate — then it never receives traffic, and with the replace
    strategy the Deployment counts it as rolled out while none of its pods is ready. Once a
    revision has passed (it is the served one), a pod with a closed gate just stays out of the
    Service: one bad pod (an autoscaled one, say) does not fail the revision."""
    pods = _revision_pods(ctx, owner, model)
    if not rolled_out and (crash := crash_looping(pods)):
        return R.ROLLOUT_FAILED, f"does not start: {crash}"
    served = ((body.get("status") or {}).get("served") or {}).get("revision")
    if ctx.settings.smoke_test_gate and served != model.revision:
        from kubetune.serving import gate

        for pod in pods:
            if gate.gate_status(pod) == "False":
                return (
                    R.SMOKE_TEST_FAILED,
                    f"is kept out of the Service: pod {pod['metadata']['name']}: "
                    f"{gate.gate_message(pod)}",
                )
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
) -> tuple[Verdict, dict[str, Any], list[Update]]:
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
            Verdict(Phase.DEGRADED, R.ROLLED_BACK, message, stalled=True),
            {},
            [
                (
                    T.SMOKE_TEST_PASSED,
                    False,
                    R.SMOKE_TEST_FAILED,
                    (old.get("smokeTest") or {}).get("message", ""),
                )
            ],
        )
    if not ms.spec.rollout.smoke_test.enabled:
        return (
            Verdict(
                Phase.READY,
                R.MODEL_ANSWERING,
                "replicas serve the model (no smoke test)",
                answering=True,
            ),
            {"served": served},
            [(T.SMOKE_TEST_PASSED, ConditionStatus.UNKNOWN, R.SMOKE_TEST_DISABLED, "")],
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
    extra: dict[str, Any] = {"smokeTest": last}
    if last["passed"]:
        extra["served"] = served
        return (
            Verdict(Phase.READY, R.MODEL_ANSWERING, last["message"], answering=True),
            extra,
            [(T.SMOKE_TEST_PASSED, True, R.SMOKE_TEST_PASSED, last["message"])],
        )
    extra["failedRevision"] = model.revision
    extra["failureMessage"] = last["message"]
    rollback = (old.get("served") or {}).get("revision") not in (None, model.revision)
    verdict = Verdict(
        Phase.DEGRADED if rollback else Phase.FAILED,
        R.SMOKE_TEST_FAILED,
        last["message"] + ("; rolling back" if rollback else "; no earlier model to go back to"),
        stalled=not rollback,  # a rollback is under way; without one a person must act
    )
    return verdict, extra, [(T.SMOKE_TEST_PASSED, False, R.SMOKE_TEST_FAILED, last["message"])]


def refresh_status(
    ctx: Context,
    body: dict[str, Any],
    ms: ModelServer,
    model: ResolvedModel,
    waiting: tuple[str, str] | None = None,
) -> None:
    owner = Owner.from_body(body)
    deploy = ctx.kube.get("apps/v1", "Deployment", owner.name, owner.namespace) or {}
    verdict, counts = rollout_verdict(deploy)
    extra: dict[str, Any] = {}
    smoke: list[Update] = []
    if verdict.phase == Phase.READY:
        verdict, extra, smoke = _smoke_gate(ctx, body, ms, owner, model)
    elif not model.rolled_back_from and (
        failure := _start_failure(ctx, body, owner, model, counts.rolled_out)
    ):
        reason, what = failure
        served = (body.get("status") or {}).get("served") or {}
        rollback = served.get("revision") not in (None, model.revision)
        extra = {"failedRevision": model.revision, "failureMessage": what}
        verdict = Verdict(
            Phase.DEGRADED if rollback else Phase.FAILED,
            reason,
            f"revision {model.revision} {what}" + ("; rolling back" if rollback else ""),
            stalled=not rollback,
        )
    conditions = with_conditions(
        conditions_of(body),
        owner.generation,
        conditions_for(verdict, counts, model.revision, waiting, smoke),
    )
    svc = ms.spec.service
    host = f"{owner.name}.{owner.namespace}.svc"
    old = body.get("status") or {}
    status: dict[str, Any] = {
        "phase": verdict.phase.value,
        "conditions": _wire(conditions),
        "observedGeneration": owner.generation,
        "replicas": counts.total,
        "readyReplicas": counts.ready,
        "desiredReplicas": counts.desired,
        "readyText": f"{counts.ready}/{counts.desired}",
        "selector": ",".join(f"{k}={v}" for k, v in selector_labels(owner).items()),
        "endpoints": {"http": f"{host}:{svc.http_port}", "grpc": f"{host}:{svc.grpc_port}"},
        "modelName": serving.model_name(ms, owner),
        **extra,
    }
    if "served" in extra:
        if ms.spec.model.fine_tune_job_ref:
            status["served"]["fineTuneJobUid"] = _ftj_uid(ctx, ms, owner)
        if checksum := served_checksum(_revision_pods(ctx, owner, model)):
            status["served"]["checksum"] = checksum
    write_status(ctx.kube, KIND, "ModelServer", body, status)
    if extra.get("failedRevision") and extra["failedRevision"] != old.get("failedRevision"):
        raise kopf.TemporaryError(f"rolling back: {verdict.message}", delay=1)


def _ftj_uid(ctx: Context, ms: ModelServer, owner: Owner) -> str | None:
    ref = ms.spec.model.fine_tune_job_ref
    job = ctx.kube.get(API_VERSION, FTJ_KIND, ref.name, owner.namespace) if ref else None
    return None if job is None else str(job["metadata"]["uid"])


def _wire(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [c.to_wire() for c in conditions]


# -- children, pods and the FineTuneJobs being served ------------------------------------------


def _parent(ctx: Context, obj: dict[str, Any]) -> dict[str, Any] | None:
    meta = obj.get("metadata") or {}
    name = (meta.get("labels") or {}).get(MS_LABEL)
    return ctx.kube.get(API_VERSION, KIND, name, meta["namespace"]) if name else None


def _reconcile_soon(ctx: Context, server: dict[str, Any]) -> None:
    """Reconcile now; a passing failure is retried after its delay (event handlers are not
    retried by kopf, and there is no timer to catch up)."""
    with later(ctx, lambda: _reconcile_soon(ctx, server)):
        reconcile_fresh(ctx, KIND, server, _restore_locked)


def _retry_locked(ctx: Context, body: dict[str, Any]) -> None:
    """See finetunejob._retry_locked."""
    if refused(body):
        _reconcile_locked(ctx, body)


def _restore_locked(ctx: Context, body: dict[str, Any]) -> None:
    """See finetunejob._restore_locked: a refused spec is not built again by its children's
    events."""
    if not refused(body):
        _reconcile_locked(ctx, body)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_SELECTOR)
@kopf.on.event("", "v1", "services", labels=CHILD_SELECTOR)
@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD_SELECTOR)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=CHILD_SELECTOR)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=CHILD_SELECTOR)
@kopf.on.event("", "v1", "pods", labels=CHILD_SELECTOR)
async def child_event(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """A child or a pod changed (skipping the initial listing: resume covers it)."""
    if _event(event).get("type") is None:
        return
    ctx = context(memo, kwargs)
    await blocking(ctx, lambda: _on_child(ctx, _object(event)))


def _on_child(ctx: Context, obj: dict[str, Any]) -> None:
    parent = _parent(ctx, obj)
    if (
        parent is not None
        and not parent["metadata"].get("deletionTimestamp")
        and not refused(parent)
    ):
        _reconcile_soon(ctx, parent)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def modelserver_event(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """A ModelServer is gone: it leaves the per-phase gauge. One listed again after a broken
    watch is reconciled (Context.relisted)."""
    body = _object(event)
    ctx = context(memo, kwargs)
    if ctx.relisted(KIND, _event(event)):

        def again() -> None:
            with later():
                reconcile_fresh(ctx, KIND, body, _restore_locked)

        await blocking(ctx, again)
        return
    if body and _event(event).get("type") == "DELETED":
        meta = body["metadata"]
        metrics.record_phase(KIND, f"{meta['namespace']}/{meta['name']}", None)


@kopf.on.event(GROUP, VERSION, FTJ_PLURAL)
async def finetunejob_event(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """A FineTuneJob appeared, changed phase or went away: the ModelServers that follow it (from
    the index) may have a new model to roll out, or keep serving the last one while it trains.
    A job that no server follows (most) is answered on the event loop."""
    kind = _event(event).get("type")
    if kind is None:
        return
    ctx = context(memo, kwargs)
    job = _object(event)
    meta = job.get("metadata") or {}
    namespace, job_name = str(meta.get("namespace")), str(meta.get("name"))
    if followers := ctx.indexes.servers_following(namespace, job_name):
        await blocking(ctx, lambda: _job_changed(ctx, job, str(kind), namespace, followers))


def _job_changed(
    ctx: Context, job: dict[str, Any], kind: str, namespace: str, followers: list[str]
) -> None:
    for name in followers:
        server = ctx.kube.get(API_VERSION, KIND, name, namespace)
        if server is None or _already_saw(server, job, kind):
            continue
        _reconcile_soon(ctx, server)


def _already_saw(server: dict[str, Any], job: dict[str, Any], kind: str) -> bool:
    """True when this job event cannot change the server: the trainer's progress reports
    (many per minute) leave the job's phase as the server last showed it."""
    if kind != "MODIFIED":
        return False
    status = server.get("status") or {}
    phase = (job.get("status") or {}).get("phase") or "Pending"
    if phase == "Succeeded":
        return bool((status.get("served") or {}).get("revision") == _served_run(job))
    shown = " ".join(
        (_condition(status, type_) or {}).get("message", "") for type_ in (T.READY, T.RECONCILING)
    )
    return f"(it is {phase})" in shown


def _served_run(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    return f"ftj-{job['metadata']['uid'][:8]}-{status.get('completionTime') or ''}"


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def _event(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], event)


def _object(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], _event(event).get("object") or {})
