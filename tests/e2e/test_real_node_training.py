"""Training on the real node: a FineTuneJob's Job, exactly as the operator generates it (read-only
root, uid 1000, all capabilities dropped, RuntimeDefault seccomp), runs kubetune's trainer image
(built with buildah on the local ML base) under the real kubelet, containerd and runc; the MiniLM
checkpoint and the dataset come from claims of the default StorageClass, the model lands in the
output claim. Two pods of one FineTuneJob (`nodes: 2`) rendezvous through the headless Service's
DNS name over the pod network and train together with gloo.

The cluster is the session's real-node cluster (`real_node`, shared with the other tests that run
kubetune's images); the operator runs on the host as the chart's ServiceAccount (`real_operator`).
The chart's install of the operator image has a test of its own (test_real_node_operator.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from tests.cluster_fixtures import OperatorProcess, RealNode, Resources
from tests.e2e.conftest import parse_events
from tests.real_node import DATASET, MODEL, minilm_claims, wait_pod_and_container_gone
from tests.waiting import wait_for

from kubetune.devcluster import node
from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.demo import PLACEMENT

# The first test's fixtures may load the trainer image (7 GB) into the node's containerd (minutes
# here): beyond pytest's 900 s default.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]
NAMESPACE = "team"
TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
TRAIN_TIMEOUT = 900  # seconds: a few hundred MiniLM steps on a shared two-core machine


@pytest.fixture(scope="module")
def trainer_cluster(real_node: RealNode, real_operator: OperatorProcess) -> Iterator[LocalCluster]:
    """The session's real-node cluster (CRDs, the operator as the chart's ServiceAccount) with
    the trainer image loaded and this module's namespace, where Pod Security "restricted" is
    enforced: the generated pods must pass it to be created."""
    real_node.load("trainer")
    real_node.namespace(NAMESPACE)
    yield real_node.cluster
    real_node.delete_namespace(NAMESPACE)


@pytest.fixture(scope="module")
def claims(trainer_cluster: LocalCluster) -> dict[str, Path]:
    return minilm_claims(trainer_cluster, NAMESPACE)


def finetunejob(name: str, nodes: int, batch_size: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": MODEL},
            "dataset": {"source": DATASET, "validationSplit": 0.2},
            "hyperparameters": {
                "epochs": 1,
                "learningRate": 1e-4,
                "batchSize": batch_size,
                "maxSeqLength": 32,
            },
            # No GPUs: torchrun runs one process per pod, and gloo carries the gradients.
            "resources": {"nodes": nodes, "gpusPerNode": 0, **PLACEMENT},
            "output": {"uri": f"pvc://models/out/{name}"},
            "runPolicy": {"backoffLimit": 0},
        },
    }


def train(cluster: LocalCluster, name: str, nodes: int, batch_size: int) -> dict[str, Any]:
    """Creates the FineTuneJob and waits for it to end; fails with what a person would look at."""
    api = config.new_client_from_config(str(cluster.kubeconfig))
    resources = Resources(api, NAMESPACE)
    resources.create("finetunejobs", finetunejob(name, nodes, batch_size))
    try:
        job = wait_for(
            lambda: (
                (o := resources.get("finetunejobs", name)).get("status", {}).get("phase")
                in ("Succeeded", "Failed")
                and o
            ),
            TRAIN_TIMEOUT,
            f"FineTuneJob {name} to finish",
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnose(cluster, name)}") from err
    assert job["status"]["phase"] == "Succeeded", diagnose(cluster, name)
    return dict(job)


def training_pods(cluster: LocalCluster, name: str) -> list[Any]:
    core = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
    pods = core.list_namespaced_pod(
        NAMESPACE, label_selector=f"batch.kubernetes.io/job-name={name}-train"
    ).items
    return sorted(
        pods,
        key=lambda p: int(p.metadata.annotations["batch.kubernetes.io/job-completion-index"]),
    )


def diagnose(cluster: LocalCluster, name: str) -> str:
    api = config.new_client_from_config(str(cluster.kubeconfig))
    parts = [json.dumps(Resources(api, NAMESPACE).get("finetunejobs", name).get("status"))]
    for item in training_pods(cluster, name):
        parts.append(f"--- pod {item.metadata.name}: {item.status.phase}")
        try:
            parts.append(cluster.kubectl("-n", NAMESPACE, "logs", item.metadata.name)[-4000:])
        except Exception as err:  # the log is a diagnosis: its absence must not hide the failure
            parts.append(f"(no log: {err})")
    return "\n".join(parts)


def events_of(log: str) -> list[dict[str, Any]]:
    """The trainer's events in a pod's log (torchrun and libraries print other lines)."""
    return [e for e in parse_events(log) if "event" in e]


def container_spec(cluster: LocalCluster, pod: Any) -> dict[str, Any]:
    """The OCI runtime spec containerd gave runc for the pod's trainer container."""
    container_id = pod.status.container_statuses[0].container_id.removeprefix("containerd://")
    done = node.ctr(node.NodePaths(cluster.dir / "node"), "containers", "info", container_id)
    assert done.returncode == 0, done.stderr
    spec: dict[str, Any] = json.loads(done.stdout)["Spec"]
    return spec


@pytest.fixture(scope="module")
def one_pod(trainer_cluster: LocalCluster, claims: dict[str, Path]) -> dict[str, Any]:
    """One pod, batch 16: its FineTuneJob, pod, log and runtime spec once it has trained."""
    job = train(trainer_cluster, "single", nodes=1, batch_size=16)
    [pod] = training_pods(trainer_cluster, "single")
    return {
        "job": job,
        "pod": pod,
        "log": trainer_cluster.kubectl("-n", NAMESPACE, "logs", pod.metadata.name),
        "spec": container_spec(trainer_cluster, pod),
    }


def test_the_trainer_image_trains_under_the_generated_security_context(
    trainer_cluster: LocalCluster, claims: dict[str, Path], one_pod: dict[str, Any]
) -> None:
    status = one_pod["job"]["status"]
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] > 0
    assert status["output"]["metrics"]["accuracy"] > 0
    out = claims["models"] / "out" / "single"
    assert (out / "triton-repository").is_dir()
    assert (out / "config.json").is_file() or any(out.rglob("*.safetensors"))

    pod = one_pod["pod"]
    [container] = pod.spec.containers
    assert container.image == TRAINER_IMAGE
    assert container.security_context.read_only_root_filesystem is True
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    # What runc was told: the root file system read-only, uid 1000, no capabilities at all. The
    # trainer wrote only to its volumes (scratch: TMPDIR, HF_HOME; the output claim).
    spec = one_pod["spec"]
    assert spec["root"]["readonly"] is True
    assert spec["process"]["user"]["uid"] == 1000
    assert spec["process"]["user"]["gid"] == 1000
    assert spec["process"]["noNewPrivileges"] is True
    capabilities = spec["process"].get("capabilities") or {}
    assert not any(capabilities.get(kind) for kind in ("bounding", "effective", "permitted"))


def test_kubectl_logs_of_the_training_pod_shows_the_trainers_json_lines(
    one_pod: dict[str, Any],
) -> None:
    kinds = [e["event"] for e in events_of(one_pod["log"])]
    assert "started" in kinds and "finished" in kinds, one_pod["log"][-3000:]
    [started] = [e for e in events_of(one_pod["log"]) if e["event"] == "started"]
    assert started["worldSize"] == 1 and started["device"] == "cpu"


def test_the_deleted_jobs_containers_are_gone(
    trainer_cluster: LocalCluster, one_pod: dict[str, Any]
) -> None:
    """Deleting the FineTuneJob deletes its Job and pod (owner references); the kubelet then
    removes the pod's containers from containerd."""
    paths = node.NodePaths(trainer_cluster.dir / "node")
    container_id = one_pod["pod"].status.container_statuses[0].container_id.split("//")[1]
    assert container_id in node.ctr(paths, "containers", "list", "-q").stdout.split()
    api = config.new_client_from_config(str(trainer_cluster.kubeconfig))
    Resources(api, NAMESPACE).delete("finetunejobs", "single")
    wait_pod_and_container_gone(
        trainer_cluster,
        client.CoreV1Api(api),
        NAMESPACE,
        one_pod["pod"].metadata.name,
        container_id,
    )


def test_two_pods_rendezvous_through_the_headless_service_and_train_together(
    trainer_cluster: LocalCluster, claims: dict[str, Path], one_pod: dict[str, Any]
) -> None:
    """`nodes: 2`, batch 8 per pod: the same global batch as one pod of batch 16, so the same
    number of steps. Rank 1 reaches rank 0 by `<job>-0.<service>.<namespace>.svc` (CoreDNS,
    the headless Service), over the bridge between the two pods' network namespaces."""
    job = train(trainer_cluster, "pair", nodes=2, batch_size=8)
    progress = job["status"]["progress"]
    alone = one_pod["job"]["status"]["progress"]
    assert progress["step"] == progress["totalSteps"] == alone["totalSteps"]
    assert (claims["models"] / "out" / "pair" / "triton-repository").is_dir()

    pods = training_pods(trainer_cluster, "pair")
    assert [p.status.phase for p in pods] == ["Succeeded", "Succeeded"]
    assert len({p.status.pod_ip for p in pods}) == 2  # each in its own network namespace
    master = {e.name: e.value for e in pods[1].spec.containers[0].env}["PET_MASTER_ADDR"]
    assert master == f"pair-train-0.pair-workers.{NAMESPACE}.svc"
    for rank, item in enumerate(pods):
        log = trainer_cluster.kubectl("-n", NAMESPACE, "logs", item.metadata.name)
        [started] = [e for e in events_of(log) if e["event"] == "started"]
        assert (started["rank"], started["worldSize"]) == (rank, 2), log[-3000:]
        assert started["globalBatch"] == 16
        assert started["totalSteps"] == alone["totalSteps"]
