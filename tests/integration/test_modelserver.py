"""ModelServers become Triton Deployments that follow their FineTuneJob, on a real cluster."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.binaries import kubectl_path
from kubetune.devcluster.cluster import OUTCOME_ANNOTATION, LocalCluster
from tests.cluster_fixtures import Resources
from tests.integration.test_finetunejob import _finish_pods, _read, finetunejob
from tests.tools.health import assert_health
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
MS = "modelservers"


def modelserver(name: str, **spec: Any) -> dict[str, Any]:
    """kwok's pods run no Triton: the smoke test is off unless a test is about it."""
    base: dict[str, Any] = {
        "model": {"source": "pvc://models/repo"},
        "resources": {"gpus": 1},
        "rollout": {"smokeTest": {"enabled": False}},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": name},
        "spec": base,
    }


def test_serves_a_source_with_probes_shm_and_a_ready_status(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(MS, modelserver("plain", replicas=2))
    obj = resources.wait_phase(MS, "plain", "Ready")
    status = obj["status"]
    assert (status["readyReplicas"], status["readyText"]) == (2, "2/2")
    assert status["endpoints"]["http"] == f"plain.{namespace}.svc:8000"
    apps = client.AppsV1Api(api_client)
    deploy = apps.read_namespaced_deployment("plain", namespace)
    pod = deploy.spec.template.spec
    triton = pod.containers[0]
    assert triton.readiness_probe.http_get.path == "/v2/health/ready"
    assert triton.liveness_probe.http_get.path == "/v2/health/live"
    assert triton.startup_probe.failure_threshold * triton.startup_probe.period_seconds >= 600
    assert "--model-control-mode=none" in triton.args
    assert triton.resources.limits["nvidia.com/gpu"] == "1"
    assert any(v.name == "dshm" and v.empty_dir.medium == "Memory" for v in pod.volumes)
    assert pod.init_containers[0].name == "fetch-model"
    assert pod.security_context.run_as_non_root is True
    pdb = client.PolicyV1Api(api_client).read_namespaced_pod_disruption_budget("plain", namespace)
    assert pdb.spec.max_unavailable == 1
    # The scale subresource: `kubectl scale` works on the ModelServer itself.
    resources.patch(MS, "plain", {"spec": {"replicas": 1}})
    wait_for(
        lambda: apps.read_namespaced_deployment("plain", namespace).spec.replicas == 1,
        what="scale down",
    )
    wait_for(
        lambda: (
            _read(
                client.PolicyV1Api(api_client).read_namespaced_pod_disruption_budget,
                "plain",
                namespace,
            )
            is None
        ),
        what="the PDB to go when one replica is left",
    )


def test_kubectl_scale_uses_the_scale_subresource(
    resources: Resources,
    cluster: LocalCluster,
    api_client: client.ApiClient,
    namespace: str,
    volumes: Any,
) -> None:
    resources.create(MS, modelserver("scaled", replicas=1, resources={"gpus": 0}))
    resources.wait_phase(MS, "scaled", "Ready")
    subprocess.run(
        [
            str(kubectl_path()),
            f"--kubeconfig={cluster.kubeconfig}",
            "-n",
            namespace,
            "scale",
            "ms/scaled",
            "--replicas=3",
        ],
        check=True,
        capture_output=True,
    )
    apps = client.AppsV1Api(api_client)
    wait_for(
        lambda: apps.read_namespaced_deployment("scaled", namespace).spec.replicas == 3,
        what="3 replicas",
    )
    obj = wait_for(
        lambda: (o := resources.get(MS, "scaled"))["status"].get("readyReplicas") == 3 and o,
        what="3 ready",
    )
    assert (
        obj["status"]["selector"]
        == "app.kubernetes.io/managed-by=kubetune,kubetune.io/modelserver=scaled"
    )


def test_waits_for_its_finetunejob_then_serves_and_rolls_out_a_new_run(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(MS, modelserver("follow", model={"fineTuneJobRef": {"name": "trainer"}}))
    cond = wait_for(
        lambda: (c := resources.condition(MS, "follow", "Ready")) and c, what="Ready condition"
    )
    assert cond["reason"] == "FineTuneJobNotFound"
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    resources.create(
        "finetunejobs", finetunejob("trainer", resources={"nodes": 1, "gpusPerNode": 1})
    )
    wait_for(
        lambda: (
            (c := resources.condition(MS, "follow", "Ready"))
            and c["reason"] == "WaitingForFineTuneJob"
        ),
        what="WaitingForFineTuneJob",
    )
    assert _read(apps.read_namespaced_deployment, "follow", namespace) is None
    resources.report_output("trainer", "pvc://models/out/trainer")
    _finish_pods(core, namespace, "trainer-train", 1, **{OUTCOME_ANNOTATION: "succeed"})
    obj = resources.wait_phase(MS, "follow", "Ready")
    first = apps.read_namespaced_deployment("follow", namespace)
    revision = first.spec.template.metadata.annotations["kubetune.io/model-revision"]
    assert obj["status"]["served"]["uri"] == "pvc://models/out/trainer/triton-repository"
    assert (
        "--source=/kubetune/source/models/out/trainer/triton-repository"
        in first.spec.template.spec.init_containers[0].args
    )

    # A new run of the job (same name, new object) rolls out a new revision; the old one serves
    # meanwhile: the Deployment is never deleted.
    resources.delete("finetunejobs", "trainer")
    wait_for(
        lambda: (
            _read(client.BatchV1Api(api_client).read_namespaced_job, "trainer-train", namespace)
            is None
        ),
        what="old job gone",
    )
    resources.create(
        "finetunejobs", finetunejob("trainer", resources={"nodes": 1, "gpusPerNode": 1})
    )
    resources.report_output("trainer", "pvc://models/out/trainer")
    _finish_pods(core, namespace, "trainer-train", 1, **{OUTCOME_ANNOTATION: "succeed"})
    wait_for(
        lambda: (
            apps.read_namespaced_deployment("follow", namespace).spec.template.metadata.annotations[
                "kubetune.io/model-revision"
            ]
            != revision
        ),
        what="a new revision to roll out",
    )
    assert apps.read_namespaced_deployment("follow", namespace).metadata.uid == first.metadata.uid
    resources.wait_phase(MS, "follow", "Ready")


def test_autoscaling_renders_an_hpa_the_controller_picks_up_and_replicas_are_left_alone(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    spec = {
        "autoscaling": {"minReplicas": 2, "maxReplicas": 5, "metric": "queue-time", "target": 40000}
    }
    resources.create(MS, modelserver("auto", **spec))
    hpa_api = client.AutoscalingV2Api(api_client)
    hpa = wait_for(
        lambda: _read(hpa_api.read_namespaced_horizontal_pod_autoscaler, "auto", namespace),
        what="HPA",
    )
    metric = hpa.spec.metrics[0]
    assert (metric.type, metric.pods.metric.name, metric.pods.target.average_value) == (
        "Pods",
        "triton_queue_time_per_request_us",
        "40k",
    )
    # The real HPA controller acts on it: it raises the Deployment to minReplicas.
    apps = client.AppsV1Api(api_client)
    wait_for(
        lambda: apps.read_namespaced_deployment("auto", namespace).spec.replicas == 2,
        60,
        "HPA to scale to 2",
    )
    wait_for(
        lambda: any(
            c.type == "AbleToScale"
            for c in (
                hpa_api.read_namespaced_horizontal_pod_autoscaler(
                    "auto", namespace
                ).status.conditions
                or []
            )
        ),
        60,
        "the HPA controller to report on the HPA",
    )
    deploy = apps.read_namespaced_deployment("auto", namespace)
    ours = [m for m in deploy.metadata.managed_fields if m.manager == "kubetune"]
    assert ours and all("f:replicas" not in json.dumps(m.fields_v1.get("f:spec", {})) for m in ours)
    # Switching autoscaling off removes the HPA and the operator owns replicas again.
    resources.patch(MS, "auto", {"spec": {"autoscaling": None, "replicas": 1}})
    wait_for(
        lambda: _read(hpa_api.read_namespaced_horizontal_pod_autoscaler, "auto", namespace) is None,
        what="HPA removal",
    )
    wait_for(
        lambda: apps.read_namespaced_deployment("auto", namespace).spec.replicas == 1,
        what="1 replica",
    )


def test_cpu_autoscaling_uses_a_resource_metric(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(
        MS, modelserver("cpu", autoscaling={"maxReplicas": 3, "metric": "cpu", "target": 70})
    )
    hpa_api = client.AutoscalingV2Api(api_client)
    hpa = wait_for(
        lambda: _read(hpa_api.read_namespaced_horizontal_pod_autoscaler, "cpu", namespace),
        what="HPA",
    )
    assert hpa.spec.metrics[0].resource.target.average_utilization == 70


def test_gpu_aware_rollout_strategy(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    # 8-GPU nodes: a replica of 2 GPUs fits beside the others (surge) ...
    resources.create(MS, modelserver("roomy", replicas=1, resources={"gpus": 2}))
    apps = client.AppsV1Api(api_client)
    deploy = wait_for(
        lambda: _read(apps.read_namespaced_deployment, "roomy", namespace), what="deployment"
    )
    assert deploy.spec.strategy.rolling_update.max_surge == 1
    assert deploy.spec.strategy.rolling_update.max_unavailable == 0
    # ... a replica of 9 GPUs cannot get a spare node: replace one at a time.
    resources.create(MS, modelserver("tight", replicas=1, resources={"gpus": 9}))
    deploy = wait_for(
        lambda: _read(apps.read_namespaced_deployment, "tight", namespace), what="deployment"
    )
    assert deploy.spec.strategy.rolling_update.max_surge == 0
    assert deploy.spec.strategy.rolling_update.max_unavailable == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"replicas": 2, "autoscaling": {"maxReplicas": 3, "target": 10}}, "mutually exclusive"),
        (
            {"autoscaling": {"minReplicas": 4, "maxReplicas": 3, "target": 10}},
            "minReplicas must not exceed",
        ),
        ({"model": {"source": "pvc://a/b", "fineTuneJobRef": {"name": "x"}}}, "exactly one of"),
        ({"model": {}}, "exactly one of"),
    ],
)
def test_bad_modelservers_are_rejected_with_a_clear_message(
    resources: Resources, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as err:
        resources.create(MS, modelserver("bad", **spec))
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]


def test_deleted_deployment_is_restored(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    resources.create(MS, modelserver("heal", replicas=1, resources={"gpus": 0}))
    apps = client.AppsV1Api(api_client)
    first = wait_for(
        lambda: _read(apps.read_namespaced_deployment, "heal", namespace), what="deployment"
    )
    apps.delete_namespaced_deployment("heal", namespace)
    wait_for(
        lambda: (
            (d := _read(apps.read_namespaced_deployment, "heal", namespace))
            and d.metadata.uid != first.metadata.uid
        ),
        what="restored deployment",
    )
    resources.wait_phase(MS, "heal", "Ready")


def test_a_failed_smoke_test_rolls_back_to_the_model_that_passed(
    resources: Resources, api_client: client.ApiClient, namespace: str, volumes: Any
) -> None:
    """The failure is real but provoked: kwok's pods have loopback IPs where nothing listens, so
    the operator's real tritonclient request is refused (a real Triton serving a broken model is
    covered by tests/e2e)."""
    resources.create(MS, modelserver("gate", replicas=1, resources={"gpus": 0}))
    first = resources.wait_phase(MS, "gate", "Ready")
    good = first["status"]["served"]["revision"]
    assert first["status"]["served"]["uri"] == "pvc://models/repo"
    apps = client.AppsV1Api(api_client)

    def revision() -> str:
        deploy = apps.read_namespaced_deployment("gate", namespace)
        return str(deploy.spec.template.metadata.annotations["kubetune.io/model-revision"])

    assert revision() == good
    resources.patch(
        MS,
        "gate",
        {
            "spec": {
                "model": {"source": "pvc://models/broken"},
                "rollout": {"smokeTest": {"enabled": True}},
            }
        },
    )
    obj = wait_for(
        lambda: (o := resources.get(MS, "gate"))["status"].get("failedRevision") and o,
        90,
        "the smoke test of the new revision to fail",
    )
    bad = obj["status"]["failedRevision"]
    assert bad != good
    assert obj["status"]["smokeTest"]["passed"] is False
    assert "smoke test of gate failed" in obj["status"]["smokeTest"]["message"]
    # The rollback: the Deployment goes back to the revision that passed, and says so.
    wait_for(lambda: revision() == good, 60, "the Deployment to roll back")
    cond = wait_for(
        lambda: (
            (c := resources.condition(MS, "gate", "Degraded")) and c["reason"] == "RolledBack" and c
        ),
        60,
        "the RolledBack condition",
    )
    assert bad in cond["message"]
    assert resources.condition(MS, "gate", "SmokeTestPassed")["status"] == "False"  # type: ignore[index]
    # Flux (kstatus) and Argo CD read the rollback as a failure that needs a person.
    assert_health(resources.get(MS, "gate"), "ms-rolled-back")
    assert resources.get(MS, "gate")["status"]["served"]["revision"] == good
    events = (
        client.CoreV1Api(api_client)
        .list_namespaced_event(namespace, field_selector="involvedObject.name=gate")
        .items
    )
    assert any(e.reason == "SmokeTestFailed" and e.type == "Warning" for e in events)
