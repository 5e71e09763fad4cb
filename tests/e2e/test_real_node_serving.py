"""The ModelServer's pods as the operator generates them (builders.serving), on the real node:
the fetch init container (`python -m kubetune.serving.fetch`, in kubetune's operator image, which
carries the package) writes the Triton model repository from a claim, the kubelet runs the
generated startup, readiness and liveness probes, and each replica has its own pod IP.

The Triton container's process is a stand-in HTTP server on Triton's health endpoints (in the
Debian base image) that serves what the fetcher wrote: kubetune's Triton image (torch, about
7 GB) does not fit this machine's shared disk next to the other work. Everything of the pod —
its securityContext, volumes, probes, ports — is the generated one.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from tests.waiting import wait_for

from kubetune.api.v1alpha1.modelserver import ModelServer
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import MODEL_REPOSITORY, ResolvedModel, build_deployment
from kubetune.devcluster.cluster import LocalCluster, running_cluster
from kubetune.devcluster.demo import PLACEMENT, minilm_checkpoint
from kubetune.devcluster.images import base_image, kubetune_image

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
PORT = 8000

STAND_IN = """
    import http.server, json, os, sys
    mode = sys.argv[1]  # ready | never-ready | unhealthy (ready, but its liveness fails)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            live = mode != "unhealthy"
            ok = (live and self.path == "/v2/health/live") or (
                mode != "never-ready" and self.path == "/v2/health/ready"
            )
            body = json.dumps({"models": sorted(os.listdir("MODEL_REPOSITORY"))}).encode()
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(body)
    http.server.ThreadingHTTPServer(("", PORT), Health).serve_forever()
""".replace("MODEL_REPOSITORY", MODEL_REPOSITORY).replace("PORT", str(PORT))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(f"rs-{os.getpid()}", real_node=True) as cluster:
        cluster.load_images(base_image(), kubetune_image("operator"))
        yield cluster


def deployment(cluster: LocalCluster, ns: str, name: str, replicas: int, mode: str) -> Any:
    """The generated Deployment of a ModelServer serving `pvc://models/minilm`, applied."""
    api = config.new_client_from_config(str(cluster.kubeconfig))
    ms = ModelServer.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "model": {"source": "pvc://models/minilm"},
                "replicas": replicas,
                "resources": {"gpus": 0, **PLACEMENT},
                "service": {"httpPort": PORT},
                "triton": {"image": base_image().ref},
            },
        }
    )
    owner = Owner("kubetune.io/v1alpha1", "ModelServer", name, ns, "0" * 8)
    model = ResolvedModel(uri="pvc://models/minilm", revision="r1")
    # No operator runs here to open the smoke-test readiness gate (the stand-in serves no model;
    # tests/integration/test_smoke_gate.py covers the gate): the pods are built without it.
    settings = Settings(fetcher_image="ghcr.io/kubetune/operator:0.1.0", smoke_test_gate=False)
    manifest = build_deployment(ms, owner, model, settings, spare_gpus=0)
    manifest["metadata"].pop("ownerReferences", None)  # no ModelServer object exists here
    [triton] = manifest["spec"]["template"]["spec"]["containers"]
    assert triton["command"] == ["tritonserver"]
    triton.update(command=["python3", "-c", textwrap.dedent(STAND_IN), mode], args=[])
    return client.AppsV1Api(api).create_namespaced_deployment(ns, manifest)


def server_pod(
    core: client.CoreV1Api, ns: str, test: Callable[[Any], Any], timeout: float, what: str
) -> Any:
    """The (only) server pod, once `test` holds for its container's status."""

    def probe() -> Any:
        pods = core.list_namespaced_pod(ns).items
        statuses = pods[0].status.container_statuses if pods else None
        return pods[0] if statuses and test(statuses[0]) else None

    return wait_for(probe, timeout=timeout, what=what)


@pytest.fixture
def ns(served: LocalCluster) -> Iterator[str]:
    api = config.new_client_from_config(str(served.kubeconfig))
    core = client.CoreV1Api(api)
    name = f"serve-{os.urandom(3).hex()}"
    core.create_namespace(
        {"metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    served.kubectl("-n", name, "apply", "-f", str(REPO / "examples" / "pvcs.yaml"))
    pvc = wait_for(
        lambda: (
            (c := core.read_namespaced_persistent_volume_claim("models", name)).spec.volume_name
            and c.status.phase == "Bound"
            and c
        ),
        timeout=60,
        what="the models claim to be bound",
    )
    folder = Path(core.read_persistent_volume(pvc.spec.volume_name).spec.host_path.path)
    shutil.copytree(minilm_checkpoint(), folder / "minilm")
    yield name
    core.delete_namespace(name)


def test_two_replicas_fetch_the_model_and_answer_on_their_own_pod_ips(
    served: LocalCluster, ns: str
) -> None:
    core = client.CoreV1Api(config.new_client_from_config(str(served.kubeconfig)))
    deployment(served, ns, "intents", replicas=2, mode="ready")

    def ready_pods() -> list[Any]:
        pods = core.list_namespaced_pod(ns).items
        ready = [
            p
            for p in pods
            if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return ready if len(ready) == 2 else []

    pods = wait_for(ready_pods, timeout=300, what="two Ready replicas")
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 2
    for ip in ips:  # the host reaches pod IPs on the cluster's bridge
        with urllib.request.urlopen(f"http://{ip}:{PORT}/v2/health/ready", timeout=5) as resp:
            assert json.loads(resp.read())["models"] == ["intents"]


def test_a_server_that_never_becomes_ready_is_not_ready_and_not_restarted(
    served: LocalCluster, ns: str
) -> None:
    core = client.CoreV1Api(config.new_client_from_config(str(served.kubeconfig)))
    deployment(served, ns, "stuck", replicas=1, mode="never-ready")
    pod = server_pod(core, ns, lambda c: c.state.running, 300, "the server to run")
    name = pod.metadata.name
    # The kubelet's startup probe asks /v2/health/ready every 5 s and gets 503: wait for a few
    # of its answers in the kubelet's events, then the pod must still be unready.
    wait_for(
        lambda: [
            e
            for e in core.list_namespaced_event(
                ns, field_selector=f"involvedObject.name={name}"
            ).items
            if e.reason == "Unhealthy" and (e.count or 1) >= 3
        ],
        timeout=120,
        what="the startup probe to fail three times",
    )
    current = core.read_namespaced_pod(name, ns)
    assert not any(c.type == "Ready" and c.status == "True" for c in current.status.conditions)
    assert current.status.container_statuses[0].restart_count == 0  # within its startup budget


def test_a_failing_liveness_probe_restarts_the_server(served: LocalCluster, ns: str) -> None:
    core = client.CoreV1Api(config.new_client_from_config(str(served.kubeconfig)))
    deployment(served, ns, "unhealthy", replicas=1, mode="unhealthy")
    # Six failed liveness probes 10 s apart, then the kubelet restarts it.
    restarted = server_pod(
        core, ns, lambda c: c.restart_count >= 1, 400, "the kubelet to restart the server"
    )
    events = core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={restarted.metadata.name}"
    ).items
    assert any("Liveness probe failed" in (e.message or "") for e in events)
