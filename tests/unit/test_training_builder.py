from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.finetunejob import Phase
from kubetune.builders import training
from kubetune.builders.common import Owner, Settings, child_name
from kubetune.builders.training import check_spec, dependencies
from kubetune.builders.training_status import classify_termination, observe
from kubetune.handlers.common import describe_validation_error


def ftj(**spec: Any) -> FineTuneJob:
    base: dict[str, Any] = {
        "model": {"source": "pvc://models/base"},
        "dataset": {"source": "pvc://data/train.jsonl"},
        "output": {"uri": "pvc://models/out"},
    }
    base.update(spec)
    return FineTuneJob.model_validate({"metadata": {"name": "x"}, "spec": base})


def test_format_inference_problem_names_the_field() -> None:
    problems = check_spec(ftj(dataset={"source": "pvc://data/train.bin"}).spec)
    assert [p.field for p in problems] == ["spec.dataset.format"]
    assert check_spec(ftj(dataset={"source": "pvc://data/train.bin", "format": "csv"}).spec) == []


def test_dependencies_list_claims_once_per_field_and_no_secrets() -> None:
    """The operator reads no Secret (its ClusterRole has no rule on Secrets): only claims are
    checked before the children are built; a missing Secret is reported from the pod."""
    deps = dependencies(ftj(model={"source": "hf://org/m", "secretRef": {"name": "tok"}}).spec)
    assert [(d.kind, d.name, d.field) for d in deps] == [
        ("PersistentVolumeClaim", "data", "spec.dataset.source"),
        ("PersistentVolumeClaim", "models", "spec.output.uri"),
    ]


def _waiting(reason: str, message: str) -> dict[str, Any]:
    return {
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": reason, "message": message}}}
            ],
        }
    }


def test_a_pod_waiting_for_its_secret_is_a_missing_dependency_naming_the_field() -> None:
    job = ftj(
        model={"source": "hf://org/m", "secretRef": {"name": "tok"}},
        output={"uri": "s3://b/out", "secretRef": {"name": "tok"}},
    )
    for pods_job in (None, _job(active=1)):  # the pre-flight pod's, or the training pod's
        seen = observe(
            job, pods_job, [_waiting("CreateContainerConfigError", 'secret "tok" not found')]
        )
        assert (seen.phase, seen.reason) == (Phase.PENDING, "MissingDependency")
        assert seen.message == (
            'spec.model.secretRef.name, spec.output.secretRef.name: secret "tok" not found; '
            "the pod starts once it exists"
        )
    key = observe(
        job,
        _job(active=1),
        [_waiting("CreateContainerConfigError", "couldn't find key HF_TOKEN in Secret ns/tok")],
    )
    assert key.reason == "MissingDependency" and key.message.startswith("spec.model.secretRef")
    assert observe(job, _job(active=1), [_waiting("ContainerCreating", "")]).reason == "Starting"


def test_validation_errors_name_the_field_by_its_wire_name() -> None:
    with pytest.raises(ValidationError) as err:
        ftj(resources={"gpusPerNode": -1})
    assert describe_validation_error(err.value) == (
        "spec.resources.gpusPerNode: Input should be greater than or equal to 0"
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("OutOfMemory: CUDA out of memory", "OutOfMemory"),
        ("BadData: spec.dataset.labelField 'label' missing in /data/x.jsonl", "BadData"),
        ("RuntimeError: CUDA error: out of memory", "OutOfMemory"),
        ("something else", "TrainerFailed"),
        ("", "TrainerFailed"),
    ],
)
def test_termination_messages_are_classified(message: str, reason: str) -> None:
    assert classify_termination(message)[0] == reason


def _job(**status: Any) -> dict[str, Any]:
    return {"spec": {}, "status": status}


def test_observe_phases() -> None:
    job = ftj()
    assert observe(job, None, []).phase == Phase.PENDING
    done = _job(conditions=[{"type": "Complete", "status": "True"}], succeeded=1)
    assert observe(job, done, []).phase == Phase.SUCCEEDED
    running_pod = {"status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}}
    seen = observe(job, _job(active=1), [running_pod])
    assert (seen.phase, seen.start_time) == (Phase.RUNNING, "2026-01-01T00:00:00Z")
    pending = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes",
                }
            ],
        }
    }
    seen = observe(job, _job(active=1), [pending])
    assert (seen.phase, seen.reason, seen.start_time) == (Phase.PENDING, "Unschedulable", None)
    assert observe(job, {"spec": {"suspend": True}, "status": {}}, []).phase == Phase.SUSPENDED


def test_active_counts_the_running_training_pods_not_the_jobs_pending_ones() -> None:
    """status.active is "Training pods running" (the API's words; Kubeflow's replica status
    counts the same): the Job's own `active` also counts a pod that is still pending, and a
    status that followed it was written once more per job with nothing else changed."""
    job = ftj(resources={"nodes": 2})
    pending = _waiting("ContainerCreating", "")
    running = {"status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}}
    assert observe(job, _job(active=2), [pending, pending]).active == 0
    assert observe(job, _job(active=2), [running, pending]).active == 1
    assert observe(job, _job(active=2), [running, running]).active == 2


def test_oom_killed_container_is_out_of_memory() -> None:
    pod = {
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "t"}
                    }
                }
            ],
        }
    }
    failed = _job(
        conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
        failed=1,
    )
    seen = observe(ftj(), failed, [pod])
    assert (seen.phase, seen.failure_reason) == (Phase.FAILED, "OutOfMemory")
    assert "BackoffLimitExceeded" in seen.message


def test_a_killed_trainer_is_named_by_its_signal_not_by_its_last_log_line() -> None:
    """kill -9: no trainer's message, the kubelet's fallback is the log's tail."""
    killed = {
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "Error",
                            "message": 'nt": "progress", "step": 5, "totalSteps": 108}',
                            "finishedAt": "t",
                        }
                    }
                }
            ],
        }
    }
    running = {"status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}}
    seen = observe(ftj(), _job(active=1, failed=1), [killed, running])
    assert seen.phase == Phase.RUNNING and seen.restarts == 1
    assert "TrainerFailed: the trainer was killed by SIGKILL (exit code 137)" in seen.message
    assert "progress" not in seen.message


def test_a_deadline_is_the_reason_even_after_the_stopped_trainer_says_preempted() -> None:
    """Past activeDeadlineSeconds the Job controller stops the pod; the trainer checkpoints on
    SIGTERM and exits saying "Preempted". The FineTuneJob failed for the deadline."""
    stopped = {
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 1,
                            "message": "Preempted: stopped by SIGTERM at step 9/100",
                            "finishedAt": "t",
                        }
                    }
                }
            ],
        }
    }
    late = _job(
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
            }
        ]
    )
    seen = observe(ftj(), late, [stopped])
    assert (seen.phase, seen.failure_reason) == (Phase.FAILED, "DeadlineExceeded")
    assert seen.message == "Job was active longer than specified deadline"


def test_child_names_stay_dns_labels() -> None:
    long = "a" * 70
    name = child_name(long, "train", limit=52)
    assert len(name) <= 52 and name.endswith("-train")
    assert child_name(long, "train", limit=52) == name  # stable
    assert child_name("short", "train") == "short-train"


def test_each_location_gets_its_own_credentials() -> None:
    """An S3 dataset and an S3 output with Secrets of their own: neither's keys stand in for
    the other's (the trainer reads them by location, api.contract.credentials)."""
    from kubetune.api.contract import credentials

    ftj = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "creds", "namespace": "ns", "uid": "u"},
            "spec": {
                "model": {"source": "hf://org/model", "secretRef": {"name": "hub"}},
                "dataset": {"source": "s3://data/train.jsonl", "secretRef": {"name": "data-s3"}},
                "output": {"uri": "s3://models/out", "secretRef": {"name": "out-s3"}},
            },
        }
    )
    job = training.build_job(ftj, Owner.from_body(ftj.model_dump(by_alias=True)), Settings())
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in env
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    # The scheme's first key is required (a missing Secret stops the pod, which says so),
    # the others optional.
    assert refs["KUBETUNE_DATASET_AWS_ACCESS_KEY_ID"] == {
        "name": "data-s3",
        "key": "AWS_ACCESS_KEY_ID",
        "optional": False,
    }
    assert refs["KUBETUNE_DATASET_AWS_SESSION_TOKEN"]["optional"] is True
    assert refs["KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID"]["name"] == "out-s3"
    assert refs["KUBETUNE_MODEL_HF_TOKEN"]["name"] == "hub"
    assert not {"AWS_ACCESS_KEY_ID", "HF_TOKEN"} & set(refs)
    pod_env = {"KUBETUNE_DATASET_AWS_ACCESS_KEY_ID": "d", "KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID": "o"}
    assert credentials("DATASET", pod_env) == {"AWS_ACCESS_KEY_ID": "d"}
    assert credentials("OUTPUT", pod_env) == {"AWS_ACCESS_KEY_ID": "o"}
    assert credentials("MODEL", pod_env) == {}


def _owner() -> Owner:
    return Owner("kubetune.io/v1alpha1", "FineTuneJob", "x", "ns", "uid-1")


@pytest.mark.parametrize("nodes", [1, 2])
def test_only_a_multi_node_job_gets_the_headless_service(nodes: int) -> None:
    """One node rendezvouses with itself (localhost): no Service, no subdomain, one write and
    one watched object fewer per job. More nodes find rank 0 by its DNS name through it."""
    children = training.build_children(
        ftj(resources={"nodes": nodes, "gpusPerNode": 1}), _owner(), Settings()
    )
    kinds = [c["kind"] for c in children]
    job = children[-1]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in job["containers"][0]["env"]}
    if nodes == 1:
        assert "Service" not in kinds and "subdomain" not in job
        assert env["PET_MASTER_ADDR"] == "localhost"
    else:
        assert kinds.count("Service") == 1 and job["subdomain"] == "x-workers"
        assert env["PET_MASTER_ADDR"] == "x-train-0.x-workers.ns.svc"


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_child_built_alone_is_the_one_built_with_the_others(nodes: int) -> None:
    """A child's watch event is checked for drift against that child alone (build_child)."""
    job = ftj(resources={"nodes": nodes, "gpusPerNode": 1})
    children = training.build_children(job, _owner(), Settings())
    for child in children:
        assert training.build_child(job, _owner(), Settings(), child["kind"]) == child
    kinds = {c["kind"] for c in children}
    for kind in {"ConfigMap", "Service", "Job", "ServiceAccount", "Role"} - kinds:
        assert training.build_child(job, _owner(), Settings(), kind) is None


def test_the_trainer_identity_is_the_namespaces_and_owned_by_no_job() -> None:
    """One ServiceAccount, Role and RoleBinding per namespace, which every Job's pods run as;
    the Role names no job (the chart's admission policy keeps each pod to its own)."""
    account, role, binding = training.build_trainer_identity("ns")
    assert {c["metadata"]["name"] for c in (account, role, binding)} == {"kubetune-trainer"}
    assert not any("ownerReferences" in c["metadata"] for c in (account, role, binding))
    assert role["rules"] == [
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["finetunejobs/status"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune-trainer", "namespace": "ns"}
    ]
    pod = training.build_children(ftj(), _owner(), Settings())[-1]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubetune-trainer"
