"""What the handlers read from memory instead of the API server: kopf indexes, filled from the
watches before any handler runs and kept current by them.

Each index keeps a small projection, not the whole object, so the operator's memory grows by a
few hundred bytes per pod, not by the size of every pod spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from kubetune.api.v1alpha1.base import API_VERSION
from kubetune.api.v1alpha1.finetunejob import KIND as FTJ_KIND
from kubetune.api.v1alpha1.modelserver import PLURAL as MS_PLURAL
from kubetune.builders.common import FTJ_LABEL, MANAGED_BY, MS_LABEL
from kubetune.builders.serving import REVISION_ANNOTATION

GROUP, VERSION = API_VERSION.split("/")
FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass
class Indexes:
    """The live indexes (kopf passes them to every handler as keyword arguments)."""

    pods: Mapping[Any, Iterable[dict[str, Any]]] = field(default_factory=dict)
    gpu_use: Mapping[Any, Iterable[dict[str, int]]] = field(default_factory=dict)
    nodes: Mapping[Any, Iterable[dict[str, Any]]] = field(default_factory=dict)
    servers_by_job: Mapping[Any, Iterable[str]] = field(default_factory=dict)
    claims: Mapping[Any, Iterable[bool]] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Indexes | None:
        if "kubetune_pods" not in kwargs:
            return None
        return cls(
            pods=kwargs["kubetune_pods"],
            gpu_use=kwargs["gpu_use_by_node"],
            nodes=kwargs["gpu_nodes"],
            servers_by_job=kwargs["servers_by_job"],
            claims=kwargs["claims"],
        )

    def pods_of(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        return list(self.pods.get((namespace, kind, name)) or [])

    def has_claim(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self.claims

    def servers_following(self, namespace: str, job: str) -> list[str]:
        return sorted(set(self.servers_by_job.get((namespace, job)) or []))

    def node_list(self) -> list[dict[str, Any]]:
        return [view for store in self.nodes.values() for view in store]

    def gpus_in_use(self, node: str) -> dict[str, int]:
        used: dict[str, int] = {}
        for item in self.gpu_use.get(node) or []:
            for resource, count in item.items():
                used[resource] = used.get(resource, 0) + count
        return used


def pod_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a pod that the status builders read."""
    meta, spec, status = (
        body.get("metadata") or {},
        body.get("spec") or {},
        body.get("status") or {},
    )
    annotations = meta.get("annotations") or {}

    def containers(items: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        keep = ("name", "ready", "restartCount", "state", "lastState")
        return [{k: item[k] for k in keep if k in item} for item in items or []]

    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "annotations": {k: v for k, v in annotations.items() if k == REVISION_ANNOTATION},
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {"nodeName": spec.get("nodeName")},
        "status": {
            "phase": status.get("phase"),
            "startTime": status.get("startTime"),
            "podIP": status.get("podIP"),
            "conditions": [
                c
                for c in status.get("conditions") or []
                if c.get("type") in ("PodScheduled", "Ready")
            ],
            "containerStatuses": containers(status.get("containerStatuses")),
            "initContainerStatuses": containers(status.get("initContainerStatuses")),
        },
    }


@kopf.index("", "v1", "pods", labels={MANAGED_BY: "kubetune"})
def kubetune_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    """kubetune's pods by (namespace, owner kind, owner name)."""
    if labels.get(FTJ_LABEL):
        return {(namespace, FTJ_KIND, labels[FTJ_LABEL]): pod_view(body)}
    if labels.get(MS_LABEL):
        return {(namespace, "ModelServer", labels[MS_LABEL]): pod_view(body)}
    return None


def _gpu_requests(spec: Mapping[str, Any]) -> dict[str, int]:
    wanted: dict[str, int] = {}
    for container in spec.get("containers") or []:
        requests = (container.get("resources") or {}).get("requests") or {}
        for resource, amount in requests.items():
            if "gpu" in resource or "/mig-" in resource:
                wanted[resource] = wanted.get(resource, 0) + int(amount)
    return wanted


@kopf.index("", "v1", "pods")
def gpu_use_by_node(spec: kopf.Spec, status: kopf.Status, **_: Any) -> Any:
    """GPUs held by the pods bound to each node (every pod's, kubetune's or not)."""
    node = spec.get("nodeName")
    if not node or status.get("phase") in FINISHED_PHASES:
        return None
    wanted = _gpu_requests(spec)
    return {node: wanted} if wanted else None


@kopf.index("", "v1", "nodes")
def gpu_nodes(
    name: str, labels: kopf.Labels, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> Any:
    """Nodes with what placement and energy need: labels, taints, GPU capacity."""
    allocatable = status.get("allocatable") or {}
    return {
        name: {
            "name": name,
            "labels": dict(labels),
            "taints": list(spec.get("taints") or []),
            "unschedulable": bool(spec.get("unschedulable")),
            "gpus": {k: int(v) for k, v in allocatable.items() if "gpu" in k or "/mig-" in k},
        }
    }


@kopf.index("", "v1", "persistentvolumeclaims")
def claims(name: str, namespace: str | None, **_: Any) -> Any:
    """The claims that exist, by (namespace, name): a FineTuneJob's pvc:// sources are checked
    here, not read from the API server at every reconcile (the claim watch is there anyway, for
    the jobs that wait for one)."""
    return {(namespace, name): True}


@kopf.index(GROUP, VERSION, MS_PLURAL)
def servers_by_job(name: str, namespace: str | None, spec: kopf.Spec, **_: Any) -> Any:
    """ModelServers by the FineTuneJob they serve: a job's change reaches them at once."""
    ref = (spec.get("model") or {}).get("fineTuneJobRef") or {}
    return {(namespace, ref["name"]): name} if ref.get("name") else None
