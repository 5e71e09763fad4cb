"""Fixtures over the local cluster: the operator as a real subprocess, CRDs, volumes, resources."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune.crdgen import all_crds
from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.volumes import ensure_claim
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OperatorProcess:
    """Start, stop and restart the operator; its log is kept for failing tests to show."""

    def __init__(self, cluster: LocalCluster, log: Path) -> None:
        self.cluster = cluster
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        # Its Prometheus metrics (`kubetune run --metrics-port`), what the chart's metrics
        # Service fronts: tests scrape them with the real Prometheus.
        self.metrics_port = free_port()

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "PYTHONPATH": str(REPO / "operator"),
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetune", "run", f"--metrics-port={self.metrics_port}"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        deadline = time.monotonic() + 60
        while b"Initial authentication has finished" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"the operator did not start:\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def crds(api_client: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api_client)
    for crd in all_crds().values():
        ext.create_custom_resource_definition(crd)
    for crd in all_crds().values():
        name = crd["metadata"]["name"]
        wait_for(
            lambda n=name: any(
                c.type == "Established" and c.status == "True"
                for c in ext.read_custom_resource_definition(n).status.conditions or []
            ),
            what=f"CRD {name} to be established",
        )


@pytest.fixture(scope="session")
def operator(
    cluster: LocalCluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = OperatorProcess(cluster, log)
    proc.start()
    yield proc
    proc.stop()
    # Every test ran with a live operator: a crash would have been a silent stop.
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]


@pytest.fixture
def volumes(api_client: client.ApiClient, namespace: str, cluster: LocalCluster) -> dict[str, Path]:
    """`models` and `datasets` claims in the test's namespace, bound to folders of this machine
    (inside the cluster's folder: pytest's own tmp folders may be pruned by a parallel run)."""
    root = cluster.dir / "volumes" / namespace
    claims = {
        claim: ensure_claim(api_client, namespace, claim, root / claim)
        for claim in ("models", "datasets")
    }
    core = client.CoreV1Api(api_client)
    for claim in claims:  # bound before a test's pods need them (else they wait, unscheduled)
        wait_for(
            lambda c=claim: (
                core.read_namespaced_persistent_volume_claim(c, namespace).status.phase == "Bound"
            ),
            what=f"claim {claim} to be bound",
        )
    return claims


class Resources:
    """Create, read, patch and delete kubetune resources in one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.api.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", self.namespace, plural, body
        )
        return result

    def get(self, plural: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api.get_namespaced_custom_object(
            "kubetune.io", "v1alpha1", self.namespace, plural, name
        )
        return result

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.api.patch_namespaced_custom_object(
            "kubetune.io", "v1alpha1", self.namespace, plural, name, patch
        )
        return result

    def patch_status(self, plural: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.api.patch_namespaced_custom_object_status(
            "kubetune.io", "v1alpha1", self.namespace, plural, name, {"status": status}
        )
        return result

    def report_output(self, name: str, model_uri: str) -> None:
        """What the trainer writes on success (simulated pods run no trainer), once the operator
        has written a status (the trainer runs only after it has)."""
        wait_for(
            lambda: (self.get("finetunejobs", name).get("status") or {}).get("phase"),
            what=f"finetunejobs/{name} to have a status",
        )
        self.patch_status(
            "finetunejobs",
            name,
            {
                "output": {
                    "modelUri": model_uri,
                    "tritonRepositoryUri": f"{model_uri}/triton-repository",
                }
            },
        )

    def delete(self, plural: str, name: str) -> None:
        self.api.delete_namespaced_custom_object(
            "kubetune.io", "v1alpha1", self.namespace, plural, name
        )

    def condition(self, plural: str, name: str, type_: str) -> dict[str, Any] | None:
        for cond in (self.get(plural, name).get("status") or {}).get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return None

    def wait_phase(self, plural: str, name: str, phase: str, timeout: float = 90) -> dict[str, Any]:
        return wait_for(
            lambda: (obj := self.get(plural, name)).get("status", {}).get("phase") == phase and obj,
            timeout,
            f"{plural}/{name} to reach phase {phase}",
        )


@pytest.fixture
def resources(api_client: client.ApiClient, namespace: str, operator: OperatorProcess) -> Resources:
    return Resources(api_client, namespace)
