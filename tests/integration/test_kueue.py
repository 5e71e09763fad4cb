"""Real Kueue (sigs.k8s.io/kueue v0.17.0, built from its module) queues FineTuneJobs by quota.

On a cluster of its own: Kueue manages every Job that names a queue in every namespace, and a
test that starts and stops it must not change what the session's other tests see. How Kueue runs
here (webhooks served with its own certificate, not registered) is in devcluster/kueue.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from kubetune.devcluster.cluster import OUTCOME_ANNOTATION, LocalCluster, running_cluster
from kubetune.devcluster.kueue import API_VERSION, start_kueue
from kubetune.devcluster.volumes import ensure_claim
from tests.cluster_fixtures import OperatorProcess, Resources, install_crds
from tests.integration.test_finetunejob import _finish_pods, _pods, finetunejob
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
FTJ = "finetunejobs"
NS = "team-a"
GPUS = 8  # the ClusterQueue's quota: one job of 2 nodes x 4 GPUs


@pytest.fixture(scope="module")
def kueue_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(f"pytest-kueue-{os.getpid()}") as cluster:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        install_crds(api)
        start_kueue(cluster)
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NS}})
        for claim in ("models", "datasets"):
            ensure_claim(api, NS, claim, cluster.dir / "volumes" / claim)
        yield cluster


def _kueue_object(kind: str, name: str, spec: dict[str, Any], **meta: str) -> dict[str, Any]:
    metadata = {"name": name, **meta}
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


def _queues(api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api)
    group, version = API_VERSION.split("/")
    custom.create_cluster_custom_object(
        group, version, "resourceflavors", _kueue_object("ResourceFlavor", "default", {})
    )
    quota = [
        {"name": "cpu", "nominalQuota": "64"},
        {"name": "memory", "nominalQuota": "512Gi"},
        {"name": "nvidia.com/gpu", "nominalQuota": str(GPUS)},
    ]
    custom.create_cluster_custom_object(
        group,
        version,
        "clusterqueues",
        _kueue_object(
            "ClusterQueue",
            "gpus",
            {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": [q["name"] for q in quota],
                        "flavors": [{"name": "default", "resources": quota}],
                    }
                ],
            },
        ),
    )
    custom.create_namespaced_custom_object(
        group,
        version,
        NS,
        "localqueues",
        _kueue_object("LocalQueue", "team-a", {"clusterQueue": "gpus"}, namespace=NS),
    )


def _suspended(resources: Resources, name: str) -> dict[str, Any] | None:
    return resources.condition(FTJ, name, "Suspended")


def test_two_jobs_one_quota_the_second_waits_with_kueues_reason_then_runs(
    kueue_cluster: LocalCluster, tmp_path: Path
) -> None:
    api = config.new_client_from_config(str(kueue_cluster.kubeconfig))
    _queues(api)
    operator = OperatorProcess(kueue_cluster, tmp_path / "operator.log")
    operator.start()
    resources = Resources(api, NS)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    try:
        spec = {"queueName": "team-a", "resources": {"nodes": 2, "gpusPerNode": 4}}
        resources.create(FTJ, finetunejob("first", **spec))
        resources.wait_phase(FTJ, "first", "Running", timeout=120)
        # Kueue admitted it: the Job was unsuspended by Kueue, not by kubetune or the test.
        job = batch.read_namespaced_job("first-train", NS)
        assert job.spec.suspend is False

        resources.create(FTJ, finetunejob("second", **spec))
        waiting = wait_for(
            lambda: (
                (c := _suspended(resources, "second"))
                and c["status"] == "True"
                and "insufficient unused quota" in c["message"]
                and c
            ),
            120,
            "the second FineTuneJob to say why Kueue holds it",
        )
        assert waiting["reason"] == "WaitingForQueue"
        assert "'team-a'" in waiting["message"] and "nvidia.com/gpu" in waiting["message"]
        second = resources.get(FTJ, "second")
        assert second["status"]["phase"] == "Suspended"
        assert batch.read_namespaced_job("second-train", NS).spec.suspend is True
        assert not _pods(core, NS, "second-train")
        print(f"\nqueued: {waiting['message']}")

        # The first ends: its quota is released and Kueue admits the second.
        resources.report_output("first", "pvc://models/out/first")
        _finish_pods(core, NS, "first-train", 2, **{OUTCOME_ANNOTATION: "succeed"})
        resources.wait_phase(FTJ, "first", "Succeeded", timeout=120)
        resources.wait_phase(FTJ, "second", "Running", timeout=120)
        assert batch.read_namespaced_job("second-train", NS).spec.suspend is False
        assert resources.condition(FTJ, "second", "Suspended")["status"] == "False"  # type: ignore[index]
    finally:
        operator.stop()
    log = operator.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
