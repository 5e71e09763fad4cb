"""Kueue's manager (sigs.k8s.io/kueue cmd/kueue, built by gotools) run against a local cluster.

`start_kueue(cluster)` installs Kueue's CRDs from its module (config/components/crd/bases), writes
a Configuration of this cluster's own (ports picked free on loopback, no leader election, the
batch/job integration only) and starts the manager as a component of the cluster (`down` stops
it, `status` reports it), then waits for its readiness endpoint.

Webhooks: Kueue always serves its webhook server, and its internal certificate management (on,
as in Kueue's own release manifests) generates the serving certificate into the Secret
`kueue-webhook-server-cert`; start_kueue copies it into the folder the server reads, as the
kubelet's Secret volume would. The webhooks are not registered with
the API server (no Validating/MutatingWebhookConfiguration; the rotator skips those it does not
find): a registered webhook is called at an address the API server must reach with a certificate
for it, and Kueue's certificate names only its in-cluster Service, which nothing serves here.
Nothing they do is needed: the mutating Job webhook suspends Jobs that name a queue, and kubetune
creates its Jobs suspended itself (handlers/finetunejob.py `_create_suspended_for_kueue`); the
validating ones check the queue objects, which the tests write valid. The CRDs carry the
conversion stanza of Kueue's kustomize patches (the rotator insists on injecting a CA bundle
there), pointing at the local webhook server; every client uses the storage version v1beta2, so
no conversion is asked for.
"""

from __future__ import annotations

import base64
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubetune.devcluster.cluster import ClusterError, LocalCluster, _tail
from kubetune.devcluster.gotools import KUEUE, ensure_tool, module_dir

API_VERSION = "kueue.x-k8s.io/v1beta2"
NAMESPACE = "kueue-system"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
# The CRDs whose conversion webhook Kueue's certificate rotator fills in (pkg/util/cert).
CONVERTED = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def crds(webhook_port: int) -> list[dict[str, Any]]:
    """Kueue's CRDs as its module ships them, with the conversion stanza its kustomize adds."""
    bases = module_dir(KUEUE) / "config" / "components" / "crd" / "bases"
    result = []
    for path in sorted(bases.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"https://127.0.0.1:{webhook_port}/convert"},
                    "conversionReviewVersions": ["v1"],
                },
            }
        result.append(crd)
    return result


def configuration(health_port: int, webhook_port: int, cert_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": True},
        "integrations": {"frameworks": ["batch/job"]},
        "clientConnection": {"qps": 50, "burst": 100},
    }


def _mount_secret(core: Any, folder: Path, deadline: float) -> None:
    """Write the webhook Secret's files into the folder the webhook server reads, once Kueue's
    rotator has filled it in: what the kubelet does for the Secret volume of Kueue's pod (the
    rotator waits for the files before it says it is ready)."""
    while time.monotonic() < deadline:
        data = core.read_namespaced_secret(WEBHOOK_SECRET, NAMESPACE).data or {}
        if data.get("tls.crt") and data.get("tls.key"):
            folder.mkdir(parents=True, exist_ok=True)
            for key, value in data.items():
                path = folder / key
                path.write_bytes(base64.b64decode(value))
                path.chmod(0o600)
            return
        time.sleep(0.5)
    raise ClusterError(f"Kueue did not fill in the Secret {NAMESPACE}/{WEBHOOK_SECRET}")


def start_kueue(cluster: LocalCluster, timeout: float = 180.0) -> None:
    """Install Kueue's CRDs and run its manager against `cluster` until it is ready."""
    from kubernetes import client, config

    binary = ensure_tool(KUEUE)
    folder = cluster.dir / "kueue"
    folder.mkdir(parents=True, exist_ok=True)
    health_port, webhook_port = _free_port(), _free_port()
    api = config.new_client_from_config(str(cluster.kubeconfig))
    ext = client.ApiextensionsV1Api(api)
    names = []
    for crd in crds(webhook_port):
        ext.create_custom_resource_definition(crd)
        names.append(crd["metadata"]["name"])
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    # Empty, as Kueue's release manifests ship it: the rotator fills it in, and waits for it.
    core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": WEBHOOK_SECRET}})
    settings = folder / "config.yaml"
    settings.write_text(yaml.safe_dump(configuration(health_port, webhook_port, folder / "certs")))
    deadline = time.monotonic() + timeout
    for name in names:
        while not any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(name).status.conditions or []
        ):
            if time.monotonic() > deadline:
                raise ClusterError(f"Kueue's CRD {name} was not established in {timeout:.0f}s")
            time.sleep(0.2)
    cluster.add_component(
        "kueue",
        # The on-demand visibility API is an aggregated API server of its own, which reads the
        # in-cluster configuration only (and binds :8082): off, nothing here asks it.
        [
            str(binary),
            f"--config={settings}",
            "--feature-gates=VisibilityOnDemand=false",
            "--zap-log-level=2",
        ],
        marker=str(binary),
        env=cluster.python_env(),  # KUBECONFIG: the cluster's admin
    )
    _mount_secret(core, folder / "certs", deadline)
    while time.monotonic() < deadline:
        if any(c.name == "kueue" for c in cluster.dead_components()):
            raise ClusterError(f"Kueue exited:\n{_tail(cluster.logs / 'kueue.log')}")
        try:
            url = f"http://127.0.0.1:{health_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ClusterError(
        f"Kueue not ready after {timeout:.0f}s:\n{_tail(cluster.logs / 'kueue.log', 40)}"
    )
