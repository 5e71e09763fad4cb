"""Helpers of the real-node tests: claims as a user makes them, and a deleted pod's container."""

from __future__ import annotations

import shutil
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster import node
from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.demo import minilm_checkpoint
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
MODEL = "pvc://models/base/minilm"
DATASET = "pvc://datasets/intents.jsonl"


def bound_claims(cluster: LocalCluster, namespace: str) -> dict[str, Path]:
    """examples/pvcs.yaml applied in `namespace` and bound by the default StorageClass: the
    folders of this machine behind the `models` and `datasets` claims (the node is this
    machine; `kubectl cp` through a pod would fill them the same way)."""
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
    return folders


def minilm_claims(cluster: LocalCluster, namespace: str) -> dict[str, Path]:
    """bound_claims, with the shipped MiniLM checkpoint and dataset copied into the volumes'
    folders: the `models` and `datasets` folders, holding MODEL and DATASET."""
    folders = bound_claims(cluster, namespace)
    shutil.copytree(minilm_checkpoint(), folders["models"] / "base" / "minilm")
    shutil.copy(
        REPO / "examples" / "data" / "support-intents.jsonl",
        folders["datasets"] / "intents.jsonl",
    )
    return folders


def wait_pod_and_container_gone(
    cluster: LocalCluster, core: client.CoreV1Api, namespace: str, pod: str, container_id: str
) -> None:
    """Waits for `pod` to be gone from the API server (the caller deleted it, or its owner),
    then for the node's containerd to have removed `container_id`."""

    def gone() -> bool:
        try:
            core.read_namespaced_pod(pod, namespace)
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(gone, timeout=120, what=f"pod {pod} to be deleted")
    paths = node.NodePaths(cluster.dir / "node")
    wait_for(
        lambda: container_id not in node.ctr(paths, "containers", "list", "-q").stdout.split(),
        timeout=60,
        what="containerd to remove the container",
    )
