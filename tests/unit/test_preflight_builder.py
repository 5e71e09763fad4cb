"""The pre-flight Job (one CPU pod, before the training Job) and the GPU memory it is given."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune import planner
from kubetune.api.contract import PreflightEnv
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.reasons import ValidatedReason
from kubetune.api.v1alpha1.trainerconfig import PreflightResult
from kubetune.builders.common import Owner, Settings
from kubetune.builders.preflight import (
    CHECKED_DIGEST,
    build_preflight_job,
    outcome,
    read_result,
    wanted,
)
from kubetune.builders.training import build_job

OWNER = Owner("kubetune.io/v1alpha1", "FineTuneJob", "big", "ns", "uid-1")


def ftj(**spec: Any) -> FineTuneJob:
    base: dict[str, Any] = {
        "model": {"source": "hf://org/model", "secretRef": {"name": "hub"}},
        "dataset": {"source": "pvc://data/train.jsonl"},
        "output": {"uri": "pvc://models/out"},
        "resources": {
            "gpusPerNode": 8,
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        },
    }
    base.update(spec)
    return FineTuneJob.model_validate({"metadata": {"name": "big"}, "spec": base})


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_the_preflight_pod_holds_no_gpu_but_sees_what_training_sees() -> None:
    job = build_preflight_job(ftj(), OWNER, Settings(), 80 * 1024**3, "node label")
    train = build_job(ftj(), OWNER, Settings())
    spec, train_spec = pod(job), pod(train)
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "kubetune.trainer", "preflight"]
    assert "nvidia.com/gpu" not in str(container["resources"])
    env = {e["name"]: e for e in container["env"]}
    assert env[PreflightEnv.GPU_MEMORY_BYTES]["value"] == str(80 * 1024**3)
    assert env["KUBETUNE_MODEL_HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hub"
    train_env = {e["name"]: e for e in train_spec["containers"][0]["env"]}
    assert env["KUBETUNE_TRAINER_CONFIG"] == train_env["KUBETUNE_TRAINER_CONFIG"]
    assert {v["name"]: v for v in spec["volumes"]}["config"] == {
        v["name"]: v for v in train_spec["volumes"]
    }["config"]  # the same rendered config
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] != "scratch")
    # where the job may go, with the GPU taint tolerated, and Pod Security "restricted"
    assert spec["nodeSelector"] == {"pool": "h100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_a_new_spec_or_gpu_size_is_checked_again() -> None:
    def digest(job: dict[str, Any]) -> str:
        return job["spec"]["template"]["metadata"]["annotations"][CHECKED_DIGEST]  # type: ignore[no-any-return]

    first = build_preflight_job(ftj(), OWNER, Settings(), 80 * 1024**3, "x")
    again = build_preflight_job(ftj(), OWNER, Settings(), 80 * 1024**3, "x")
    bigger_batch = build_preflight_job(
        ftj(hyperparameters={"batchSize": 64}), OWNER, Settings(), 80 * 1024**3, "x"
    )
    smaller_gpu = build_preflight_job(ftj(), OWNER, Settings(), 40 * 1024**3, "x")
    assert digest(first) == digest(again)
    assert len({digest(first), digest(bigger_batch), digest(smaller_gpu)}) == 3


def test_unknown_gpu_memory_passes_nothing() -> None:
    (container,) = pod(build_preflight_job(ftj(), OWNER, Settings(), None, None))["containers"]
    assert PreflightEnv.GPU_MEMORY_BYTES not in {e["name"] for e in container["env"]}


def test_results_are_read_back_from_the_termination_message() -> None:
    result = PreflightResult(validated=False, reason=ValidatedReason.DOES_NOT_FIT, message="m")
    assert read_result(result.model_dump_json(by_alias=True)) == result
    assert read_result("Other: Traceback ...") is None
    assert read_result("{not json") is None
    assert read_result(None) is None


@pytest.mark.parametrize(
    ("resources", "labels", "expected"),
    [
        ({"gpuMemory": "80Gi"}, [{"nvidia.com/gpu.memory": "40960"}], (80 * 1024**3, "spec")),
        (
            {},
            [{"nvidia.com/gpu.memory": "81559"}, {"nvidia.com/gpu.memory": "40960"}],
            (40960 * 1024**2, "node label"),
        ),  # the smallest GPU the job may land on
        ({}, [{"other": "1"}], (None, None)),
        ({"gpusPerNode": 0, "memory": "16Gi"}, [], (16 * 1024**3, "spec.resources.memory")),
        ({"gpusPerNode": 0}, [], (None, None)),
    ],
)
def test_device_memory_comes_from_the_spec_or_the_node_labels(
    resources: dict[str, Any], labels: list[dict[str, str]], expected: tuple[Any, Any]
) -> None:
    size, source = planner.device_memory(ftj(resources=resources).spec, labels)
    assert size == expected[0]
    assert (source is None) if expected[1] is None else (expected[1] in (source or ""))


@pytest.mark.parametrize(
    ("text", "value"),
    [("80Gi", 80 * 1024**3), ("81920Mi", 80 * 1024**3), ("8e9", 8 * 10**9), ("40G", 40 * 10**9)],
)
def test_quantities(text: str, value: int) -> None:
    assert planner.quantity_bytes(text) == value


def pod_with_message(message: str, created: str) -> dict[str, Any]:
    terminated = {"exitCode": 0, "message": message}
    return {
        "metadata": {"creationTimestamp": created},
        "status": {
            "containerStatuses": [{"name": "preflight", "state": {"terminated": terminated}}]
        },
    }


def test_the_outcome_waits_for_the_job_and_reads_the_last_verdict() -> None:
    verdict = PreflightResult(validated=True, reason=ValidatedReason.FITS, message="ok")
    assert outcome({"status": {"active": 1}}, []) is None  # still running
    done = {"status": {"succeeded": 1}}
    pods = [
        pod_with_message("Other: the hub did not answer", "2026-01-01T00:00:00Z"),
        pod_with_message(verdict.model_dump_json(by_alias=True), "2026-01-01T00:01:00Z"),
    ]
    assert outcome(done, pods) == verdict
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    refused = outcome(failed, pods[:1])
    assert refused is not None
    assert (refused.validated, refused.reason) == (False, ValidatedReason.CHECK_FAILED)
    assert refused.message == "Other: the hub did not answer"


@pytest.mark.parametrize(
    ("annotation", "default", "expected"),
    [(None, False, False), (None, True, True), ("true", False, True), ("false", True, False)],
)
def test_a_job_annotation_overrides_the_operators_default(
    annotation: str | None, default: bool, expected: bool
) -> None:
    annotations = {"kubetune.io/preflight": annotation} if annotation else {}
    assert wanted({"metadata": {"annotations": annotations}}, default) is expected
