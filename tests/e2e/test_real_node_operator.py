"""The operator as a platform team installs it: `helm install` of the chart on a cluster with a
real node, running kubetune's operator image (built with buildah on the local Debian base) in a
pod under the chart's securityContext, talking to the API server through the `kubernetes`
Service, and reconciling a FineTuneJob into its children: first the pre-flight pod (the chart's
default, in the trainer image) checks the claims' model and dataset, then the training Job.
`kubectl logs` shows the operator's log."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from tests.cluster_fixtures import Resources
from tests.real_node import DATASET, MODEL, minilm_claims
from tests.waiting import wait_for

from kubetune.devcluster.binaries import binaries_dir
from kubetune.devcluster.cluster import LocalCluster, running_cluster
from kubetune.devcluster.demo import PLACEMENT
from kubetune.devcluster.images import kubetune_image

# The first test's fixtures load the trainer image (7 GB) into a new cluster's containerd
# (about 4.5 minutes here) and may rebuild it after a code change: beyond pytest's 900 s default.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
SYSTEM = "kubetune-system"
TRAIN = "intents-train"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(f"ro-{os.getpid()}", real_node=True) as cluster:
        # Each loaded as soon as it is built: an archive is kept until another version of the
        # same image is built on this machine (by another run).
        cluster.load_images(kubetune_image("operator"))
        cluster.load_images(kubetune_image("trainer"))
        home = tmp_path_factory.mktemp("helm")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "KUBECONFIG": str(cluster.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        placement = [
            "--set-json",
            'nodeSelector={"kubetune.io/local-node":"true"}',
            "--set-json",
            'tolerations=[{"key":"kubetune.io/local-node","operator":"Exists"}]',
        ]
        # One replica: the leader election of the default two has a test of its own
        # (tests/integration/test_ha.py).
        placement += ["--set", "replicas=1"]
        install = ["install", "kubetune", str(CHART), "--namespace", SYSTEM, "--create-namespace"]
        subprocess.run(
            [str(binaries_dir() / "helm"), *install, *placement, "--wait", "--timeout", "5m"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        yield cluster


def test_the_chart_runs_the_operator_image_on_the_real_node_and_it_reconciles(
    installed: LocalCluster,
) -> None:
    api = config.new_client_from_config(str(installed.kubeconfig))
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    [deployment] = apps.list_namespaced_deployment(SYSTEM).items
    assert deployment.status.available_replicas == 1
    [pod] = core.list_namespaced_pod(SYSTEM).items
    assert pod.spec.node_name == "local-node-0"
    [status] = pod.status.container_statuses
    assert status.ready and status.restart_count == 0
    assert status.image == "ghcr.io/kubetune/operator:0.1.0"

    core.create_namespace(
        {
            "metadata": {
                "name": "team",
                "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
            }
        }
    )
    minilm_claims(installed, "team")
    resources = Resources(api, "team")
    resources.create(
        "finetunejobs",
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "intents"},
            "spec": {
                "model": {"source": MODEL},
                "dataset": {"source": DATASET},
                "resources": {"nodes": 1, "gpusPerNode": 1, **PLACEMENT},
                "output": {"uri": "pvc://models/out/intents"},
            },
        },
    )
    batch = client.BatchV1Api(api)
    try:
        wait_for(
            lambda: [
                j for j in batch.list_namespaced_job("team").items if j.metadata.name == TRAIN
            ],
            timeout=600,
            what="the pre-flight pod's verdict and then the training Job",
        )
    except AssertionError as err:
        raise AssertionError(
            f"{err}\nstatus: {resources.get('finetunejobs', 'intents').get('status')}\n"
            f"{installed.kubectl('-n', SYSTEM, 'logs', pod.metadata.name)[-5000:]}"
        ) from err
    phase = wait_for(
        lambda: resources.get("finetunejobs", "intents").get("status", {}).get("phase"),
        timeout=60,
        what="the operator to write a status",
    )
    assert phase in {"Pending", "Running", "Succeeded"}
    # The pre-flight pod ran in the trainer image on the real node, read the claims under its
    # read-only root and left its verdict in its termination message.
    validated = resources.condition("finetunejobs", "intents", "Validated")
    assert validated is not None and validated["status"] == "True", validated
    assert validated["reason"] in {"Fits", "GpuMemoryUnknown"}, validated
    [check] = core.list_namespaced_pod(
        "team", label_selector="kubetune.io/preflight-of=intents"
    ).items
    assert check.spec.node_name == "local-node-0"
    assert check.spec.containers[0].image == "ghcr.io/kubetune/trainer:0.1.0"
    assert check.status.container_statuses[0].state.terminated.exit_code == 0
    logs = installed.kubectl("-n", SYSTEM, "logs", pod.metadata.name)
    assert "Initial authentication has finished" in logs, logs[-3000:]  # in-cluster credentials
    # The image's jemalloc is what the operator's process allocates with (handlers/memory.py
    # reads the process's own memory map).
    assert "memory allocator: jemalloc" in logs, logs[:3000]
