"""The pre-flight check through the operator on the session's real-node cluster: a CPU pod of
kubetune's trainer image runs `python -m kubetune.trainer preflight` on the job's volumes (claims of
the default StorageClass) under the generated securityContext, and its verdict decides whether the
training Job is created."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubernetes import client

from kubetune.devcluster.demo import PLACEMENT, minilm_checkpoint
from tests.cluster_fixtures import RealNode, Resources
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def job(name: str, gpu_memory: str, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        # this job asks for the check whatever the operator's default (Settings.preflight)
        "metadata": {"name": name, "annotations": {"kubetune.io/preflight": "true"}},
        "spec": {
            "model": {"source": "pvc://models/minilm"},
            "dataset": {"source": "pvc://datasets/intents.jsonl"},
            "hyperparameters": {"batchSize": 64, "maxSeqLength": 512},
            "resources": {"gpusPerNode": 1, "gpuMemory": gpu_memory, **PLACEMENT},
            "output": {"uri": "pvc://models/out"},
            **extra,
        },
    }


def stage_sources(volumes: dict[str, Path]) -> None:
    """The model job() names (pvc://models/minilm) and its dataset, on the test's claims.
    config.json is all the pre-flight reads of a model: no weights are needed for the check."""
    (volumes["models"] / "minilm").mkdir()
    (volumes["models"] / "minilm" / "config.json").write_bytes(
        (minilm_checkpoint() / "config.json").read_bytes()
    )
    (volumes["datasets"] / "intents.jsonl").write_bytes(
        (REPO / "examples" / "data" / "support-intents.jsonl").read_bytes()
    )


def validated(resources: Resources, name: str) -> dict[str, Any]:
    return wait_for(
        lambda: (
            (c := resources.condition("finetunejobs", name, "Validated"))
            and c["status"] != "Unknown"
            and c
        ),
        180,
        f"{name}'s pre-flight verdict",
    )


def test_a_job_whose_plan_does_not_fit_is_refused_with_no_job(
    real_node: RealNode,
    real_resources: Resources,
    real_namespace: str,
    real_volumes: dict[str, Path],
) -> None:
    real_node.load("trainer")
    resources, namespace = real_resources, real_namespace
    stage_sources(real_volumes)
    batch = client.BatchV1Api(real_node.api)

    resources.create("finetunejobs", job("too-big", "2Gi"))
    refused = validated(resources, "too-big")
    assert refused["status"] == "False", refused
    assert refused["reason"] == "DoesNotFit"
    status = resources.get("finetunejobs", "too-big")["status"]
    assert status["phase"] == "Failed"
    plan = status["plan"]
    assert plan["fits"] is False and plan["deviceMemoryBytes"] == 2 * 1024**3
    assert plan["perDeviceBytes"] > 2 * 1024**3
    assert plan["suggestion"]["batchSize"] < 64  # what would fit, from the same plan
    assert plan["deviceMemorySource"] == "spec.resources.gpuMemory"
    stalled = resources.condition("finetunejobs", "too-big", "Stalled")
    assert stalled is not None and stalled["status"] == "True"
    names = [j.metadata.name for j in batch.list_namespaced_job(namespace).items]
    assert names == ["too-big-preflight"]  # no training Job: no GPU was ever asked for

    # The same job on a GPU it fits gets its training Job (suspended here: nothing trains).
    resources.create("finetunejobs", job("fits", "80Gi", runPolicy={"suspend": True}))
    accepted = validated(resources, "fits")
    assert (accepted["status"], accepted["reason"]) == ("True", "Fits"), accepted
    wait_for(
        lambda: (
            "fits-train" in [j.metadata.name for j in batch.list_namespaced_job(namespace).items]
        ),
        60,
        "the training Job after a passing pre-flight",
    )
    assert resources.get("finetunejobs", "fits")["status"]["plan"]["fits"] is True


def test_an_unreachable_model_is_refused_before_any_gpu(
    real_node: RealNode,
    real_resources: Resources,
    real_namespace: str,
    real_volumes: dict[str, Path],
) -> None:
    real_node.load("trainer")
    resources, namespace = real_resources, real_namespace
    (real_volumes["datasets"] / "intents.jsonl").write_text(
        json.dumps({"text": "hello", "label": "a"}) + "\n", encoding="utf-8"
    )
    resources.create("finetunejobs", job("no-model", "80Gi"))
    refused = validated(resources, "no-model")
    assert (refused["status"], refused["reason"]) == ("False", "ModelNotFound"), refused
    assert "/kubetune/pvc/models/minilm" in refused["message"]
    jobs = client.BatchV1Api(real_node.api).list_namespaced_job(namespace).items
    assert [j.metadata.name for j in jobs] == ["no-model-preflight"]
