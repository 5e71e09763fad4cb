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
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from tests.cluster_fixtures import OperatorProcess, RealNode, Resources
from tests.e2e.conftest import parse_events
from tests.real_node import DATASET, MODEL, minilm_claims, wait_pod_and_container_gone
from tests.waiting import wait_for

from kubetune.devcluster import node
from kubetune.devcluster.binaries import kubectl_path
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


def finetunejob(
    name: str, nodes: int, batch_size: int, epochs: int = 1, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": MODEL},
            "dataset": {"source": DATASET, "validationSplit": 0.2},
            "hyperparameters": {
                "epochs": epochs,
                "learningRate": 1e-4,
                "batchSize": batch_size,
                "maxSeqLength": 32,
            },
            # No GPUs: torchrun runs one process per pod, and gloo carries the gradients.
            "resources": {"nodes": nodes, "gpusPerNode": 0, **PLACEMENT},
            "output": {"uri": f"pvc://models/out/{name}"},
            "runPolicy": {"backoffLimit": 0},
            **spec,
        },
    }


def train(cluster: LocalCluster, name: str, nodes: int, batch_size: int) -> dict[str, Any]:
    """Creates the FineTuneJob and waits for it to end; fails with what a person would look at."""
    api = config.new_client_from_config(str(cluster.kubeconfig))
    resources = Resources(api, NAMESPACE)
    resources.create("finetunejobs", finetunejob(name, nodes, batch_size))
    return succeeded(cluster, resources, name)


def succeeded(cluster: LocalCluster, resources: Resources, name: str) -> dict[str, Any]:
    """The FineTuneJob once it has ended, which must be Succeeded."""
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


# ---------------------------------------------------------------------------- faults

CHECKPOINT_EVERY = 8  # optimizer steps between periodic checkpoints


class FollowedLog:
    """A training pod's log as the container writes it (`kubectl logs -f`): the trainer's
    events, each with the monotonic time it arrived. The stream ends when the container does."""

    def __init__(self, cluster: LocalCluster, pod: str) -> None:
        self.pod = pod
        self.proc = subprocess.Popen(
            [
                str(kubectl_path()),
                f"--kubeconfig={cluster.kubeconfig}",
                "-n",
                NAMESPACE,
                "logs",
                "--follow",
                pod,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.tail: list[str] = []

    def until(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Reads on to the first event `wanted` accepts; fails with the log if the stream ends."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail = [*self.tail[-40:], line]
            for event in events_of(line):
                self.events.append((time.monotonic(), event))
                if wanted(event):
                    return event
        raise AssertionError(f"pod {self.pod}'s log ended first:\n{''.join(self.tail)}")

    def to_end(self) -> list[dict[str, Any]]:
        """Every event, once the container has ended."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.extend((time.monotonic(), e) for e in events_of(line))
        self.proc.wait()
        return [e for _, e in self.events]

    def first(self, kind: str) -> tuple[float, dict[str, Any]]:
        return next((t, e) for t, e in self.events if e["event"] == kind)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e["event"] == kind]


def next_running_pod(cluster: LocalCluster, name: str, seen: set[str]) -> Any:
    """The Job's pod that is not one of `seen`, once its container runs."""
    return wait_for(
        lambda: next(
            (
                p
                for p in training_pods(cluster, name)
                if p.metadata.name not in seen and p.status.phase == "Running"
            ),
            None,
        ),
        TRAIN_TIMEOUT,
        f"a new running pod of {name} (not {sorted(seen)})",
    )


def test_a_killed_then_evicted_training_pod_resumes_in_the_same_job_from_its_checkpoint(
    trainer_cluster: LocalCluster, claims: dict[str, Path]
) -> None:
    """The two ways production loses a training pod, one after the other, in one FineTuneJob
    with backoffLimit 1:

    1. the trainer's process dies at once (`kill -9` of the container's main process through
       the node's containerd, as an OOM kill or a crash does): a failure, which the Job counts
       and retries; the new pod resumes from the last periodic checkpoint, so at most one
       checkpoint interval of steps is trained again;
    2. the pod is evicted (the Eviction API, what `kubectl drain` and node-pressure eviction
       use): the API server marks it DisruptionTarget, the kubelet sends SIGTERM, the trainer
       checkpoints the step it is on, and the podFailurePolicy does not count it: had it
       counted, the Job would have exceeded backoffLimit 1 and failed.

    Both replacements are pods of the same Job (the operator never recreates it), and the run
    ends with the step count of an uninterrupted run."""
    name = "resume"
    api = config.new_client_from_config(str(trainer_cluster.kubeconfig))
    resources = Resources(api, NAMESPACE)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    spec = finetunejob(name, nodes=1, batch_size=8)
    spec["spec"]["checkpointing"] = {"everySteps": CHECKPOINT_EVERY, "keepLast": 2}
    spec["spec"]["runPolicy"] = {"backoffLimit": 1}
    resources.create("finetunejobs", spec)
    job_uid = wait_for(
        lambda: next(
            (
                j.metadata.uid
                for j in batch.list_namespaced_job(NAMESPACE).items
                if j.metadata.name == f"{name}-train"
            ),
            None,
        ),
        what="the training Job",
    )
    paths = node.NodePaths(trainer_cluster.dir / "node")
    checkpoints = claims["models"] / "out" / name / "checkpoints"
    try:
        # 1. kill -9 once a periodic checkpoint is on disk and training has moved past it.
        first = next_running_pod(trainer_cluster, name, set())
        log1 = FollowedLog(trainer_cluster, first.metadata.name)
        started = log1.until(lambda e: e["event"] == "started")
        total = started["totalSteps"]
        assert total == math.ceil(started["trainExamples"] / 8) > 3 * CHECKPOINT_EVERY
        saved = log1.until(lambda e: e["event"] == "checkpoint")["step"]
        assert saved == CHECKPOINT_EVERY
        assert (checkpoints / f"step-{saved:08d}" / "checkpoint.json").is_file()
        log1.until(
            lambda e: e["event"] == "progress" and e["step"] >= saved + CHECKPOINT_EVERY // 2
        )
        container = first.status.container_statuses[0].container_id.removeprefix("containerd://")
        done = node.ctr(paths, "tasks", "kill", "--signal", "SIGKILL", container)
        killed_at = time.monotonic()
        assert done.returncode == 0, done.stderr
        log1.to_end()
        steps_at_kill = max(e["step"] for e in log1.of("progress"))
        assert not log1.of("preempted")  # no chance to checkpoint: SIGKILL
        # The newest complete checkpoint on the claim (one being written when the kill came
        # is a temp folder: never a step-N folder with its checkpoint.json).
        last_saved = max(
            int(p.name.removeprefix("step-"))
            for p in checkpoints.glob("step-*")
            if (p / "checkpoint.json").is_file()
        )
        assert last_saved >= max(e["step"] for e in log1.of("checkpoint"))
        dead = wait_for(
            lambda: (
                (p := core.read_namespaced_pod(first.metadata.name, NAMESPACE)).status.phase
                == "Failed"
                and p
            ),
            120,
            "the killed pod to be Failed",
        )
        assert dead.status.container_statuses[0].state.terminated.exit_code == 137

        # The same Job starts a new pod, which resumes from that checkpoint.
        second = next_running_pod(trainer_cluster, name, {first.metadata.name})
        log2 = FollowedLog(trainer_cluster, second.metadata.name)
        resumed = log2.until(lambda e: e["event"] == "resumed")
        first_step = log2.until(lambda e: e["event"] == "progress")["step"]
        resume_seconds = log2.first("progress")[0] - killed_at
        assert resumed["step"] == last_saved
        assert first_step == last_saved + 1
        assert steps_at_kill - last_saved <= CHECKPOINT_EVERY  # at most one interval lost
        # The status counts the retry and names the kill (not the log line it ended on).
        retrying = wait_for(
            lambda: (
                "retry 1 of 1"
                in (m := resources.condition("finetunejobs", name, "Ready") or {}).get(
                    "message", ""
                )
                and m
            ),
            what="the status to count the retry",
        )
        assert "the trainer was killed by SIGKILL (exit code 137)" in retrying["message"]
        print(
            f"kill -9 at step {steps_at_kill}/{total} (checkpoint {last_saved}); the new pod "
            f"trained step {first_step} {resume_seconds:.0f}s after the kill"
        )

        # 2. Evict the new pod mid-run: SIGTERM, a checkpoint of the step it is on, a pod the
        # Job does not count as failed.
        log2.until(lambda e: e["event"] == "progress" and e["step"] >= last_saved + 4)
        core.create_namespaced_pod_eviction(
            second.metadata.name,
            NAMESPACE,
            client.V1Eviction(
                metadata=client.V1ObjectMeta(name=second.metadata.name, namespace=NAMESPACE)
            ),
        )
        evicted_at = time.monotonic()
        evicted = core.read_namespaced_pod(second.metadata.name, NAMESPACE)
        assert any(
            c.type == "DisruptionTarget" and c.status == "True"
            for c in evicted.status.conditions or []
        ), evicted.status.conditions
        log2.to_end()
        [preempted] = log2.of("preempted")
        stopped_at = log2.of("checkpoint")[-1]["step"]
        assert f"step {stopped_at}/{total}" in preempted["message"]
        evicted_steps = max(e["step"] for e in log2.of("progress"))
        assert stopped_at == evicted_steps  # nothing lost

        third = next_running_pod(trainer_cluster, name, {first.metadata.name, second.metadata.name})
        log3 = FollowedLog(trainer_cluster, third.metadata.name)
        assert log3.until(lambda e: e["event"] == "resumed")["step"] == stopped_at
        log3.to_end()
        evict_resume_seconds = log3.first("progress")[0] - evicted_at
        print(
            f"evicted at step {stopped_at}/{total} (SIGTERM checkpoint); the next pod trained "
            f"step {stopped_at + 1} {evict_resume_seconds:.0f}s after the eviction"
        )
        assert [e["step"] for e in log3.of("progress")] == list(range(stopped_at + 1, total + 1))
        [finished] = log3.of("finished")
        assert finished["step"] == finished["totalSteps"] == total
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnose(trainer_cluster, name)}") from err
    ftj = succeeded(trainer_cluster, resources, name)
    assert ftj["status"]["progress"]["step"] == ftj["status"]["progress"]["totalSteps"] == total
    job = batch.read_namespaced_job(f"{name}-train", NAMESPACE)
    assert job.metadata.uid == job_uid  # the same Job ran all three pods
    assert job.status.failed == 1  # the kill counted; the eviction did not
    assert job.status.succeeded == 1
    assert ftj["status"]["failed"] == 1
    # The killed pod is kept (Failed); the evicted one was deleted by its eviction.
    names = {p.metadata.name for p in training_pods(trainer_cluster, name)}
    assert names == {first.metadata.name, third.metadata.name}
    assert (claims["models"] / "out" / name / "triton-repository").is_dir()
    resources.delete("finetunejobs", name)


def test_active_deadline_seconds_fails_the_run_on_the_real_node(
    trainer_cluster: LocalCluster, claims: dict[str, Path]
) -> None:
    """runPolicy.activeDeadlineSeconds: the Job controller ends a training container that runs
    past it (the kubelet stops it), and the FineTuneJob fails with the Job's reason, not with
    the trainer's reaction to being stopped."""
    name = "deadline"
    api = config.new_client_from_config(str(trainer_cluster.kubeconfig))
    resources = Resources(api, NAMESPACE)
    spec = finetunejob(name, nodes=1, batch_size=8, epochs=50)  # far more than the deadline
    spec["spec"]["runPolicy"] = {"backoffLimit": 2, "activeDeadlineSeconds": 40}
    resources.create("finetunejobs", spec)
    try:
        pod = next_running_pod(trainer_cluster, name, set())
        ftj = resources.wait_phase("finetunejobs", name, "Failed", timeout=TRAIN_TIMEOUT)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnose(trainer_cluster, name)}") from err
    status = ftj["status"]
    assert status["failureReason"] == "DeadlineExceeded", status
    # The container really ran and was stopped; no retry followed the deadline.
    container = pod.status.container_statuses[0].container_id.removeprefix("containerd://")
    wait_pod_and_container_gone(
        trainer_cluster, client.CoreV1Api(api), NAMESPACE, pod.metadata.name, container
    )
    assert training_pods(trainer_cluster, name) == []
    # FailureTarget first, Failed once its pods have ended.
    batch = client.BatchV1Api(api)
    reasons = wait_for(
        lambda: (
            (
                r := {
                    c.type: c.reason
                    for c in batch.read_namespaced_job(f"{name}-train", NAMESPACE).status.conditions
                    or []
                    if c.status == "True"
                }
            ).get("Failed")
            and r
        ),
        what="the Job's Failed condition",
    )
    assert reasons["Failed"] == "DeadlineExceeded", reasons
    # And it keeps the reason once the stopped pod is gone.
    assert resources.get("finetunejobs", name)["status"]["failureReason"] == "DeadlineExceeded"
    resources.delete("finetunejobs", name)
