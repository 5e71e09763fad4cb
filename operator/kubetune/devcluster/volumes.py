"""Volumes for the local cluster: a PersistentVolume backed by a folder of this machine, bound
to a claim, so pods that mount `pvc://claim/...` schedule (and a local node can read the files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException


def claim_manifests(
    namespace: str, claim: str, host_dir: Path, size: str = "10Gi"
) -> list[dict[str, Any]]:
    pv_name = f"kubetune-{namespace}-{claim}"[:253]
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "labels": {"kubetune.io/local-volume": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteMany", "ReadWriteOnce", "ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(host_dir), "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": size}},
        },
    }
    return [pv, pvc]


def ensure_claim(api: client.ApiClient, namespace: str, claim: str, host_dir: Path) -> Path:
    """Create (idempotently) a claim bound to `host_dir`; returns the folder."""
    host_dir.mkdir(parents=True, exist_ok=True)
    # Writable by the pods' non-root user, as a dynamic provisioner's volumes are (Rancher's
    # local-path makes its folders 0777): on the real node a pod runs as uid 1000.
    host_dir.chmod(0o777)
    core = client.CoreV1Api(api)
    pv, pvc = claim_manifests(namespace, claim, host_dir)
    for create, body in (
        (core.create_persistent_volume, pv),
        (lambda b: core.create_namespaced_persistent_volume_claim(namespace, b), pvc),
    ):
        try:
            create(body)
        except ApiException as err:
            if err.status != 409:
                raise
    return host_dir
