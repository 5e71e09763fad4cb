"""The operator turns FineTuneJobs into training children and follows them, on a real cluster."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.api.v1alpha1.trainerconfig import TrainerConfig
from kubetune.devcluster.cluster import (
    EXIT_CODE_ANNOTATION,
    OUTCOME_ANNOTATION,
    TERMINATION_MESSAGE_ANNOTATION,
)
from tests.cluster_fixtures import OperatorProcess, Resources
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
FTJ = "finetunejobs"


def finetunejob(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"source": "pvc://models/base/minilm"},
        "dataset": {"source": "pvc://datasets/intents.jsonl"},
        "resources": {"nodes": 2, "gpusPerNode": 4},
        "output": {"uri": "pvc://models/out/" + name},
        "runPolicy": {"backoffLimit": 0},
    }
    for key, value in spec.items():
        base[key] = value
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": base,
    }


def _pods(core: client.CoreV1Api, namespace: str, job: str) -> list[Any]:
    return list(
        core.list_namespaced_pod(
            namespace, label_selector=f"batch.kubernetes.io/job-name={job}"
        ).items
    )


def _finish_pods(
    core: client.CoreV1Api, namespace: str, job: str, count: int, **annotations: str
) -> None:
    pods = wait_for(
        lambda: (p := _pods(core, namespace, job)) and len(p) >= count and p, what="training pods"
    )
    for pod in pods:
        if pod.status.phase in ("Succeeded", "Failed"):
            continue
        core.patch_namespaced_pod(
            pod.metadata.name, namespace, {"metadata": {"annotations": annotations}}
        )


def test_apply_creates_children_with_the_right_fields(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(FTJ, finetunejob("shape", queueName=None))
    batch, core, rbac = (
        client.BatchV1Api(api_client),
        client.CoreV1Api(api_client),
        client.RbacAuthorizationV1Api(api_client),
    )
    job = wait_for(
        lambda: _read(batch.read_namespaced_job, "shape-train", namespace), what="the Job"
    )
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == (
        "Indexed",
        2,
        2,
    )
    container = job.spec.template.spec.containers[0]
    env = {e.name: e.value for e in container.env}
    assert env["PET_NNODES"] == "2"
    assert env["PET_NPROC_PER_NODE"] == "4"
    assert env["PET_MASTER_ADDR"] == f"shape-train-0.shape-workers.{namespace}.svc"
    assert container.resources.limits["nvidia.com/gpu"] == "4"
    assert job.spec.template.spec.subdomain == "shape-workers"
    assert job.metadata.owner_references[0].kind == "FineTuneJob"

    svc = core.read_namespaced_service("shape-workers", namespace)
    assert svc.spec.cluster_ip == "None"
    config = core.read_namespaced_config_map("shape-config", namespace)
    parsed = TrainerConfig.model_validate_json(config.data["config.json"])
    assert parsed.paths.dataset == "/kubetune/pvc/datasets/intents.jsonl"
    assert parsed.job is not None and parsed.job.name == "shape"

    # The namespace's trainer identity, shared by its jobs (the chart's admission policy keeps
    # each pod to its own job's status: test_impossible.py).
    assert job.spec.template.spec.service_account_name == "kubetune-trainer"
    role = rbac.read_namespaced_role("kubetune-trainer", namespace)
    assert [(r.resources, r.resource_names, sorted(r.verbs)) for r in role.rules] == [
        (["finetunejobs/status"], None, ["get", "patch"])
    ]
    pods = wait_for(
        lambda: (p := _pods(core, namespace, "shape-train")) and len(p) == 2 and p, what="pods"
    )
    assert {p.spec.node_name for p in pods} <= {f"gpu-node-{i}" for i in range(4)}
    obj = resources.wait_phase(FTJ, "shape", "Running")
    assert obj["status"]["gpus"] == 8
    assert obj["status"]["observedGeneration"] == 1


def test_pods_succeed_then_the_job_succeeds_with_output(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(FTJ, finetunejob("ok", resources={"nodes": 1, "gpusPerNode": 1}))
    resources.report_output("ok", "pvc://models/out/ok")  # as the trainer does before it exits
    _finish_pods(
        client.CoreV1Api(api_client), namespace, "ok-train", 1, **{OUTCOME_ANNOTATION: "succeed"}
    )
    obj = resources.wait_phase(FTJ, "ok", "Succeeded")
    assert obj["status"]["output"] == {
        "modelUri": "pvc://models/out/ok",
        "tritonRepositoryUri": "pvc://models/out/ok/triton-repository",
    }
    assert resources.condition(FTJ, "ok", "Succeeded")["status"] == "True"  # type: ignore[index]
    assert resources.condition(FTJ, "ok", "Ready")["status"] == "True"  # type: ignore[index]
    assert obj["status"]["completionTime"]


def test_failing_pods_are_retried_then_the_job_fails_with_the_classified_reason(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    body = finetunejob(
        "oom", resources={"nodes": 1, "gpusPerNode": 1}, runPolicy={"backoffLimit": 1}
    )
    resources.create(FTJ, body)
    core = client.CoreV1Api(api_client)
    failure = {
        OUTCOME_ANNOTATION: "fail",
        EXIT_CODE_ANNOTATION: "6",  # the trainer's exit code for OutOfMemory
        TERMINATION_MESSAGE_ANNOTATION: "OutOfMemory: CUDA out of memory at batch size 64",
    }
    _finish_pods(core, namespace, "oom-train", 1, **failure)
    # The Job retries: a second pod appears; the FineTuneJob is still alive and says it retried.
    wait_for(lambda: len(_pods(core, namespace, "oom-train")) == 2, what="a retry pod")
    _finish_pods(core, namespace, "oom-train", 2, **failure)
    obj = resources.wait_phase(FTJ, "oom", "Failed")
    assert obj["status"]["failureReason"] == "OutOfMemory"
    assert "CUDA out of memory at batch size 64" in obj["status"]["failureMessage"]
    assert "exit code 6" in obj["status"]["failureMessage"]
    # The Job controller marks the Job FailureTarget before it counts the last pod: the count
    # follows with the Job's next update, which the operator mirrors.
    wait_for(
        lambda: resources.get(FTJ, "oom")["status"]["failed"] == 2, what="both failures counted"
    )
    assert resources.condition(FTJ, "oom", "Stalled")["status"] == "True"  # type: ignore[index]
    assert resources.condition(FTJ, "oom", "Ready")["status"] == "False"  # type: ignore[index]


def test_a_failure_a_retry_cannot_fix_fails_the_job_at_once(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    """BadData (exit 3): the Job's podFailurePolicy fails it on the first pod, retries left."""
    body = finetunejob(
        "bad", resources={"nodes": 1, "gpusPerNode": 1}, runPolicy={"backoffLimit": 3}
    )
    resources.create(FTJ, body)
    core = client.CoreV1Api(api_client)
    failure = {
        OUTCOME_ANNOTATION: "fail",
        EXIT_CODE_ANNOTATION: "3",
        TERMINATION_MESSAGE_ANNOTATION: "BadData: dataset.labelField: column 'label' is missing",
    }
    _finish_pods(core, namespace, "bad-train", 1, **failure)
    resources.wait_phase(FTJ, "bad", "Failed")
    # The Job's failure and the pod's termination reach the operator on two watches, in either
    # order: the reason follows the pod's as soon as its event arrives.
    _wait_reason(resources, "bad", "BadData")
    assert len(_pods(core, namespace, "bad-train")) == 1  # no retry pod was made


def test_the_first_failure_of_a_multi_node_job_is_the_reason(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    """Rank 0 runs out of memory; rank 1 then times out in NCCL: the cause is the first."""
    body = finetunejob(
        "ranks", resources={"nodes": 2, "gpusPerNode": 1}, runPolicy={"backoffLimit": 1}
    )
    resources.create(FTJ, body)
    core = client.CoreV1Api(api_client)
    pods = wait_for(
        lambda: (p := _pods(core, namespace, "ranks-train")) and len(p) == 2 and p, what="pods"
    )
    rank = {p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    fail = {OUTCOME_ANNOTATION: "fail"}
    core.patch_namespaced_pod(
        rank["0"].metadata.name,
        namespace,
        {
            "metadata": {
                "annotations": fail
                | {
                    EXIT_CODE_ANNOTATION: "6",
                    TERMINATION_MESSAGE_ANNOTATION: "OutOfMemory: CUDA out of memory on rank 0",
                }
            }
        },
    )
    wait_for(
        lambda: (
            core.read_namespaced_pod(rank["0"].metadata.name, namespace).status.phase == "Failed"
        ),
        what="rank 0 to fail",
    )
    time.sleep(1.1)  # finishedAt has one-second resolution: rank 1 must fail in a later second
    core.patch_namespaced_pod(
        rank["1"].metadata.name,
        namespace,
        {
            "metadata": {
                "annotations": fail
                | {
                    EXIT_CODE_ANNOTATION: "7",
                    TERMINATION_MESSAGE_ANNOTATION: "NcclTimeout: collective timed out",
                }
            }
        },
    )
    resources.wait_phase(FTJ, "ranks", "Failed")
    _wait_reason(resources, "ranks", "OutOfMemory")  # not rank 1's later NcclTimeout


def _wait_reason(resources: Resources, name: str, reason: str) -> None:
    wait_for(
        lambda: resources.get(FTJ, name)["status"].get("failureReason") == reason,
        what=f"{name}'s failureReason to be {reason}",
    )


def test_more_gpus_than_any_node_has_is_reported_unschedulable(
    resources: Resources, namespace: str, volumes: Any
) -> None:
    resources.create(FTJ, finetunejob("huge", resources={"nodes": 1, "gpusPerNode": 16}))
    cond = wait_for(
        lambda: (
            (c := resources.condition(FTJ, "huge", "Scheduled")) and c["status"] == "False" and c
        ),
        what="the Scheduled=False condition",
    )
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert resources.get(FTJ, "huge")["status"]["phase"] == "Pending"
    # Not started yet, so the GPU count may still be fixed; the job converges on the new size.
    resources.patch(FTJ, "huge", {"spec": {"resources": {"gpusPerNode": 2}}})
    resources.wait_phase(FTJ, "huge", "Running")


def test_deleted_and_edited_children_are_restored(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(FTJ, finetunejob("heal", resources={"nodes": 1, "gpusPerNode": 1}))
    core = client.CoreV1Api(api_client)
    original = wait_for(
        lambda: _read(core.read_namespaced_config_map, "heal-config", namespace), what="config"
    )
    core.delete_namespaced_config_map("heal-config", namespace)
    restored = wait_for(
        lambda: _read(core.read_namespaced_config_map, "heal-config", namespace), what="restore"
    )
    assert restored.metadata.uid != original.metadata.uid
    assert restored.data == original.data

    core.patch_namespaced_config_map("heal-config", namespace, {"data": {"config.json": "{}"}})
    wait_for(
        lambda: core.read_namespaced_config_map("heal-config", namespace).data == original.data,
        what="the hand edit to be reverted",
    )
    # The namespace's trainer identity comes through its own watch (handlers/children.py),
    # filtered by the API server on kubetune's labels: a deletion, an edit, and a label taken
    # away (the object leaves the watch's selection, which the server sends as a deletion) are
    # all restored while the namespace has a FineTuneJob.
    rbac = client.RbacAuthorizationV1Api(api_client)
    binding = rbac.read_namespaced_role_binding("kubetune-trainer", namespace)
    rbac.delete_namespaced_role_binding("kubetune-trainer", namespace)
    wait_for(
        lambda: (
            (b := _read(rbac.read_namespaced_role_binding, "kubetune-trainer", namespace))
            and b.metadata.uid != binding.metadata.uid
        ),
        what="the RoleBinding to be restored",
    )
    rbac.patch_namespaced_role(
        "kubetune-trainer",
        namespace,
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}},
    )
    wait_for(
        lambda: (
            rbac.read_namespaced_role("kubetune-trainer", namespace).metadata.labels.get(
                "app.kubernetes.io/managed-by"
            )
            == "kubetune"
        ),
        what="the Role's label to be restored",
    )
    rbac.patch_namespaced_role(
        "kubetune-trainer",
        namespace,
        {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]},
    )
    wait_for(
        lambda: (
            [r.resources for r in rbac.read_namespaced_role("kubetune-trainer", namespace).rules]
            == [["finetunejobs/status"]]
        ),
        what="the Role's rules to be restored",
    )
    batch = client.BatchV1Api(api_client)
    job = wait_for(lambda: _read(batch.read_namespaced_job, "heal-train", namespace), what="job")
    batch.delete_namespaced_job("heal-train", namespace, propagation_policy="Background")
    wait_for(
        lambda: (
            (j := _read(batch.read_namespaced_job, "heal-train", namespace))
            and j.metadata.uid != job.metadata.uid
        ),
        what="the Job to be recreated",
    )


def test_a_new_job_is_reconciled_from_its_events_writing_only_its_status(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    """The spec's generation, not kopf's create/update handlers, drives the reconcile: those
    write the last handled spec into an annotation on every FineTuneJob (one more write per
    creation and edit, a second copy of the spec in every body). Only the status is written, by
    kubetune alone; a spec edit still converges (observedGeneration follows it)."""
    resources.create(FTJ, finetunejob("quiet", resources={"nodes": 1, "gpusPerNode": 1}))
    resources.wait_phase(FTJ, "quiet", "Running")
    body = resources.get(FTJ, "quiet")
    assert not [k for k in body["metadata"].get("annotations") or {} if "kubetune.io" in k]
    writers = {(f["manager"], f.get("subresource", "")) for f in body["metadata"]["managedFields"]}
    assert {w for w in writers if w[1] != "status"} == {
        w for w in writers if w[0] != "kubetune" and w[1] == ""
    }  # the main object: only its creator
    resources.patch(FTJ, "quiet", {"spec": {"runPolicy": {"suspend": True}}})
    resources.wait_phase(FTJ, "quiet", "Suspended")
    body = resources.get(FTJ, "quiet")
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"] == 2


def test_deleting_the_resource_deletes_its_children(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(FTJ, finetunejob("gone", resources={"nodes": 1, "gpusPerNode": 1}))
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    wait_for(lambda: _read(batch.read_namespaced_job, "gone-train", namespace), what="the Job")
    resources.delete(FTJ, "gone")
    wait_for(
        lambda: _read(batch.read_namespaced_job, "gone-train", namespace) is None,
        what="Job deletion",
    )
    wait_for(
        lambda: _read(core.read_namespaced_config_map, "gone-config", namespace) is None,
        what="CM deletion",
    )
    wait_for(
        lambda: _read(core.read_namespaced_service, "gone-workers", namespace) is None,
        what="Svc deletion",
    )


def test_spec_edits_converge_suspend_and_resume(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(FTJ, finetunejob("edit", resources={"nodes": 1, "gpusPerNode": 1}))
    batch = client.BatchV1Api(api_client)
    resources.wait_phase(FTJ, "edit", "Running")
    resources.patch(FTJ, "edit", {"spec": {"runPolicy": {"suspend": True, "backoffLimit": 4}}})
    wait_for(
        lambda: (
            (j := batch.read_namespaced_job("edit-train", namespace)).spec.suspend
            and j.spec.backoff_limit == 4
        ),
        what="the Job to be suspended",
    )
    obj = resources.wait_phase(FTJ, "edit", "Suspended")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    resources.patch(FTJ, "edit", {"spec": {"runPolicy": {"suspend": False}}})
    resources.wait_phase(FTJ, "edit", "Running")


def test_kueue_queue_label_and_initial_suspend(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(
        FTJ, finetunejob("queued", queueName="team-a", resources={"nodes": 1, "gpusPerNode": 1})
    )
    batch = client.BatchV1Api(api_client)
    job = wait_for(
        lambda: _read(batch.read_namespaced_job, "queued-train", namespace), what="the Job"
    )
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job.spec.suspend is True
    obj = resources.wait_phase(FTJ, "queued", "Suspended")
    assert resources.condition(FTJ, "queued", "Suspended")["reason"] == "WaitingForQueue"  # type: ignore[index]
    # Kueue admits the workload by unsuspending the Job; the operator must not fight it.
    batch.patch_namespaced_job("queued-train", namespace, {"spec": {"suspend": False}})
    resources.wait_phase(FTJ, "queued", "Running")
    assert obj["status"]["phase"] == "Suspended"
    assert batch.read_namespaced_job("queued-train", namespace).spec.suspend is False


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (
            {"resources": {"nodes": 0}},
            "spec.resources.nodes",
            "should be greater than or equal to 1",
        ),
        (
            {"method": "full", "lora": {"rank": 4}},
            "spec.lora",
            "only allowed with spec.method 'lora'",
        ),
        ({"model": {"source": "ftp://x/y"}}, "spec.model.source", "should match"),
        (
            {"hyperparameters": {"precision": "int3"}},
            "spec.hyperparameters.precision",
            "Unsupported value",
        ),
    ],
)
def test_bad_specs_are_rejected_by_the_server_naming_the_field(
    resources: Resources, change: dict[str, Any], field: str, message: str
) -> None:
    body = finetunejob("bad")
    body["spec"].update(copy.deepcopy(change))
    with pytest.raises(ApiException) as err:
        resources.create(FTJ, body)
    assert err.value.status == 422
    text = json.loads(err.value.body)["message"]
    assert field in text and message in text, text


def test_training_spec_is_immutable_once_started(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(FTJ, finetunejob("frozen", resources={"nodes": 1, "gpusPerNode": 1}))
    resources.wait_phase(FTJ, "frozen", "Running")
    wait_for(lambda: resources.get(FTJ, "frozen")["status"].get("startTime"), what="startTime")
    with pytest.raises(ApiException) as err:
        resources.patch(FTJ, "frozen", {"spec": {"hyperparameters": {"epochs": 9}}})
    assert "immutable once the job has started" in json.loads(err.value.body)["message"]
    # What is not training spec stays editable.
    resources.patch(FTJ, "frozen", {"spec": {"runPolicy": {"activeDeadlineSeconds": 999}}})


def test_what_only_the_operator_can_judge_becomes_ready_false_and_no_children(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(FTJ, finetunejob("nofmt", dataset={"source": "pvc://datasets/data.bin"}))
    resources.create(FTJ, finetunejob("nopvc", output={"uri": "pvc://missing-claim/out"}))
    cond = wait_for(
        lambda: (c := resources.condition(FTJ, "nofmt", "Ready")) and c, what="Ready condition"
    )
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert "spec.dataset.format" in cond["message"]
    cond = wait_for(
        lambda: (c := resources.condition(FTJ, "nopvc", "Ready")) and c, what="Ready condition"
    )
    assert cond["reason"] == "MissingDependency"
    assert "spec.output.uri: PersistentVolumeClaim 'missing-claim' not found" in cond["message"]
    core = client.CoreV1Api(api_client)
    names = [cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items]
    assert names == ["kube-root-ca.crt"]
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=nofmt").items
    assert any(e.reason == "InvalidSpec" and e.type == "Warning" for e in events)
    # Another resource in the same namespace is still served.
    resources.create(FTJ, finetunejob("fine", resources={"nodes": 1, "gpusPerNode": 1}))
    resources.wait_phase(FTJ, "fine", "Running")


def test_a_child_the_server_refuses_leaves_no_half_built_set(
    resources: Resources,
    api_client: client.ApiClient,
    namespace: str,
    volumes: Any,
    operator: OperatorProcess,
) -> None:
    """A quota that allows no Job: the Job is refused after the other children were applied,
    and those are removed again; the FineTuneJob is Stalled and says why. The refusal is tried
    again with backoff, each try a dry run that writes nothing while the quota holds; once the
    quota is gone, the job runs without a spec change."""
    core = client.CoreV1Api(api_client)
    core.create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}
    )
    wait_for(
        lambda: core.read_namespaced_resource_quota("no-jobs", namespace).status.hard or {},
        what="the quota to be computed",
    )
    resources.create(FTJ, finetunejob("quota", resources={"nodes": 1, "gpusPerNode": 1}))
    cond = wait_for(
        lambda: (c := resources.condition(FTJ, "quota", "Stalled")) and c["status"] == "True" and c,
        what="Stalled",
    )
    assert cond["reason"] == "ChildRejected" and "exceeded quota" in cond["message"]
    selector = "kubetune.io/finetunejob=quota"
    assert not core.list_namespaced_config_map(namespace, label_selector=selector).items
    assert not core.list_namespaced_service(namespace, label_selector=selector).items
    assert not core.list_namespaced_service_account(namespace, label_selector=selector).items
    rbac = client.RbacAuthorizationV1Api(api_client)
    assert not rbac.list_namespaced_role(namespace, label_selector=selector).items

    stalled_version = resources.get(FTJ, "quota")["metadata"]["resourceVersion"]
    # The operator logs each retry it schedules: "try 3" is scheduled once try 2 was refused.
    wait_for(
        lambda: (
            f"{namespace}/quota: the API server refused a child; trying again"
            in (log := operator.log.read_text(errors="replace"))
            and "(try 3)" in log
        ),
        timeout=60,
        what="the first retry to be refused too",
    )
    assert resources.get(FTJ, "quota")["metadata"]["resourceVersion"] == stalled_version
    assert not core.list_namespaced_config_map(namespace, label_selector=selector).items
    core.delete_namespaced_resource_quota("no-jobs", namespace)
    resources.wait_phase(FTJ, "quota", "Running", timeout=120)
    stalled = resources.condition(FTJ, "quota", "Stalled")
    assert stalled is not None and stalled["status"] == "False", stalled


def test_operator_restart_loses_nothing_and_duplicates_nothing(
    resources: Resources,
    operator: OperatorProcess,
    api_client: client.ApiClient,
    namespace: str,
    volumes: Any,
) -> None:
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    resources.create(FTJ, finetunejob("before", resources={"nodes": 1, "gpusPerNode": 1}))
    resources.wait_phase(FTJ, "before", "Running")
    operator.stop()
    try:
        resources.create(FTJ, finetunejob("during", resources={"nodes": 1, "gpusPerNode": 1}))
        core.delete_namespaced_config_map("before-config", namespace)
    finally:
        operator.start()
    resources.wait_phase(FTJ, "during", "Running")
    wait_for(
        lambda: _read(core.read_namespaced_config_map, "before-config", namespace),
        what="restored config",
    )
    jobs = sorted(j.metadata.name for j in batch.list_namespaced_job(namespace).items)
    assert jobs == ["before-train", "during-train"]
    assert len(_pods(core, namespace, "before-train")) == 1


def test_every_generated_pod_passes_the_restricted_profile(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    core = client.CoreV1Api(api_client)
    core.patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    resources.create(FTJ, finetunejob("strict", resources={"nodes": 2, "gpusPerNode": 1}))
    resources.create(
        "modelservers",
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": "strict-serve"},
            "spec": {"model": {"source": "pvc://models/repo"}, "replicas": 2},
        },
    )
    wait_for(
        lambda: len(_pods(core, namespace, "strict-train")) == 2, what="2 training pods admitted"
    )
    wait_for(
        lambda: (
            len(
                core.list_namespaced_pod(
                    namespace, label_selector="kubetune.io/modelserver=strict-serve"
                ).items
            )
            == 2
        ),
        what="2 Triton pods admitted",
    )
    warnings = [
        e for e in core.list_namespaced_event(namespace).items if e.reason == "FailedCreate"
    ]
    assert warnings == []


def _read(reader: Any, name: str, namespace: str) -> Any:
    try:
        return reader(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
