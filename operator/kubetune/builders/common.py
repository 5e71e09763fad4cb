"""Pieces every child manifest shares: names, labels, owner references, restricted security."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune import __version__
from kubetune.api.v1alpha1.base import SchedulingSpec
from kubetune.api.v1alpha1.modelserver import DEFAULT_TRITON_IMAGE, DEFAULT_VLLM_IMAGE

MANAGED_BY = "app.kubernetes.io/managed-by"
PART_OF = "app.kubernetes.io/part-of"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
FTJ_LABEL = "kubetune.io/finetunejob"
MS_LABEL = "kubetune.io/modelserver"
NON_ROOT_UID = 1000
# Every path a kubetune pod uses lives under /kubetune (the termination message too), so a node
# that lays out the pod's filesystem itself (the local node) needs no folder outside it.
POD_ROOT = "/kubetune"
TERMINATION_LOG = f"{POD_ROOT}/termination-log"


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns the children being built."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str
    generation: int = 1

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(
            api_version=body["apiVersion"],
            kind=body["kind"],
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 1),
        )

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


GPU_WATTS = {
    "NVIDIA-H100-80GB-HBM3": 700.0,
    "NVIDIA-H100-PCIe": 350.0,
    "NVIDIA-H200": 700.0,
    "NVIDIA-A100-SXM4-80GB": 400.0,
    "NVIDIA-A100-SXM4-40GB": 400.0,
    "NVIDIA-A100-PCIE-40GB": 250.0,
    "NVIDIA-L40S": 350.0,
    "NVIDIA-L4": 72.0,
    "Tesla-T4": 70.0,
}


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that shape the children (images, defaults)."""

    trainer_image: str = f"ghcr.io/kubetune/trainer:{__version__}"
    # The Triton image carries kubetune and transformers: one image pull for both containers.
    fetcher_image: str = f"ghcr.io/kubetune/triton:{__version__}"
    # The Triton images of a ModelServer, by runtime (spec.triton.image overrides them).
    triton_image: str = DEFAULT_TRITON_IMAGE
    vllm_image: str = DEFAULT_VLLM_IMAGE
    # ModelServer pods carry the smoke-test readiness gate (SMOKE_TEST_CONDITION), which the
    # operator opens per pod (handlers/modelserver.py, open_gates). KUBETUNE_SMOKE_TEST_GATE=false
    # turns it off (then the smoke test only runs after a rollout, as before).
    smoke_test_gate: bool = True
    master_port: int = 29500
    # Board power by `nvidia.com/gpu.product` node label (GPU feature discovery's), for
    # status.energyKwh; the chart's values extend it. Unknown products count default_gpu_watts.
    gpu_watts: Mapping[str, float] = field(default_factory=lambda: dict(GPU_WATTS))
    default_gpu_watts: float = 700.0
    # --- issue 10 (pre-flight check): begin
    # Run the no-GPU pre-flight Job (sources reachable, memory plan) before the training Job.
    preflight: bool = False
    # --- issue 10 (pre-flight check): end
    # The operator's namespace when it runs in the cluster (its ServiceAccount's namespace
    # file): a ModelServer's NetworkPolicy admits it to the HTTP port, for the smoke test.
    operator_namespace: str | None = None


def child_name(owner_name: str, suffix: str = "", limit: int = 63) -> str:
    """A DNS-1123 label from the owner's name; long names are shortened with a stable hash."""
    name = f"{owner_name}-{suffix}" if suffix else owner_name
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = limit - len(digest) - len(suffix) - 2
    return (
        f"{owner_name[:keep].rstrip('-')}-{digest}-{suffix}"
        if suffix
        else f"{name[: limit - 9]}-{digest}"
    )


def labels(owner: Owner, component: str) -> dict[str, str]:
    kind_label = FTJ_LABEL if owner.kind == "FineTuneJob" else MS_LABEL
    return {
        MANAGED_BY: "kubetune",
        PART_OF: "kubetune",
        NAME_LABEL: owner.kind.lower(),
        INSTANCE_LABEL: owner.name,
        COMPONENT_LABEL: component,
        kind_label: owner.name,
    }


def selector_labels(owner: Owner) -> dict[str, str]:
    """The immutable subset used in selectors (a Deployment's selector cannot change)."""
    kind_label = FTJ_LABEL if owner.kind == "FineTuneJob" else MS_LABEL
    return {MANAGED_BY: "kubetune", kind_label: owner.name}


def metadata(owner: Owner, name: str, component: str, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [owner.reference()],
    }
    meta.update(extra)
    return meta


def pod_security_context() -> dict[str, Any]:
    """Pod-level settings of the Pod Security "restricted" profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "fsGroup": NON_ROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Container-level settings of the Pod Security "restricted" profile."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def resource_requirements(
    cpu: str | None, memory: str | None, gpus: int, gpu_resource: str
) -> dict[str, Any]:
    """Requests equal to limits (Guaranteed QoS when cpu and memory are set); GPUs both ways."""
    amounts: dict[str, str] = {}
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    if gpus:
        amounts[gpu_resource] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def gpu_tolerations(gpus: int, gpu_resource: str) -> list[dict[str, Any]]:
    """GPU nodes are often tainted with the GPU resource name: tolerate it when asking for GPUs."""
    if not gpus:
        return []
    return [{"key": gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]


def placement(scheduling: SchedulingSpec, gpus: int, gpu_resource: str) -> dict[str, Any]:
    """The pod-spec fields that say where pods may run: the user's nodeSelector, tolerations
    (plus the GPU taint's when GPUs are asked for), affinity and priority class."""
    fields: dict[str, Any] = {}
    if scheduling.node_selector:
        fields["nodeSelector"] = dict(scheduling.node_selector)
    tolerations = gpu_tolerations(gpus, gpu_resource) + [
        t.to_wire() for t in scheduling.tolerations
    ]
    if tolerations:
        fields["tolerations"] = tolerations
    if scheduling.affinity and (affinity := scheduling.affinity.to_wire()):
        fields["affinity"] = affinity
    if scheduling.priority_class_name:
        fields["priorityClassName"] = scheduling.priority_class_name
    return fields


def shm_volume(size: str) -> dict[str, Any]:
    """/dev/shm as memory: Kubernetes gives containers 64 MB, too little for data loaders and
    Triton's python backend."""
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def split_uri(uri: str) -> tuple[str, str, str]:
    """'pvc://claim/some/path' -> ('pvc', 'claim', 'some/path')."""
    scheme, _, rest = uri.partition("://")
    head, _, tail = rest.partition("/")
    return scheme, head, tail.strip("/")
