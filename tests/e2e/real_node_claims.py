"""Claims on a real-node cluster as a user makes them: examples/pvcs.yaml, bound by the default
StorageClass, with the shipped MiniLM checkpoint and dataset copied into the volumes' folders
(the node is this machine; `kubectl cp` through a pod would do the same)."""

from __future__ import annotations

import shutil
from pathlib import Path

from kubernetes import client, config
from tests.waiting import wait_for

from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.demo import minilm_checkpoint

REPO = Path(__file__).resolve().parents[2]
MODEL = "pvc://models/base/minilm"
DATASET = "pvc://datasets/intents.jsonl"


def minilm_claims(cluster: LocalCluster, namespace: str) -> dict[str, Path]:
    """The `models` and `datasets` claims' folders, holding MODEL and DATASET."""
    core = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
    cluster.kubectl("-n", namespace, "apply", "-f", str(REPO / "examples" / "pvcs.yaml"))
    folders = {}
    for claim in ("models", "datasets"):
        bound = wait_for(
            lambda c=claim: (
                (pvc := core.read_namespaced_persistent_volume_claim(c, namespace)).status.phase
                == "Bound"
                and pvc
            ),
            timeout=60,
            what=f"claim {claim} to be bound",
        )
        volume = core.read_persistent_volume(bound.spec.volume_name)
        folders[claim] = Path(volume.spec.host_path.path)
    shutil.copytree(minilm_checkpoint(), folders["models"] / "base" / "minilm")
    shutil.copy(
        REPO / "examples" / "data" / "support-intents.jsonl",
        folders["datasets"] / "intents.jsonl",
    )
    return folders
