"""The readiness gate against the real API server and a real Triton: the operator's open_gates
smoke-tests each loaded pod of a revision on the pod's own IP and writes the
kubetune.io/smoke-test-passed condition through pods/status.

The pods are real API objects that no node runs (their scheduler does not exist): the test plays
the kubelet's part and reports them running with loopback IPs and ready containers, which is
where a real Triton (the nvidia-pytriton wheel's, on this machine) answers — one good causal LM
and one whose NaN weights decode to nothing. That the kubelet then keeps a pod with a False gate
out of Ready is Kubernetes' own behaviour (pod readiness gates, KEP-580)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from kubetune.api.v1alpha1.modelserver import SMOKE_TEST_CONDITION, ModelServer
from kubetune.builders import serving
from kubetune.builders.common import Owner, Settings, selector_labels
from kubetune.builders.serving import ResolvedModel
from kubetune.devcluster.cluster import LocalCluster
from kubetune.handlers.common import Context
from kubetune.handlers.modelserver import _start_failure, open_gates
from kubetune.kube import Kube
from kubetune.serving.local import TritonServer, running_triton
from kubetune.serving.repository import write_model_repository
from tests.e2e.llm_models import write_tiny_llama

pytestmark = pytest.mark.cluster
GOOD, BROKEN = "gate-good", "gate-broken"
REVISION = "source-gate"


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("gate")
    repo = work / "repository"
    write_model_repository(write_tiny_llama(work / "good"), repo, GOOD, "causal-lm")
    broken = write_tiny_llama(work / "broken", broken=True)
    write_model_repository(broken, repo, BROKEN, "causal-lm")
    with running_triton(repo, log_path=work / "tritonserver.log") as server:
        yield server


def server(name: str, namespace: str, port: int) -> tuple[ModelServer, Owner]:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "spec": {
            "model": {"source": "pvc://models/x", "name": name},
            "service": {"httpPort": port},
        },
    }
    return ModelServer.model_validate(body), Owner.from_body(body)


def loaded_pod(core: client.CoreV1Api, owner: Owner, name: str, gated: bool = True) -> None:
    """A pod of the revision, reported as the kubelet reports one whose model has loaded."""
    spec: dict[str, Any] = {
        "schedulerName": "kubetune-test-nobody",  # never scheduled: no node runs it
        "containers": [{"name": "triton", "image": "example.test/triton:1"}],
    }
    if gated:
        spec["readinessGates"] = [{"conditionType": SMOKE_TEST_CONDITION}]
    core.create_namespaced_pod(
        owner.namespace,
        {
            "metadata": {
                "name": name,
                "labels": selector_labels(owner),
                "annotations": {serving.REVISION_ANNOTATION: REVISION},
            },
            "spec": spec,
        },
    )
    core.patch_namespaced_pod_status(
        name,
        owner.namespace,
        {
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "conditions": [
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "False"},
                ],
            }
        },
    )


def conditions(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, Any]:
    pod = core.read_namespaced_pod_status(name, namespace)
    return {c.type: c for c in pod.status.conditions or []}


def test_the_gate_opens_for_a_good_model_and_stays_closed_for_a_broken_one(
    cluster: LocalCluster, api_client: client.ApiClient, namespace: str, triton: TritonServer
) -> None:
    core = client.CoreV1Api(api_client)
    ctx = Context(kube=Kube.from_environment(str(cluster.kubeconfig)), settings=Settings())
    model = ResolvedModel(uri="pvc://models/x", revision=REVISION, task="causal-lm")
    port = triton.http_port

    good, good_owner = server(GOOD, namespace, port)
    loaded_pod(core, good_owner, "good-0")
    open_gates(ctx, good, good_owner, model)
    opened = conditions(core, namespace, "good-0")
    assert opened[SMOKE_TEST_CONDITION].status == "True"
    assert opened[SMOKE_TEST_CONDITION].reason == "SmokeTestPassed"
    assert opened["ContainersReady"].status == "True"  # the kubelet's conditions stay
    assert _start_failure(ctx, {}, good_owner, model, rolled_out=True) is None

    broken, broken_owner = server(BROKEN, namespace, port)
    loaded_pod(core, broken_owner, "broken-0")
    open_gates(ctx, broken, broken_owner, model)
    closed = conditions(core, namespace, "broken-0")
    assert closed[SMOKE_TEST_CONDITION].status == "False"
    assert "generated nothing" in closed[SMOKE_TEST_CONDITION].message
    # All pods of the revision exist (rolled out, as with the replace strategy) and none is
    # ready: the closed gate fails the revision, which is not the served one.
    failure = _start_failure(ctx, {}, broken_owner, model, rolled_out=True)
    assert failure is not None and failure[0] == "SmokeTestFailed"
    assert "broken-0" in failure[1]
    # Once a revision passed, one pod with a closed gate only stays out of the Service.
    served = {"status": {"served": {"revision": REVISION}}}
    assert _start_failure(ctx, served, broken_owner, model, rolled_out=True) is None

    # The same answer is not written again: no status churn on every pod event.
    version = core.read_namespaced_pod_status("broken-0", namespace).metadata.resource_version
    open_gates(ctx, broken, broken_owner, model)
    again = core.read_namespaced_pod_status("broken-0", namespace).metadata.resource_version
    assert again == version


def test_pods_without_the_gate_or_still_loading_are_left_alone(
    cluster: LocalCluster, api_client: client.ApiClient, namespace: str, triton: TritonServer
) -> None:
    core = client.CoreV1Api(api_client)
    ctx = Context(kube=Kube.from_environment(str(cluster.kubeconfig)), settings=Settings())
    model = ResolvedModel(uri="pvc://models/x", revision=REVISION, task="causal-lm")
    good, owner = server(GOOD, namespace, triton.http_port)
    loaded_pod(core, owner, "old-0", gated=False)  # from a Deployment before the gate
    open_gates(ctx, good, owner, model)
    assert SMOKE_TEST_CONDITION not in conditions(core, namespace, "old-0")
    off = Context(kube=ctx.kube, settings=Settings(smoke_test_gate=False))
    loaded_pod(core, owner, "gated-0")
    open_gates(off, good, owner, model)
    assert SMOKE_TEST_CONDITION not in conditions(core, namespace, "gated-0")
