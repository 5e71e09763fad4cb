"""`python -m kubetune.devcluster.provisioner --kubeconfig K --root DIR`: the local cluster's
dynamic provisioner and its default StorageClass `local`, as on a real cluster.

A claim of class `local` gets a PersistentVolume of its own: a folder
`DIR/<namespace>-<claim>-<uid>` of this machine (mode 0777, as Rancher's local-path makes them:
pods run as uid 1000), bound to the claim through its claimRef; the PV controller does the
binding. When the claim is deleted, the volume (reclaim policy Delete) and its folder go.

Written here rather than running Rancher's local-path-provisioner: that one creates and removes
its folders through helper pods of a busybox image, which no registry can serve here; the node
is this machine, so the folder is made directly.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

CLASS = "local"
PROVISIONER = "kubetune.io/local"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"

STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {
        "name": CLASS,
        "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
    },
    "provisioner": PROVISIONER,
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}


def volume_for(claim: Any, root: Path) -> dict[str, Any]:
    meta = claim.metadata
    folder = root / f"{meta.namespace}-{meta.name}-{meta.uid[:8]}"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta.uid}", "annotations": {PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": claim.spec.resources.requests["storage"]},
            "accessModes": claim.spec.access_modes,
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": CLASS,
            "hostPath": {"path": str(folder), "type": "Directory"},
            "claimRef": {"namespace": meta.namespace, "name": meta.name, "uid": meta.uid},
        },
    }


class Provisioner:
    def __init__(self, api: client.ApiClient, root: Path) -> None:
        self.core = client.CoreV1Api(api)
        self.storage = client.StorageV1Api(api)
        self.root = root

    def ensure_class(self) -> None:
        try:
            self.storage.create_storage_class(STORAGE_CLASS)
        except ApiException as err:
            if err.status != 409:
                raise

    def claim(self, claim: Any) -> None:
        wanted = claim.spec.storage_class_name == CLASS and not claim.spec.volume_name
        if not wanted or claim.metadata.deletion_timestamp or claim.status.phase != "Pending":
            return
        pv = volume_for(claim, self.root)
        folder = Path(pv["spec"]["hostPath"]["path"])
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
        try:
            self.core.create_persistent_volume(pv)
        except ApiException as err:
            if err.status != 409:
                raise

    def volume(self, pv: Any) -> None:
        ours = (pv.metadata.annotations or {}).get(PROVISIONED_BY) == PROVISIONER
        if not ours or pv.status.phase != "Released":
            return
        folder = Path(pv.spec.host_path.path)
        if folder.parent == self.root:
            shutil.rmtree(folder, ignore_errors=True)
        try:
            self.core.delete_persistent_volume(pv.metadata.name)
        except ApiException as err:
            if err.status != 404:
                raise

    def run(self) -> None:
        self.ensure_class()
        volumes = threading.Thread(
            target=_watch, args=(self.core.list_persistent_volume, self.volume), daemon=True
        )
        volumes.start()
        _watch(self.core.list_persistent_volume_claim_for_all_namespaces, self.claim)


def _watch(lister: Callable[..., Any], handle: Callable[[Any], None]) -> None:
    """List, handle each, then watch from that list's version; again when the watch ends or
    the API server goes away for a moment."""
    while True:
        try:
            listed = lister()
            for item in listed.items:
                handle(item)
            version = listed.metadata.resource_version
            for event in watch.Watch().stream(
                lister, resource_version=version, timeout_seconds=300
            ):
                handle(event["object"])
        except (ApiException, OSError) as err:
            print(f"provisioner: {err}; listing again", flush=True)
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", required=True, type=Path)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    Provisioner(config.new_client_from_config(args.kubeconfig), args.root).run()


if __name__ == "__main__":
    main()
