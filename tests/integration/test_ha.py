"""Two operator replicas with leader election, on a cluster of their own (the session's operator
acts on every namespace of the shared cluster and would be a third, unelected replica)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from kubetune.crdgen import all_crds
from kubetune.devcluster.cluster import LocalCluster, running_cluster
from kubetune.devcluster.volumes import ensure_claim
from kubetune.operator_main import LEASE_SECONDS, RETRY_SECONDS
from tests.cluster_fixtures import chart_rbac_kubeconfig
from tests.integration.test_finetunejob import finetunejob
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
NS = "ha"
SYSTEM = "kubetune-system"  # the chart's release namespace: its leader-election Role is there
LEASE = f"{SYSTEM}/kubetune-ha"
TAKEOVER_LIMIT_SECONDS = 25  # the bound for the standby to act


def _replica(kubeconfig: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONPATH": str(REPO / "operator"),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune", "run", f"--leader-election={LEASE}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def ha_cluster() -> Iterator[LocalCluster]:
    """The cluster, and (as its kubeconfig) the chart's ServiceAccount with two replicas'
    RBAC: the replicas hold what the chart grants and nothing more."""
    with running_cluster(f"pytest-ha-{os.getpid()}") as cluster:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        for crd in all_crds().values():
            client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NS}})
        for claim in ("models", "datasets"):
            ensure_claim(api, NS, claim, cluster.dir / "volumes" / claim)
        yield cluster


def _holder(coord: client.CoordinationV1Api) -> str | None:
    namespace, name = LEASE.split("/")
    try:
        return str(coord.read_namespaced_lease(name, namespace).spec.holder_identity)
    except client.ApiException:
        return None


def test_one_replica_acts_and_the_standby_takes_over_after_kill_9(
    ha_cluster: LocalCluster, tmp_path: Path
) -> None:
    api = config.new_client_from_config(str(ha_cluster.kubeconfig))
    # The replicas run as the chart's ServiceAccount, rendered with replicas=2.
    chart = chart_rbac_kubeconfig(api, ha_cluster.kubeconfig, tmp_path, SYSTEM, replicas=2)
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    coord = client.CoordinationV1Api(api)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    first = _replica(chart, logs[0])
    replicas = [first]
    try:
        wait_for(lambda: b"leading: holding the lease" in logs[0].read_bytes(), 60, "a leader")
        wait_for(lambda: b"Initial authentication" in logs[0].read_bytes(), 60, "kopf running")
        leader = _holder(coord)
        assert leader and leader.endswith(f"-{first.pid}")
        second = _replica(chart, logs[1])
        replicas.append(second)
        wait_for(lambda: b"standing by for the lease" in logs[1].read_bytes(), 60, "a standby")

        custom.create_namespaced_custom_object(
            "kubetune.io",
            "v1alpha1",
            NS,
            "finetunejobs",
            finetunejob("one", resources={"nodes": 1, "gpusPerNode": 1}),
        )
        wait_for(lambda: _job(batch, "one-train"), 60, "the leader to create one's Job")
        assert b"Initial authentication" not in logs[1].read_bytes()  # the standby did nothing

        first.send_signal(signal.SIGKILL)
        first.wait()
        killed = time.monotonic()
        custom.create_namespaced_custom_object(
            "kubetune.io",
            "v1alpha1",
            NS,
            "finetunejobs",
            finetunejob("two", resources={"nodes": 1, "gpusPerNode": 1}),
        )
        wait_for(lambda: _job(batch, "two-train"), 60, "the standby to create two's Job")
        took = time.monotonic() - killed
        print(
            f"\nstandby acted {took:.1f}s after kill -9 "
            f"(lease {LEASE_SECONDS}s, retry {RETRY_SECONDS}s)"
        )
        assert took <= TAKEOVER_LIMIT_SECONDS
        assert (_holder(coord) or "").endswith(f"-{second.pid}")

        # Nothing reconciled twice into duplicates: one child of each kind per FineTuneJob.
        jobs = batch.list_namespaced_job(NS).items
        assert sorted(j.metadata.name for j in jobs) == ["one-train", "two-train"]
        maps = (
            client.CoreV1Api(api)
            .list_namespaced_config_map(NS, label_selector="app.kubernetes.io/managed-by=kubetune")
            .items
        )
        assert sorted(m.metadata.name for m in maps) == ["one-config", "two-config"]
        # Neither replica was refused anything: a 403 names the ServiceAccount.
        for log in logs:
            lines = log.read_text(errors="replace").splitlines()
            assert [line for line in lines if '"system:serviceaccount:' in line] == []
    finally:
        for proc in replicas:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)


def _job(batch: client.BatchV1Api, name: str) -> bool:
    try:
        batch.read_namespaced_job(name, NS)
    except client.ApiException:
        return False
    return True
