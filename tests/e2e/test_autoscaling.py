"""The autoscaling loop end to end, with every part real: a ModelServer's pods run the real Triton
server (the local node runs the operator's generated pods as processes: the nvidia-pytriton
wheel's tritonserver on the shipped MiniLM), Prometheus (from its Go module) finds and scrapes
them through Kubernetes service discovery with the shipped scrape configuration, and
prometheus-adapter (from its Go module) serves the shipped rules as custom.metrics.k8s.io through
the API server's aggregation layer; the HPA the operator generated is run by the real
kube-controller-manager. NVIDIA's perf_analyzer loads the server: Triton's queue time rises, the
HPA adds a replica; the load stops, queue time falls to 0, the HPA removes it again.

The local node advertises one GPU and each replica asks for one, so the added replica stays
Pending there (unschedulable: on a GPU cluster it lands on another node). Scaling is what the HPA
and the Deployment say, which is what is asserted; the pending pod has no metrics, which the HPA
reads, on the way down, as the target value.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from tests.cluster_fixtures import OperatorProcess, free_port
from tests.waiting import wait_for

from kubetune.crdgen import all_crds
from kubetune.devcluster import perfanalyzer
from kubetune.devcluster.cluster import LocalCluster, running_cluster
from kubetune.devcluster.demo import PLACEMENT, minilm_checkpoint
from kubetune.devcluster.monitoring import (
    Prometheus,
    adapter_config,
    pods_metric,
    start_adapter,
    start_prometheus,
)
from kubetune.devcluster.volumes import ensure_claim

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "examples" / "monitoring"
METRIC = "triton_queue_time_per_request_us"
TARGET_US = 5000  # 5 ms of queueing per request: idle is 0, 16 clients on 2 cores far above


@pytest.fixture(scope="module")
def loop_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster of this module's own (its aggregated API and Prometheus are not the session's),
    with the local node, the CRDs and the operator."""
    import os

    with running_cluster(f"hpa-{os.getpid()}", local_node=True) as cluster:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        ext = client.ApiextensionsV1Api(api)
        for crd in all_crds().values():
            ext.create_custom_resource_definition(crd)
        for crd in all_crds().values():
            wait_for(
                lambda n=crd["metadata"]["name"]: any(
                    c.type == "Established" and c.status == "True"
                    for c in ext.read_custom_resource_definition(n).status.conditions or []
                ),
                what="the CRDs to be established",
            )
        operator = OperatorProcess(cluster, tmp_path_factory.mktemp("op") / "operator.log")
        operator.start()
        try:
            yield cluster
        finally:
            operator.stop()


@pytest.fixture(scope="module")
def prometheus(loop_cluster: LocalCluster) -> Prometheus:
    """The shipped scrape configuration, service discovery through the cluster's API server."""
    scrape = yaml.safe_load((MONITORING / "prometheus-scrape-configs.yaml").read_text())
    server = start_prometheus(loop_cluster, scrape["scrape_configs"], scrape_interval="2s")
    values = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
    start_adapter(loop_cluster, server, adapter_config(values), relist_interval="5s")
    return server


def _hpa(api: client.ApiClient, namespace: str, name: str) -> Any:
    return client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler(name, namespace)


def _replicas(api: client.ApiClient, namespace: str, name: str) -> int:
    return int(client.AppsV1Api(api).read_namespaced_deployment(name, namespace).spec.replicas)


def test_queue_time_from_perf_analyzer_scales_the_model_server_out_and_back(
    loop_cluster: LocalCluster, prometheus: Prometheus, tmp_path: Path
) -> None:
    api = config.new_client_from_config(str(loop_cluster.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = "serving"
    core.create_namespace({"metadata": {"name": ns}})
    models = loop_cluster.dir / "volumes" / ns / "models"
    ensure_claim(api, ns, "models", models)
    shutil.copytree(minilm_checkpoint(), models / "minilm")
    http, grpc, metrics = free_port(), free_port(), free_port()
    custom.create_namespaced_custom_object(
        "kubetune.io",
        "v1alpha1",
        ns,
        "modelservers",
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": "intents"},
            "spec": {
                "model": {"source": "pvc://models/minilm", "name": "intents"},
                "resources": {"gpus": 1, **PLACEMENT},
                "triton": {"maxBatchSize": 16},
                "autoscaling": {
                    "minReplicas": 1,
                    "maxReplicas": 2,
                    "metric": "queue-time",
                    "target": TARGET_US,
                    "scaleDownStabilizationSeconds": 10,
                },
                "rollout": {"smokeTest": {"enabled": False}},
                # The local node's pods share this machine's ports.
                "service": {"httpPort": http, "grpcPort": grpc, "metricsPort": metrics},
            },
        },
    )
    wait_for(
        lambda: (
            (
                custom.get_namespaced_custom_object(
                    "kubetune.io", "v1alpha1", ns, "modelservers", "intents"
                ).get("status", {})
            ).get("readyReplicas")
            == 1
        ),
        timeout=300,
        what="the ModelServer's first replica to be ready",
    )
    # Prometheus found the pod by its annotations and scrapes Triton's metrics port ...
    (pod,) = [p.metadata.name for p in core.list_namespaced_pod(ns).items]
    wait_for(
        lambda: prometheus.query(f'nv_inference_queue_duration_us{{namespace="{ns}",pod="{pod}"}}'),
        timeout=120,
        what="Triton's queue-time series in Prometheus",
    )
    # ... and the adapter serves the HPA's metric for it through the API server: 0 when idle.
    idle = wait_for(
        lambda: pods_metric(loop_cluster, ns, METRIC), timeout=120, what="the pods metric"
    )
    assert idle == {pod: "0"}, idle
    hpa = wait_for(
        lambda: (h := _hpa(api, ns, "intents")).status.current_metrics and h,
        timeout=120,
        what="the HPA to read the metric",
    )
    assert hpa.spec.metrics[0].pods.metric.name == METRIC
    assert _replicas(api, ns, "intents") == 1

    data = perfanalyzer.text_input(tmp_path, ["I was charged twice this month"])
    load = subprocess.Popen(
        perfanalyzer.command(
            "intents",
            f"127.0.0.1:{http}",
            data,
            16,
            # One measurement window that never ends: the load lasts until it is stopped.
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            "100000000",
        ),
        stdout=(tmp_path / "perf_analyzer.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    try:
        wait_for(
            lambda: _replicas(api, ns, "intents") == 2,
            timeout=300,
            what="the HPA to add a replica under load",
        )
        scaled_out = time.monotonic() - started
        loaded = _hpa(api, ns, "intents")
        assert loaded.status.desired_replicas == 2
        under_load = loaded.status.current_metrics[0].pods.current.average_value
        assert load.poll() is None, (tmp_path / "perf_analyzer.log").read_text()
    finally:
        load.send_signal(signal.SIGINT)
        try:
            load.wait(30)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
    events = core.list_namespaced_event(ns, field_selector="involvedObject.name=intents").items
    rescales = [e.message for e in events if e.reason == "SuccessfulRescale"]
    assert any(f"{METRIC} above target" in m for m in rescales), rescales

    # No load: the rate over the adapter rule's minute falls to 0, and after the scale-down window
    # the HPA goes back to one replica.
    stopped = time.monotonic()
    wait_for(
        lambda: _replicas(api, ns, "intents") == 1,
        timeout=300,
        what="the HPA to remove the replica once the load is gone",
    )
    assert pods_metric(loop_cluster, ns, METRIC).get(pod) == "0"
    print(
        f"\nqueue time under load {under_load} us/request (target {TARGET_US}); "
        f"load -> 2 replicas {scaled_out:.0f}s; load stopped -> 1 replica "
        f"{time.monotonic() - stopped:.0f}s (rule's 1m rate window + 10s stabilization)"
    )
