"""The ModelServer's pods as the operator generates them (builders.serving), on the real node, in
kubetune's local Triton image (images/triton/local.Dockerfile: the nvidia-pytriton wheel's
tritonserver on the ML base): the fetch init container (`python -m kubetune.serving.fetch`)
writes the Triton model repository from a claim, Triton loads kubetune's python-backend model and
answers, the kubelet runs the generated startup, readiness and liveness probes under the
generated securityContext (uid 1000, read-only root), and each replica has its own pod IP.

The smoke-test readiness gate is opened here by the operator's own code (serving.gate: the smoke
test of that pod's IP, then the verdict's status patch), as the operator does. The cluster is the
session's real-node cluster; the operator running there leaves these pods alone (no ModelServer
owns them).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client, config
from tests.cluster_fixtures import RealNode
from tests.real_node import bound_claims
from tests.waiting import wait_for

from kubetune.api.v1alpha1.modelserver import ModelServer, SmokeTestSpec
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import ResolvedModel, build_deployment
from kubetune.devcluster import node
from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.demo import PLACEMENT, minilm_checkpoint
from kubetune.serving.gate import gate_verdict, smoke_test_pod
from kubetune.serving.smoketest import smoke_test

pytestmark = pytest.mark.cluster
PORT = 8000
# Triton imports torch and transformers from a read-only root on a busy machine.
START_TIMEOUT = 600


@pytest.fixture(scope="module")
def served(real_node: RealNode) -> LocalCluster:
    """The session's real-node cluster with kubetune's local Triton image loaded."""
    real_node.load("triton")
    return real_node.cluster


def deployment(
    cluster: LocalCluster, ns: str, name: str, replicas: int, source: str, gate: bool = False
) -> Any:
    """The generated Deployment of a ModelServer serving `source`, applied as the operator
    would (its default images: the real node has the Triton image under that name)."""
    api = config.new_client_from_config(str(cluster.kubeconfig))
    ms = ModelServer.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "model": {"source": source},
                "replicas": replicas,
                "resources": {"gpus": 0, **PLACEMENT},
                "service": {"httpPort": PORT},
            },
        }
    )
    owner = Owner("kubetune.io/v1alpha1", "ModelServer", name, ns, "0" * 8)
    model = ResolvedModel(uri=source, revision="r1")
    manifest = build_deployment(ms, owner, model, Settings(smoke_test_gate=gate), spare_gpus=0)
    manifest["metadata"].pop("ownerReferences", None)  # no ModelServer object exists here
    return client.AppsV1Api(api).create_namespaced_deployment(ns, manifest)


def is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def server_pod(
    core: client.CoreV1Api, ns: str, test: Callable[[Any], Any], timeout: float, what: str
) -> Any:
    """The (only) server pod, once `test` holds for its Triton container's status."""

    def probe() -> Any:
        pods = core.list_namespaced_pod(ns).items
        statuses = pods[0].status.container_statuses if pods else None
        return pods[0] if statuses and test(statuses[0]) else None

    return wait_for(probe, timeout=timeout, what=what)


def pod_logs(cluster: LocalCluster, ns: str) -> str:
    try:
        return cluster.kubectl("-n", ns, "logs", "--all-containers", "--tail=40", "-l", "app")
    except Exception as err:  # a diagnostic only
        return str(err)


@pytest.fixture
def ns(served: LocalCluster, real_node: RealNode) -> Iterator[str]:
    name = real_node.namespace(f"serve-{os.urandom(3).hex()}")
    folder = bound_claims(served, name)["models"]
    shutil.copytree(minilm_checkpoint(), folder / "minilm")
    # A checkpoint whose weights are not a safetensors file: the model cannot load.
    shutil.copytree(minilm_checkpoint(), folder / "broken")
    for weights in (folder / "broken").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    yield name
    real_node.delete_namespace(name)


def test_two_replicas_answer_on_their_own_pod_ips_and_through_port_forward(
    served: LocalCluster, ns: str
) -> None:
    core = client.CoreV1Api(config.new_client_from_config(str(served.kubeconfig)))
    deployment(served, ns, "intents", replicas=2, source="pvc://models/minilm")

    def ready_pods() -> list[Any]:
        ready = [p for p in core.list_namespaced_pod(ns).items if is_ready(p)]
        return ready if len(ready) == 2 else []

    try:
        pods = wait_for(ready_pods, timeout=START_TIMEOUT, what="two Ready replicas")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{pod_logs(served, ns)}") from err
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 2
    for ip in ips:  # the host reaches pod IPs on the cluster's bridge; both listen on 8000
        result = smoke_test(f"{ip}:{PORT}", "intents", "where is my parcel")
        assert result.ok, result.message
        assert result.label
    # kubectl port-forward, served by the real kubelet (through containerd's stream server).
    with served.port_forward(f"pod/{pods[0].metadata.name}", PORT, ns) as local:
        result = smoke_test(f"127.0.0.1:{local}", "intents", "I was charged twice")
    assert result.ok, result.message


def test_a_gated_pod_is_ready_only_once_its_smoke_test_opened_the_gate(
    served: LocalCluster, ns: str
) -> None:
    api = config.new_client_from_config(str(served.kubeconfig))
    core = client.CoreV1Api(api)
    deployment(served, ns, "gated", replicas=1, source="pvc://models/minilm", gate=True)
    # Triton's own readiness (the model loaded): the container is ready...
    pod = server_pod(core, ns, lambda c: c.ready, START_TIMEOUT, "Triton's readiness probe")
    # ...but the pod is not, while the smoke-test condition is missing.
    pod = core.read_namespaced_pod(pod.metadata.name, ns)
    assert not is_ready(pod)
    raw = api.sanitize_for_serialization(pod)
    result = smoke_test_pod(raw, "gated", SmokeTestSpec(), PORT)
    assert result.ok, result.message
    verdict = gate_verdict(raw, result)
    assert verdict is not None
    core.patch_namespaced_pod_status(pod.metadata.name, ns, verdict.patch(datetime.now(UTC)))
    wait_for(
        lambda: is_ready(core.read_namespaced_pod(pod.metadata.name, ns)),
        timeout=60,
        what="the kubelet to report the pod Ready once the gate is open",
    )


def test_a_server_whose_model_cannot_load_never_becomes_ready(
    served: LocalCluster, ns: str
) -> None:
    core = client.CoreV1Api(config.new_client_from_config(str(served.kubeconfig)))
    deployment(served, ns, "broken", replicas=1, source="pvc://models/broken")
    # Triton fails to load the model and exits (exit-on-error); the kubelet restarts it.
    pod = server_pod(
        core, ns, lambda c: c.last_state.terminated, START_TIMEOUT, "Triton to exit once"
    )
    [status] = pod.status.container_statuses
    assert not status.ready and not is_ready(pod)
    assert status.last_state.terminated.exit_code != 0
    # FallbackToLogsOnError: the termination message is the end of Triton's log (the kubelet
    # keeps its last 2 KB: Triton's closing tables leave room for its last line only)...
    message = status.last_state.terminated.message or ""
    assert "failed to load all models" in message, message
    # ...and the previous run's log says which model and why.
    log = core.read_namespaced_pod_log(pod.metadata.name, ns, container="triton", previous=True)
    reasons = [line for line in log.splitlines() if "failed to load" in line and "broken" in line]
    assert reasons, log[-3000:]


def container_pids(cluster: LocalCluster, container_id: str) -> list[int]:
    """The processes of one container, from its cgroup under the cluster's own cgroup tree."""
    root = node.CGROUP_ROOT / "pids" / node.cgroup_name(cluster.name)
    [folder] = [p for p in root.rglob(container_id) if p.is_dir()]
    return [int(pid) for pid in (folder / "cgroup.procs").read_text().split()]


def test_a_hung_server_fails_its_liveness_probe_and_is_restarted(
    served: LocalCluster, ns: str
) -> None:
    """The fault: Triton stops answering (SIGSTOP to its processes, from the host), as a
    deadlocked server would. A real fault on demand, not a stand-in."""
    core = client.CoreV1Api(config.new_client_from_config(str(served.kubeconfig)))
    deployment(served, ns, "hung", replicas=1, source="pvc://models/minilm")
    pod = server_pod(core, ns, lambda c: c.ready, START_TIMEOUT, "Triton to be ready")
    [status] = pod.status.container_statuses
    assert status.restart_count == 0
    for pid in container_pids(served, status.container_id.split("://")[1]):
        os.kill(pid, signal.SIGSTOP)
    # Six failed liveness probes 10 s apart, then the kubelet kills it and starts it again.
    restarted = server_pod(
        core, ns, lambda c: c.restart_count >= 1, 600, "the kubelet to restart the server"
    )
    events = core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={restarted.metadata.name}"
    ).items
    assert any("Liveness probe failed" in (e.message or "") for e in events)
    server_pod(core, ns, lambda c: c.ready, START_TIMEOUT, "the restarted Triton to be ready")
