"""The whole loop through the operator, for real: a FineTuneJob trains MiniLM in a pod on the
local node (torchrun, the real trainer, progress through the API server with the pod's own
credential), a ModelServer serves the result with the real Triton server, the operator's smoke test
asks it, and a model that answers wrongly is rolled back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from kubernetes import client
from tests.cluster_fixtures import Resources
from tests.waiting import wait_for

from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.demo import PLACEMENT, minilm_checkpoint

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
BILLING = "I was charged twice for my order"
PORT = 18400


def _diagnose(resources: Resources, cluster: LocalCluster) -> str:
    """What a person would look at: the ModelServer's status and the local node's pod logs."""
    parts = [json.dumps(resources.get("modelservers", "intents").get("status"), indent=1)]
    for log in sorted(
        (cluster.dir / "local-node" / "pods").glob(f"{resources.namespace}_*/logs/*.log")
    ):
        parts.append(
            f"--- {log.parent.parent.name}/{log.name}\n" + log.read_text(errors="replace")[-3000:]
        )
    return "\n".join(parts)


def test_train_serve_smoke_test_and_roll_back(
    resources: Resources,
    api_client: client.ApiClient,
    namespace: str,
    volumes: dict[str, Path],
    cluster: LocalCluster,
) -> None:
    shutil.copytree(minilm_checkpoint(), volumes["models"] / "base" / "minilm")
    shutil.copy(
        REPO / "examples" / "data" / "support-intents.jsonl", volumes["datasets"] / "intents.jsonl"
    )
    resources.create(
        "finetunejobs",
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "intents"},
            "spec": {
                "model": {"source": "pvc://models/base/minilm"},
                "dataset": {"source": "pvc://datasets/intents.jsonl", "validationSplit": 0.2},
                "hyperparameters": {
                    "epochs": 3,
                    "learningRate": 1e-4,
                    "batchSize": 16,
                    "maxSeqLength": 48,
                },
                "resources": {"nodes": 1, "gpusPerNode": 1, **PLACEMENT},
                "output": {"uri": "pvc://models/out/intents"},
                "checkpointing": {"everySteps": 40},
                "runPolicy": {"backoffLimit": 0},
            },
        },
    )
    job = wait_for(
        lambda: (
            (o := resources.get("finetunejobs", "intents")).get("status", {}).get("phase")
            in ("Succeeded", "Failed")
            and o
        ),
        600,
        "the fine-tune to finish",
    )
    status = job["status"]
    assert status["phase"] == "Succeeded", status.get("failureMessage")
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] > 0
    assert progress["lastHeartbeat"]
    assert status["output"]["metrics"]["accuracy"] >= 0.8  # 6 intents: chance is about 0.17
    assert status["lastCheckpoint"]["step"] >= 40
    assert (volumes["models"] / "out" / "intents" / "triton-repository").is_dir()

    server: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "intents"},
        "spec": {
            "model": {"fineTuneJobRef": {"name": "intents"}},
            "resources": {"gpus": 1, **PLACEMENT},
            "replicas": 1,
            "rollout": {"smokeTest": {"text": BILLING, "expectedLabel": "billing"}},
            # The local node's pods share this machine's ports: stay clear of a running demo.
            "service": {"httpPort": PORT, "grpcPort": PORT + 1, "metricsPort": PORT + 2},
        },
    }
    resources.create("modelservers", server)
    try:
        ready = resources.wait_phase("modelservers", "intents", "Ready", timeout=300)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{_diagnose(resources, cluster)}") from err
    assert ready["status"]["smokeTest"]["passed"] is True
    assert "billing" in ready["status"]["smokeTest"]["message"]
    good = ready["status"]["served"]["revision"]
    assert ready["status"]["served"]["fineTuneJobUid"] == job["metadata"]["uid"]
    assert ready["status"]["served"]["checksum"].startswith("sha256:")

    # A client in the cluster asks the served model (the local node's pods share this machine's
    # network, so the pod's port is on loopback).
    text = httpclient.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[BILLING.encode()], [b"where is my package"]], dtype=object))
    # Closed after use: an open keep-alive connection holds Triton's drain for its full timeout.
    with httpclient.InferenceServerClient(f"127.0.0.1:{PORT}") as triton:
        labels = triton.infer("intents", [text]).as_numpy("LABEL").reshape(-1)
    assert [label.decode() for label in labels] == ["billing", "shipping"]

    # Serve a model that answers wrongly (the base checkpoint with an untrained head): the smoke
    # test fails and the ModelServer goes back to the fine-tuned model.
    resources.patch(
        "modelservers",
        "intents",
        {"spec": {"model": {"fineTuneJobRef": None, "source": "pvc://models/base/minilm"}}},
    )
    try:
        rolled = wait_for(
            lambda: (
                (c := resources.condition("modelservers", "intents", "Degraded"))
                and c["reason"] == "RolledBack"
                and c
            ),
            420,
            "the rollback",
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{_diagnose(resources, cluster)}") from err
    assert "was rolled back to" in rolled["message"]
    final = resources.wait_phase("modelservers", "intents", "Degraded", timeout=300)
    assert final["status"]["served"]["revision"] == good
    assert final["status"]["failedRevision"] not in (None, good)
    wait_for(
        lambda: resources.get("modelservers", "intents")["status"].get("readyReplicas") == 1,
        300,
        "the rolled-back pod to be ready",
    )
    with httpclient.InferenceServerClient(f"127.0.0.1:{PORT}") as triton:
        labels = triton.infer("intents", [text]).as_numpy("LABEL").reshape(-1)
    assert [label.decode() for label in labels] == ["billing", "shipping"]
