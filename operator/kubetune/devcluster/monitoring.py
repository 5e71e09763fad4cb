"""Prometheus and prometheus-adapter as components of a local cluster: the monitoring stack an
HPA on Triton's metrics needs, built from their Go modules (`devcluster.gotools`).

Both run as processes on this machine, like the control plane, so `down` stops them:

- **Prometheus** on a free loopback port, with the scrape configurations it is given (static
  targets, or Kubernetes service discovery through the cluster's kubeconfig: on the real node and
  the local node pods' addresses are reachable from here). Its data lives in the cluster's folder.
- **prometheus-adapter** serving `custom.metrics.k8s.io` from that Prometheus with the rules it is
  given, registered with the API server's aggregation layer: an `APIService` per version backed
  by an ExternalName Service that names this machine's loopback address. The API server resolves
  an ExternalName to its name (the aggregator's default, without --enable-aggregator-routing), so
  no Service proxy is needed; an Endpoints or EndpointSlice address could not be loopback. The
  adapter's serving certificate, from the cluster's CA (the APIService's caBundle), is for
  `<service>.<namespace>.svc`, the name the aggregator verifies. It authenticates the API
  server's proxied requests by the front-proxy client certificate and the requestheader settings
  the API server publishes (kube-system/extension-apiserver-authentication).
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubetune.devcluster.cluster import ClusterError, LocalCluster
from kubetune.devcluster.gotools import PROMETHEUS, PROMETHEUS_ADAPTER, ensure_tool
from kubetune.devcluster.pki import Pki

ADAPTER_NAMESPACE = "monitoring"
ADAPTER_SERVICE = "prometheus-adapter"
CUSTOM_METRICS_GROUP = "custom.metrics.k8s.io"
CUSTOM_METRICS_VERSIONS = ("v1beta1", "v1beta2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(0.5)


class Prometheus:
    """A Prometheus server of a local cluster, and its HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` evaluates to now (its `result` list)."""
        args = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{args}", timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise ClusterError(f"Prometheus refused {promql!r}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as resp:
            active: list[dict[str, Any]] = json.load(resp)["data"]["activeTargets"]
            return active


def start_prometheus(
    cluster: LocalCluster,
    scrape_configs: list[dict[str, Any]],
    scrape_interval: str = "5s",
    timeout: float = 60.0,
) -> Prometheus:
    """Prometheus scraping `scrape_configs`, as a component of `cluster`. A `kubernetes_sd_configs`
    entry without `kubeconfig_file` gets the cluster's."""
    binary = str(ensure_tool(PROMETHEUS))
    port = _free_port()
    folder = cluster.dir / f"prometheus-{port}"  # one cluster may have several
    folder.mkdir(parents=True, exist_ok=True)
    configs = json.loads(json.dumps(scrape_configs))
    for job in configs:
        for sd in job.get("kubernetes_sd_configs", []):
            sd.setdefault("kubeconfig_file", str(cluster.kubeconfig))
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": configs,
    }
    config_file = folder / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    cluster.add_component(
        f"prometheus-{port}",
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        marker=binary,
    )
    prometheus = Prometheus(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as resp:
            return bool(resp.status == 200)

    _wait(ready, "Prometheus to be ready", timeout)
    return prometheus


def adapter_config(chart_values: dict[str, Any]) -> dict[str, Any]:
    """The adapter's --config from values of the prometheus-community/prometheus-adapter chart,
    as that chart's ConfigMap template makes it: `rules.custom` become the custom `rules`."""
    rules = chart_values.get("rules") or {}
    return {"rules": list(rules.get("custom") or [])}


def start_adapter(
    cluster: LocalCluster,
    prometheus: Prometheus,
    config: dict[str, Any],
    relist_interval: str = "10s",
    timeout: float = 90.0,
) -> None:
    """prometheus-adapter on `prometheus` with `config` (its rules), registered as the cluster's
    custom.metrics.k8s.io; returns once the API server serves that group through it."""
    from kubernetes import client
    from kubernetes import config as kube_config

    binary = str(ensure_tool(PROMETHEUS_ADAPTER))
    folder = cluster.dir / "prometheus-adapter"
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    pki = Pki(cluster.dir / "pki")
    service_name = f"{ADAPTER_SERVICE}.{ADAPTER_NAMESPACE}.svc"
    serving = pki.issue(
        "prometheus-adapter",
        ADAPTER_SERVICE,
        sans=[service_name, "localhost", "127.0.0.1"],
        server=True,
    )
    port = _free_port()
    kubeconfig = str(cluster.kubeconfig)
    cluster.add_component(
        "prometheus-adapter",
        [
            binary,
            f"--prometheus-url={prometheus.url}",
            f"--config={config_file}",
            f"--metrics-relist-interval={relist_interval}",
            f"--lister-kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--cert-dir={folder}",
            "--v=1",
        ],
        marker=binary,
    )
    api = kube_config.new_client_from_config(kubeconfig)
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": ADAPTER_NAMESPACE}})
    core.create_namespaced_service(
        ADAPTER_NAMESPACE,
        {
            "metadata": {"name": ADAPTER_SERVICE},
            "spec": {"type": "ExternalName", "externalName": "127.0.0.1"},
        },
    )
    registration = client.ApiregistrationV1Api(api)
    ca_bundle = Path(pki.ca.cert).read_bytes()
    for version in CUSTOM_METRICS_VERSIONS:
        registration.create_api_service(
            {
                "metadata": {"name": f"{version}.{CUSTOM_METRICS_GROUP}"},
                "spec": {
                    "group": CUSTOM_METRICS_GROUP,
                    "version": version,
                    "service": {
                        "namespace": ADAPTER_NAMESPACE,
                        "name": ADAPTER_SERVICE,
                        "port": port,
                    },
                    "caBundle": base64.b64encode(ca_bundle).decode(),
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100 if version == "v1beta2" else 50,
                },
            }
        )

    def available() -> bool:
        for version in CUSTOM_METRICS_VERSIONS:
            item = registration.read_api_service(f"{version}.{CUSTOM_METRICS_GROUP}")
            conditions = item.status.conditions if item.status else None
            if not any(c.type == "Available" and c.status == "True" for c in conditions or []):
                return False
        return True

    try:
        _wait(available, "the custom metrics APIService to be Available", timeout)
    except ClusterError as err:
        log = cluster.logs / "prometheus-adapter.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise ClusterError(f"{err}; the adapter's log:\n{tail}") from None


def pods_metric(cluster: LocalCluster, namespace: str, metric: str) -> dict[str, str]:
    """`GET /apis/custom.metrics.k8s.io/v1beta2/namespaces/NS/pods/*/METRIC`, what the HPA
    controller reads: pod name -> value (a Kubernetes quantity), {} when it has none yet."""
    path = f"/apis/{CUSTOM_METRICS_GROUP}/v1beta2/namespaces/{namespace}/pods/*/{metric}"
    try:
        data = json.loads(cluster.kubectl("get", "--raw", path))
    except ClusterError as err:
        if "NotFound" in str(err) or "not find" in str(err):
            return {}
        raise
    return {item["describedObject"]["name"]: str(item["value"]) for item in data.get("items", [])}
