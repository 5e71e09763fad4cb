"""ModelServer -> a Triton Deployment, its Service, and (when asked) HPA, PDB and NetworkPolicy.

The model reaches Triton through an init container that fetches it from its source into an
emptyDir model repository (credentials mounted there only) and records its checksum; Triton runs
with model control `none`, strict readiness, and probes on its own health endpoints, so a pod is
Ready only when the model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1.modelserver import (
    SMOKE_TEST_CONDITION,
    AutoscalingMetric,
    ModelServer,
    ModelServerSpec,
    NetworkSource,
    RolloutStrategy,
    Runtime,
    default_runtime,
)
from kubetune.builders.common import (
    TERMINATION_LOG,
    Owner,
    Settings,
    container_security_context,
    metadata,
    placement,
    pod_security_context,
    resource_requirements,
    selector_labels,
    shm_volume,
    split_uri,
)

MODEL_REPOSITORY = "/kubetune/models"
SOURCE_ROOT = "/kubetune/source"
REVISION_ANNOTATION = "kubetune.io/model-revision"
DRAIN_SECONDS = 15
STARTUP_BUDGET_SECONDS = 900
PODS_METRICS = {
    # Served by prometheus-adapter from Triton's own counters (the rules ship in
    # examples/monitoring/prometheus-adapter-values.yaml; tests/unit/test_monitoring.py).
    AutoscalingMetric.QUEUE_TIME: "triton_queue_time_per_request_us",
    AutoscalingMetric.PENDING_REQUESTS: "nv_inference_pending_request_count",
    AutoscalingMetric.REQUESTS_PER_SECOND: "triton_requests_per_second",
    AutoscalingMetric.GPU_UTILIZATION: "triton_gpu_utilization_percent",
    # From the vLLM backend's own metrics (vllm:time_to_first_token_seconds,
    # vllm:generation_tokens_total), exported on Triton's metrics port.
    AutoscalingMetric.TIME_TO_FIRST_TOKEN: "vllm_time_to_first_token_us",
    AutoscalingMetric.GENERATION_TOKENS_PER_SECOND: "vllm_generation_tokens_per_second",
}
# /dev/shm per GPU of a tensor-parallel vLLM replica: NCCL moves activations between the GPUs
# of one pod through shared memory (vLLM's own docs ask for several GiB).
SHM_PER_TP_GPU_BYTES = 2 * 1024**3
# Where the vLLM runtime keeps what it writes: the root filesystem is read-only and the user
# has no home; /tmp is an emptyDir.
VLLM_ENV = {
    "HOME": "/tmp",
    "HF_HOME": "/tmp/huggingface",
    "VLLM_CACHE_ROOT": "/tmp/vllm",
    "XDG_CACHE_HOME": "/tmp/cache",
    "HF_HUB_OFFLINE": "1",  # the model is in the repository; never reach for a hub
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class ResolvedModel:
    """What the pods will serve: where it comes from, and a revision that changes with it."""

    uri: str
    revision: str
    task: str = "sequence-classification"
    rolled_back_from: str | None = None  # the revision that failed its smoke test
    # Unmerged LoRA adapters served by vLLM next to the base model in ``uri``: (name, source).
    lora_adapters: tuple[tuple[str, str], ...] = ()


def runtime(spec: ModelServerSpec, model: ResolvedModel) -> Runtime:
    """spec.runtime, else by task: causal LMs on vLLM, the rest on the python backend."""
    return Runtime(spec.runtime) if spec.runtime is not None else default_runtime(model.task)


def triton_image(spec: ModelServerSpec, model: ResolvedModel, settings: Settings) -> str:
    if spec.triton.image:
        return spec.triton.image
    return settings.vllm_image if runtime(spec, model) == Runtime.VLLM else settings.triton_image


def tensor_parallel_size(spec: ModelServerSpec) -> int:
    """vLLM shards the model over every GPU of the replica (1 on CPU)."""
    return max(1, spec.resources.gpus)


def autoscaling_metric(spec: ModelServerSpec, model: ResolvedModel) -> AutoscalingMetric | None:
    """The metric the HPA targets. On vLLM, queue-time means the time to first token: the vLLM
    backend takes every request from Triton's queue at once (it is decoupled) and queues it in
    its engine, so Triton's own queue time stays near zero however loaded the replica is."""
    if spec.autoscaling is None:
        return None
    metric = AutoscalingMetric(spec.autoscaling.metric)
    if metric == AutoscalingMetric.QUEUE_TIME and runtime(spec, model) == Runtime.VLLM:
        return AutoscalingMetric.TIME_TO_FIRST_TOKEN
    return metric


_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(quantity: str) -> int:
    """Bytes of a memory quantity ('1Gi', '512M', '1048576'); the API's pattern has checked it."""
    for suffixes in (_BINARY, _DECIMAL):
        for suffix, factor in suffixes.items():
            if quantity.endswith(suffix):
                return int(float(quantity.removesuffix(suffix)) * factor)
    return int(float(quantity))


def shm_size(spec: ModelServerSpec, model: ResolvedModel) -> str:
    """spec.triton.shmSize, raised to 2 GiB per GPU for a tensor-parallel vLLM replica."""
    wanted = spec.triton.shm_size
    tp = tensor_parallel_size(spec)
    if runtime(spec, model) != Runtime.VLLM or tp == 1:
        return wanted
    floor = tp * SHM_PER_TP_GPU_BYTES
    return wanted if quantity_bytes(wanted) >= floor else f"{floor // 1024**3}Gi"


def model_name(ms: ModelServer, owner: Owner) -> str:
    return ms.spec.model.name or owner.name.replace("-", "_")


def desired_replicas(spec: ModelServerSpec) -> int | None:
    """None when the autoscaler owns the count."""
    if spec.autoscaling is not None:
        return None
    return 1 if spec.replicas is None else spec.replicas


def max_replicas(spec: ModelServerSpec) -> int:
    return spec.autoscaling.max_replicas if spec.autoscaling else (desired_replicas(spec) or 0)


def rollout_strategy(spec: ModelServerSpec, spare_gpus: int) -> dict[str, Any]:
    """Surge when a spare GPU exists (no capacity lost), else replace one pod at a time (a surge
    pod would wait forever for a GPU and deadlock the rollout)."""
    strategy = RolloutStrategy(spec.rollout.strategy)
    per_pod = spec.resources.gpus
    if strategy == RolloutStrategy.AUTO:
        strategy = (
            RolloutStrategy.SURGE
            if per_pod == 0 or spare_gpus >= per_pod
            else RolloutStrategy.REPLACE
        )
    if strategy == RolloutStrategy.SURGE:
        update = {"maxSurge": 1, "maxUnavailable": 0}
    else:
        update = {"maxSurge": 0, "maxUnavailable": 1}
    return {"type": "RollingUpdate", "rollingUpdate": update}


def _fetch_container(
    ms: ModelServer, owner: Owner, model: ResolvedModel, settings: Settings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    scheme, claim, path = split_uri(model.uri)
    mounts: list[dict[str, Any]] = [
        {"name": "model-repository", "mountPath": MODEL_REPOSITORY},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = []
    source = model.uri
    if scheme == "pvc":
        volumes.append(
            {"name": "source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": "source", "mountPath": f"{SOURCE_ROOT}/{claim}", "readOnly": True})
        source = f"{SOURCE_ROOT}/{claim}/{path}"
    env: list[dict[str, Any]] = []
    ref = ms.spec.model.secret_ref
    if ref is not None:
        keys = ("HF_TOKEN",) if scheme == "hf" else S3_KEYS
        env = [
            {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key, "optional": True}},
            }
            for key in keys
        ]
    container = {
        "name": "fetch-model",
        "image": settings.fetcher_image,
        "command": ["python", "-m", "kubetune.serving.fetch"],
        "args": [
            f"--source={source}",
            f"--dest={MODEL_REPOSITORY}",
            f"--model-name={model_name(ms, owner)}",
            f"--task={model.task}",
            f"--max-batch-size={ms.spec.triton.max_batch_size}",
            f"--instance-count={ms.spec.triton.instance_count}",
            f"--dynamic-batching={'true' if ms.spec.triton.dynamic_batching.enabled else 'false'}",
            f"--max-queue-delay-us={ms.spec.triton.dynamic_batching.max_queue_delay_microseconds}",
            *[
                f"--preferred-batch-size={s}"
                for s in ms.spec.triton.dynamic_batching.preferred_batch_sizes
            ],
            *_vllm_fetch_args(ms, model),
        ],
        "env": [*env, {"name": "KUBETUNE_TERMINATION_LOG", "value": TERMINATION_LOG}],
        # Triton's CPU and memory (no GPUs): an init container's requests do not add to the
        # pod's (the larger of init and app containers counts), and it gets a bounded share.
        "resources": resource_requirements(
            ms.spec.resources.cpu, ms.spec.resources.memory, 0, ms.spec.resources.gpu_resource_name
        ),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return container, volumes


def _vllm_fetch_args(ms: ModelServer, model: ResolvedModel) -> list[str]:
    """The vLLM runtime's repository: engine settings as one JSON argument (validated again by
    the fetcher against the same API model), the tensor-parallel size, the adapters."""
    if runtime(ms.spec, model) != Runtime.VLLM:
        return []
    settings = json.dumps(ms.spec.vllm.model_dump(by_alias=True, mode="json"), sort_keys=True)
    return [
        "--runtime=vllm",
        f"--tensor-parallel-size={tensor_parallel_size(ms.spec)}",
        f"--vllm={settings}",
        *[f"--lora-adapter={name}={source}" for name, source in model.lora_adapters],
    ]


def _triton_container(ms: ModelServer, model: ResolvedModel, settings: Settings) -> dict[str, Any]:
    spec = ms.spec
    svc = spec.service
    res = spec.resources
    health = {"path": "/v2/health/ready", "port": "http"}
    env = (
        [{"name": k, "value": v} for k, v in VLLM_ENV.items()]
        if runtime(spec, model) == Runtime.VLLM
        else []
    )
    return {
        "name": "triton",
        "image": triton_image(spec, model, settings),
        **({"env": env} if env else {}),
        "command": ["tritonserver"],
        "args": [
            f"--model-repository={MODEL_REPOSITORY}",
            f"--model-control-mode={spec.triton.model_control_mode}",
            "--strict-readiness=true",
            f"--http-port={svc.http_port}",
            f"--grpc-port={svc.grpc_port}",
            f"--metrics-port={svc.metrics_port}",
            "--allow-metrics=true",
            "--exit-timeout-secs=30",
        ],
        "ports": [
            {"name": "http", "containerPort": svc.http_port},
            {"name": "grpc", "containerPort": svc.grpc_port},
            {"name": "metrics", "containerPort": svc.metrics_port},
        ],
        "resources": resource_requirements(res.cpu, res.memory, res.gpus, res.gpu_resource_name),
        "startupProbe": {
            "httpGet": health,
            "periodSeconds": 5,
            "failureThreshold": STARTUP_BUDGET_SECONDS // 5,
        },
        "readinessProbe": {"httpGet": health, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        # Endpoints drop the pod first; in-flight requests finish before Triton is told to stop.
        "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_SECONDS}}},
        "volumeMounts": [
            {"name": "model-repository", "mountPath": MODEL_REPOSITORY, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_deployment(
    ms: ModelServer, owner: Owner, model: ResolvedModel, settings: Settings, spare_gpus: int
) -> dict[str, Any]:
    spec = ms.spec
    res = spec.resources
    fetch, source_volumes = _fetch_container(ms, owner, model, settings)
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
        "initContainers": [fetch],
        "containers": [_triton_container(ms, model, settings)],
        "volumes": [
            {"name": "model-repository", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            shm_volume(shm_size(spec, model)),
            *source_volumes,
        ],
        "terminationGracePeriodSeconds": DRAIN_SECONDS + 30,
    }
    pod_spec.update(placement(res, res.gpus, res.gpu_resource_name))
    if settings.smoke_test_gate and spec.rollout.smoke_test.enabled:
        # Ready only once the operator has set this condition, after this pod passed its smoke
        # test: a pod that answers wrongly never joins the Service (serving/gate.py).
        pod_spec["readinessGates"] = [{"conditionType": SMOKE_TEST_CONDITION}]
    deploy_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(owner)},
        "strategy": rollout_strategy(spec, spare_gpus),
        "revisionHistoryLimit": 5,
        "minReadySeconds": 0,
        "progressDeadlineSeconds": STARTUP_BUDGET_SECONDS + 60,
        "template": {
            "metadata": {
                "labels": selector_labels(owner) | {"app.kubernetes.io/component": "triton"},
                "annotations": {
                    REVISION_ANNOTATION: model.revision,
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(spec.service.metrics_port),
                },
            },
            "spec": pod_spec,
        },
    }
    replicas = desired_replicas(spec)
    if replicas is not None:  # with autoscaling the HPA owns .spec.replicas: never write it
        deploy_spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, owner.name, "triton"),
        "spec": deploy_spec,
    }


def build_service(ms: ModelServer, owner: Owner) -> dict[str, Any]:
    svc = ms.spec.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, owner.name, "triton"),
        "spec": {
            "type": svc.type,
            "selector": selector_labels(owner),
            "ports": [
                {"name": "http", "port": svc.http_port, "targetPort": "http"},
                {"name": "grpc", "port": svc.grpc_port, "targetPort": "grpc"},
                {"name": "metrics", "port": svc.metrics_port, "targetPort": "metrics"},
            ],
        },
    }


def build_hpa(ms: ModelServer, owner: Owner, model: ResolvedModel) -> dict[str, Any] | None:
    auto = ms.spec.autoscaling
    metric = autoscaling_metric(ms.spec, model)
    if auto is None or metric is None:
        return None
    if metric == AutoscalingMetric.CPU:
        target: dict[str, Any] = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": auto.target},
            },
        }
    else:
        target = {
            "type": "Pods",
            "pods": {
                "metric": {"name": PODS_METRICS[metric]},
                "target": {"type": "AverageValue", "averageValue": str(auto.target)},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(owner, owner.name, "autoscaler"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [target],
            "behavior": {
                # Model servers are slow to start: scale up promptly, scale down carefully.
                "scaleUp": {"stabilizationWindowSeconds": 0},
                "scaleDown": {"stabilizationWindowSeconds": auto.scale_down_stabilization_seconds},
            },
        },
    }


def build_pdb(ms: ModelServer, owner: Owner) -> dict[str, Any] | None:
    if max_replicas(ms.spec) <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(owner, owner.name, "triton"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner)}},
    }


def build_network_policy(
    ms: ModelServer, owner: Owner, settings: Settings
) -> dict[str, Any] | None:
    """Ingress to the serving pods from the sources the spec names, on the serving ports only;
    no source named: no client (but the operator's namespace, for the smoke test)."""
    policy = ms.spec.network_policy
    if policy is None:
        return None
    svc = ms.spec.service
    ports = [
        {"port": p, "protocol": "TCP"} for p in (svc.http_port, svc.grpc_port, svc.metrics_port)
    ]
    ingress: list[dict[str, Any]] = []
    if policy.sources:
        ingress.append({"from": [network_peer(s) for s in policy.sources], "ports": ports})
    if settings.operator_namespace:
        ingress.append(
            {
                "from": [{"namespaceSelector": _namespace_named(settings.operator_namespace)}],
                "ports": [{"port": svc.http_port, "protocol": "TCP"}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, owner.name, "triton"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def _namespace_named(name: str) -> dict[str, Any]:
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def network_peer(source: NetworkSource) -> dict[str, Any]:
    """One NetworkPolicy peer. A pod selector alone means the policy's own namespace (the
    NetworkPolicy API's rule), as the spec documents."""
    peer: dict[str, Any] = {}
    if source.namespace:
        peer["namespaceSelector"] = _namespace_named(source.namespace)
    elif source.namespace_labels:
        peer["namespaceSelector"] = {"matchLabels": dict(source.namespace_labels)}
    if source.pod_labels or not peer:
        peer["podSelector"] = {"matchLabels": dict(source.pod_labels)}
    return peer


OPTIONAL_KINDS = (
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)


def build_children(
    ms: ModelServer, owner: Owner, model: ResolvedModel, settings: Settings, spare_gpus: int
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The children to apply, and the optional kinds that must NOT exist (to delete)."""
    optional = {
        "HorizontalPodAutoscaler": build_hpa(ms, owner, model),
        "PodDisruptionBudget": build_pdb(ms, owner),
        "NetworkPolicy": build_network_policy(ms, owner, settings),
    }
    children = [
        build_service(ms, owner),
        build_deployment(ms, owner, model, settings, spare_gpus),
        *[c for c in optional.values() if c is not None],
    ]
    absent = [(api, kind) for api, kind in OPTIONAL_KINDS if optional[kind] is None]
    return children, absent
