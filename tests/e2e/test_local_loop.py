"""The whole loop through the operator, for real, on the session's real-node cluster: a FineTuneJob
trains MiniLM in a pod of kubetune's trainer image (torchrun, the real trainer, progress through
the API server with the pod's own credential), a ModelServer serves the result in kubetune's local
Triton image, the operator's smoke test asks it, and a model that answers wrongly is rolled back.
The operator runs as the chart's ServiceAccount; the claims come from the default StorageClass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from kubernetes import client
from tests.cluster_fixtures import OperatorProcess, RealNode, Resources
from tests.real_node import minilm_claims
from tests.waiting import wait_for

from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.demo import PLACEMENT

pytestmark = pytest.mark.cluster
BILLING = "I was charged twice for my order"
SERVER = "kubetune.io/modelserver=intents"


def _diagnose(resources: Resources, cluster: LocalCluster) -> str:
    """What a person would look at: the ModelServer's status and its pods' logs."""
    status = json.dumps(resources.get("modelservers", "intents").get("status"), indent=1)
    try:
        logs = cluster.kubectl(
            "-n", resources.namespace, "logs", "--all-containers", "--tail=60", "-l", SERVER
        )
    except Exception as err:  # a diagnostic only
        logs = str(err)
    return f"{status}\n{logs}"


def _address(api: client.ApiClient, namespace: str) -> str:
    """The Triton HTTP endpoint of the ModelServer's ready pod (each pod has its own IP)."""
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=SERVER).items
    ready = [
        p
        for p in pods
        if not p.metadata.deletion_timestamp
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]
    assert len(ready) == 1, [p.metadata.name for p in pods]
    return f"{ready[0].status.pod_ip}:8000"


@pytest.fixture
def loop(
    real_node: RealNode, real_operator: OperatorProcess, real_namespace: str
) -> tuple[Resources, dict[str, Path]]:
    """The test's namespace with the claims of examples/pvcs.yaml holding MiniLM and the data."""
    real_node.load("trainer", "triton")
    folders = minilm_claims(real_node.cluster, real_namespace)
    return Resources(real_node.api, real_namespace), folders


def test_train_serve_smoke_test_and_roll_back(
    loop: tuple[Resources, dict[str, Path]], real_node: RealNode
) -> None:
    (resources, folders), cluster, api_client = loop, real_node.cluster, real_node.api
    namespace = resources.namespace
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
    assert (folders["models"] / "out" / "intents" / "triton-repository").is_dir()

    server: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "intents"},
        "spec": {
            "model": {"fineTuneJobRef": {"name": "intents"}},
            "resources": {"gpus": 1, **PLACEMENT},
            "replicas": 1,
            "rollout": {"smokeTest": {"text": BILLING, "expectedLabel": "billing"}},
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

    # A client asks the served model on its pod's IP (this machine routes to the pod network).
    text = httpclient.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[BILLING.encode()], [b"where is my package"]], dtype=object))
    # Closed after use: an open keep-alive connection holds Triton's drain for its full timeout.
    with httpclient.InferenceServerClient(_address(api_client, namespace)) as triton:
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
    with httpclient.InferenceServerClient(_address(api_client, namespace)) as triton:
        labels = triton.infer("intents", [text]).as_numpy("LABEL").reshape(-1)
    assert [label.decode() for label in labels] == ["billing", "shipping"]
