"""Fixtures over the local cluster: the operator as a real subprocess, CRDs, volumes, resources."""

from __future__ import annotations

import ctypes
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
import yaml
from kubernetes import client, config

from kubetune.crdgen import all_crds
from kubetune.devcluster.cluster import LocalCluster, running_cluster
from kubetune.devcluster.images import base_image, kubetune_image
from kubetune.devcluster.volumes import ensure_claim
from kubetune.kube import Kube
from tests.real_node import bound_claims
from tests.tools.helm import Helm
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# The trainer status policy (charts/kubetune/templates/trainer-status-policy.yaml), cluster-wide
# like the CRDs: applied with the RBAC, so that every test cluster enforces it.
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
TOKEN_SECONDS = 24 * 3600  # longer than any test session


def chart_rbac_kubeconfig(
    api_client: client.ApiClient,
    kubeconfig: Path,
    folder: Path,
    namespace: str = "kubetune-system",
    release: str = "session",
    replicas: int = 1,
) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount, and nothing more.

    `helm template` of charts/kubetune renders the ServiceAccount, the ClusterRole and its
    binding (and, with replicas > 1, the leader-election Role in `namespace`) and the trainer
    status policy; they are applied to the cluster as rendered, and the API server mints a token
    for the ServiceAccount (the TokenRequest API). An operator run with this kubeconfig holds the
    chart's RBAC only: a call the chart does not allow is a 403 in its log, which the `operator`
    fixture fails on."""
    core = client.CoreV1Api(api_client)
    if not any(ns.metadata.name == namespace for ns in core.list_namespace().items):
        core.create_namespace({"metadata": {"name": namespace}})
    rendered = Helm.in_folder(folder / "helm").template(
        "crds.enabled=false", f"replicas={replicas}", namespace=namespace
    )
    kube = Kube(api_client)
    for doc in rendered:
        if doc["kind"] in RBAC_KINDS + POLICY_KINDS:
            kube.apply(doc, field_manager="kubetune-tests")
    (account,) = [d["metadata"]["name"] for d in rendered if d["kind"] == "ServiceAccount"]
    token = core.create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": TOKEN_SECONDS}}
    ).status.token
    config = yaml.safe_load(kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}  # no client certificate: the token is the identity
    path = folder / "operator-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None).prctl  # resolved here: the child only calls it (no dlopen after fork)


def _end_with_pytest() -> None:
    """In the child before exec: SIGTERM when pytest goes, however it goes. A killed test run
    left its operators running, and one held the chart's fixed metrics port for the next run."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class OperatorProcess:
    """Start, stop and restart the operator; its log is kept for failing tests to show.

    It runs with `kubeconfig` when given (the chart's ServiceAccount, chart_rbac_kubeconfig),
    else with the cluster's admin kubeconfig."""

    def __init__(
        self,
        cluster: LocalCluster,
        log: Path,
        kubeconfig: Path | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.log = log
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        # Its Prometheus metrics (`kubetune run --metrics-port`), what the chart's metrics
        # Service fronts: tests scrape them with the real Prometheus.
        self.metrics_port = free_port()

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": str(REPO / "operator"),
            **self.env,
        }
        started = len(self.log.read_bytes()) if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kubetune",
                    "run",
                    f"--metrics-port={self.metrics_port}",
                    *self.args,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                # One prctl call, nothing that takes a lock another thread could hold.
                preexec_fn=_end_with_pytest,  # noqa: PLW1509
            )
        deadline = time.monotonic() + 60
        while b"Initial authentication has finished" not in self.log.read_bytes()[started:]:
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

    def kill(self) -> None:
        """kill -9: no shutdown of any kind (a crash, an OOM kill, a node lost)."""
        if self.proc is not None:
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
    install_crds(api_client)


def install_crds(api_client: client.ApiClient) -> None:
    """kubetune's CRDs, created and established (for clusters of a test module's own too)."""
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
    cluster: LocalCluster,
    api_client: client.ApiClient,
    crds: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """The operator of the whole integration tier, as the chart's ServiceAccount: every test
    also shows that the chart's RBAC is enough for what it exercises."""
    yield from chart_operator(cluster, api_client, tmp_path_factory.mktemp("operator"))


def chart_operator(
    cluster: LocalCluster, api_client: client.ApiClient, folder: Path
) -> Iterator[OperatorProcess]:
    """The operator as the chart's ServiceAccount for the duration of a fixture; afterwards its
    log shows no crash and no refusal."""
    log = folder / "operator.log"
    proc = OperatorProcess(
        cluster, log, chart_rbac_kubeconfig(api_client, cluster.kubeconfig, folder)
    )
    proc.start()
    yield proc
    proc.stop()
    # Every test ran with a live operator: a crash would have been a silent stop, and a call
    # the chart's RBAC does not allow would have been a 403 naming the ServiceAccount (quota,
    # Pod Security and terminating namespaces answer 403 too, but name no user).
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]
    denied = [line for line in text.splitlines() if '"system:serviceaccount:' in line]
    assert denied == [], "\n".join(denied[:20])


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


class RealNode:
    """The session's cluster with a real node (kubelet, containerd, runc, CNI, CoreDNS, the
    local-path provisioner). Every test that runs pods in kubetune's images shares it, so each
    image is imported into its containerd once per session (the trainer and Triton images also
    share their 7 GB ML layer: the second import finds it there)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.api = config.new_client_from_config(str(cluster.kubeconfig))
        self._loaded: set[str] = set()

    def load(self, *names: str) -> None:
        """Import kubetune's images ("trainer", "triton", "operator", or "base") if not yet."""
        for name in names:
            if name in self._loaded:
                continue
            started = time.monotonic()
            self.cluster.load_images(base_image() if name == "base" else kubetune_image(name))
            print(f"\n{name} image loaded into the real node in {time.monotonic() - started:.0f}s")
            self._loaded.add(name)

    def namespace(self, name: str) -> str:
        """A namespace of a test's own, with Pod Security "restricted" enforced (the generated
        pods must pass it to be created)."""
        client.CoreV1Api(self.api).create_namespace(
            {
                "metadata": {
                    "name": name,
                    "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
                }
            }
        )
        return name

    def delete_namespace(self, name: str) -> None:
        """Deleted, and waited for until its pods are gone: they give back the node's CPU,
        memory and GPU before the next test asks for them. The pods are cut short (1 s
        grace, not the serving pods' 15 s drain and 45 s grace): a teardown is not under test,
        and the tests that check graceful termination do it in their own bodies. The namespace
        itself finishes terminating in the background; its name is never reused."""
        core = client.CoreV1Api(self.api)
        core.delete_namespace(name)
        # Terminating: nothing can create a pod in it any more, so this sweep is the last.
        core.delete_collection_namespaced_pod(name, grace_period_seconds=1)
        wait_for(
            lambda: not core.list_namespaced_pod(name).items,
            timeout=180,
            what=f"the pods of namespace {name} to be gone",
        )


@pytest.fixture(scope="session")
def real_node() -> Iterator[RealNode]:
    with running_cluster(f"pytest-real-{os.getpid()}", real_node=True) as cluster:
        install_crds(config.new_client_from_config(str(cluster.kubeconfig)))
        yield RealNode(cluster)


@pytest.fixture(scope="session")
def real_operator(
    real_node: RealNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator on the real-node cluster, as the chart's ServiceAccount (like `operator`)."""
    yield from chart_operator(
        real_node.cluster, real_node.api, tmp_path_factory.mktemp("real-operator")
    )


@pytest.fixture
def real_namespace(real_node: RealNode, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own on the real-node cluster."""
    name = f"r-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{os.urandom(3).hex()}"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    yield real_node.namespace(name)
    real_node.delete_namespace(name)


@pytest.fixture
def real_volumes(real_node: RealNode, real_namespace: str) -> dict[str, Path]:
    """examples/pvcs.yaml's `models` and `datasets` claims in the test's real-node namespace,
    bound by the default StorageClass: the (empty) folders of this machine behind them."""
    return bound_claims(real_node.cluster, real_namespace)


@pytest.fixture
def real_resources(
    real_node: RealNode, real_namespace: str, real_operator: OperatorProcess
) -> Resources:
    return Resources(real_node.api, real_namespace)
