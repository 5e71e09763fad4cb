"""The local control plane is real: scheduler, controllers, garbage collector, admission, CRDs."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.binaries import kubectl_path
from kubetune.devcluster.cluster import OUTCOME_ANNOTATION, LocalCluster
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

PAUSE = "registry.k8s.io/pause:3.10"


def _gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": PAUSE,
                    "resources": {
                        "requests": {"nvidia.com/gpu": str(gpus)},
                        "limits": {"nvidia.com/gpu": str(gpus)},
                    },
                }
            ],
        },
    }


def test_kubectl_lists_gpu_nodes_with_capacity(cluster: LocalCluster) -> None:
    out = subprocess.run(
        [
            str(kubectl_path()),
            f"--kubeconfig={cluster.kubeconfig}",
            "get",
            "nodes",
            "-o",
            "custom-columns=NAME:.metadata.name,GPU:.status.capacity.nvidia\\.com/gpu",
            "--no-headers",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = dict(line.split() for line in out.strip().splitlines())
    assert rows == {
        "gpu-node-0": "8",
        "gpu-node-1": "8",
        "gpu-node-2": "8",
        "gpu-node-3": "8",
        "cpu-node-0": "<none>",
    }


def test_gpu_job_is_scheduled_on_a_gpu_node_and_completes(
    api_client: client.ApiClient, namespace: str
) -> None:
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    template = _gpu_pod("unused", 2)
    template["metadata"] = {"annotations": {OUTCOME_ANNOTATION: "succeed"}}
    batch.create_namespaced_job(
        namespace,
        {"metadata": {"name": "gpu-job"}, "spec": {"backoffLimit": 0, "template": template}},
    )

    def done() -> Any:
        job = batch.read_namespaced_job_status("gpu-job", namespace)
        return job.status.succeeded

    wait_for(done, what="the GPU job to succeed")
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=gpu-job").items
    assert len(pods) == 1
    assert pods[0].spec.node_name in {f"gpu-node-{i}" for i in range(4)}
    assert pods[0].status.phase == "Succeeded"


def test_failing_pod_outcome_is_reported_with_exit_code(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    pod = _gpu_pod("fails", 1)
    pod["metadata"]["annotations"] = {
        OUTCOME_ANNOTATION: "fail",
        "devcluster.kubetune.io/exit-code": "137",
        "devcluster.kubetune.io/termination-message": "OutOfMemory: CUDA out of memory",
    }
    core.create_namespaced_pod(namespace, pod)
    phase = wait_for(
        lambda: (p := core.read_namespaced_pod("fails", namespace)).status.phase == "Failed" and p,
        what="the pod to fail",
    )
    terminated = phase.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 137
    assert terminated.message == "OutOfMemory: CUDA out of memory"


def test_pod_asking_for_more_gpus_than_any_node_stays_pending(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, _gpu_pod("too-big", 16))

    def unschedulable() -> Any:
        pod = core.read_namespaced_pod("too-big", namespace)
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.reason == "Unschedulable":
                return cond
        return None

    cond = wait_for(unschedulable, what="the scheduler to refuse the pod")
    assert "Insufficient nvidia.com/gpu" in cond.message
    assert core.read_namespaced_pod("too-big", namespace).status.phase == "Pending"


def test_deployment_gets_replicaset_and_running_pods(
    api_client: client.ApiClient, namespace: str
) -> None:
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": PAUSE}]},
                },
            },
        },
    )
    wait_for(
        lambda: apps.read_namespaced_deployment_status("web", namespace).status.ready_replicas == 2,
        what="2 ready replicas",
    )
    assert len(apps.list_namespaced_replica_set(namespace).items) == 1
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert [p.status.phase for p in pods] == ["Running", "Running"]


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "dependent", "ownerReferences": [ref]}}
    )
    core.delete_namespaced_config_map("owner", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(gone, what="the garbage collector to delete the dependent")


def test_restricted_namespace_rejects_privileged_and_admits_compliant_pods(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    privileged = {
        "metadata": {"name": "privileged"},
        "spec": {
            "containers": [{"name": "c", "image": PAUSE, "securityContext": {"privileged": True}}]
        },
    }
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(namespace, privileged)
    assert err.value.status == 403
    message = json.loads(err.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest": privileged' in message

    compliant = {
        "metadata": {"name": "compliant"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "c",
                    "image": PAUSE,
                    "securityContext": {
                        "runAsUser": 1000,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    created = core.create_namespaced_pod(namespace, compliant)
    assert created.metadata.name == "compliant"


def test_crd_is_served_and_its_schema_rejects_bad_objects(
    api_client: client.ApiClient, namespace: str
) -> None:
    ext = client.ApiextensionsV1Api(api_client)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.test"},
        "spec": {
            "group": "example.test",
            "scope": "Namespaced",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as err:
        if err.status != 409:
            raise
    custom = client.CustomObjectsApi(api_client)

    def create(size: int) -> Any:
        body = {"apiVersion": "example.test/v1", "kind": "Widget", "metadata": {"name": f"w{size}"}}
        body["spec"] = {"size": size}
        return custom.create_namespaced_custom_object(
            "example.test", "v1", namespace, "widgets", body
        )

    wait_for(lambda: _served(create, 1), what="the CRD to be served")
    with pytest.raises(ApiException) as err:
        create(0)
    assert err.value.status == 422
    assert (
        "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
        in (err.value.body)
    )


def _served(create: Any, size: int) -> bool:
    try:
        create(size)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True
