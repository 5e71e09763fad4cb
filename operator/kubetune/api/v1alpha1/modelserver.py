"""ModelServer: "serve this model" with NVIDIA Triton Inference Server."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from kubetune import __version__
from kubetune.api.v1alpha1.base import (
    DNS1123_NAME_PATTERN,
    IMAGE_PATTERN,
    RESOURCE_NAME_PATTERN,
    ApiModel,
    Condition,
    LabelMap,
    Quantity,
    SchedulingSpec,
    SecretRef,
    label_map,
)
from kubetune.api.v1alpha1.finetunejob import SOURCE_PATTERN

KIND = "ModelServer"
PLURAL = "modelservers"
# Triton 24.10 plus what kubetune's python-backend model needs (torch, transformers, numpy<2) and
# kubetune itself for the model-delivery init container: images/triton/Dockerfile. The stock
# NVIDIA image lacks torch and transformers, so it cannot run the packaged model.
DEFAULT_TRITON_IMAGE = f"ghcr.io/kubetune/triton:{__version__}"


class Phase(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class ModelControlMode(StrEnum):
    NONE = "none"
    EXPLICIT = "explicit"


class AutoscalingMetric(StrEnum):
    QUEUE_TIME = "queue-time"
    PENDING_REQUESTS = "pending-requests"
    REQUESTS_PER_SECOND = "requests-per-second"
    GPU_UTILIZATION = "gpu-utilization"
    CPU = "cpu"
    # vLLM's own metrics (runtime vllm): mean time to first token in microseconds, and generated
    # tokens per second per replica.
    TIME_TO_FIRST_TOKEN = "time-to-first-token"
    GENERATION_TOKENS_PER_SECOND = "generation-tokens-per-second"


class RolloutStrategy(StrEnum):
    AUTO = "auto"
    SURGE = "surge"
    REPLACE = "replace"


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class FineTuneJobRef(ApiModel):
    """A FineTuneJob in the same namespace whose output is served."""

    name: str = Field(
        description="Name of the FineTuneJob.", max_length=253, pattern=DNS1123_NAME_PATTERN
    )


# --- LLM serving (issue 11): the runtime, vLLM's engine settings, the readiness gate ----------
# NVIDIA's Triton image with the vLLM backend; the operator's KUBETUNE_VLLM_IMAGE (a chart value)
# overrides it, spec.triton.image overrides both for one ModelServer.
DEFAULT_VLLM_IMAGE = "nvcr.io/nvidia/tritonserver:25.12-vllm-python-py3"
# The pod condition a ModelServer pod's readiness gate waits for: the operator sets it True on a
# pod only after that very pod answered its smoke test, so a pod serving a broken model never
# joins the Service's endpoints (PATCH pods/status).
SMOKE_TEST_CONDITION = "kubetune.io/smoke-test-passed"


class Runtime(StrEnum):
    """What runs the model inside Triton."""

    PYTHON = "python"  # kubetune's python-backend model (transformers)
    VLLM = "vllm"  # Triton's vLLM backend: paged KV cache, continuous batching, tensor parallel


class VllmDtype(StrEnum):
    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class VllmSpec(ApiModel):
    """vLLM engine settings (the model.json of Triton's vLLM backend). The tensor-parallel size
    is not set here: it is the replica's GPUs (spec.resources.gpus)."""

    max_model_len: int | None = Field(
        default=None,
        description="Longest prompt plus answer, in tokens; the model's own limit when absent.",
        ge=16,
        le=1048576,
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        description="Share of each GPU's memory vLLM may take (weights plus KV cache).",
        gt=0,
        le=1,
    )
    max_num_seqs: int = Field(
        default=256,
        description="Most sequences in one engine step (continuous batch).",
        ge=1,
        le=4096,
    )
    dtype: VllmDtype = Field(
        default=VllmDtype.AUTO, description="auto (the checkpoint's), float16, bfloat16, float32."
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip CUDA graph capture: faster start-up, slower decoding.",
    )
    max_lora_rank: int = Field(
        default=16,
        description="Largest LoRA rank an adapter may have (served adapters).",
        ge=1,
        le=512,
    )


def default_runtime(task: str | None) -> Runtime:
    """Causal LMs on vLLM, everything else (classifiers, a source whose task is only known once
    fetched) on the python backend, which serves both tasks."""
    return Runtime.VLLM if task == "causal-lm" else Runtime.PYTHON


class ServedModel(ApiModel):
    """What to serve: the output of a FineTuneJob, or a model at a URI."""

    fine_tune_job_ref: FineTuneJobRef | None = Field(
        default=None,
        description="Serve what this FineTuneJob produced; a new successful run rolls out.",
    )
    source: str | None = Field(
        default=None,
        description="pvc://claim/path or s3://bucket/prefix of a Triton model repository or of a "
        "Hugging Face checkpoint (packaged for Triton on the fly).",
        pattern=SOURCE_PATTERN,
        max_length=1024,
    )
    revision: str | None = Field(
        default=None,
        description="Which content of `source` to serve, and the key of its rollouts: for "
        "hf:// the hub revision (a commit sha, branch or tag; the same as hf://org/name@revision); "
        "for pvc:// and s3:// a label of yours for what the path holds now (an S3 object "
        "version, a date, a checksum). A new value rolls out the source again at the same URI: "
        "the operator cannot see new files behind an unchanged URI.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        max_length=128,
    )
    name: str | None = Field(
        default=None,
        description="Model name in Triton (the /v2/models/<name> path); the resource's name when "
        "absent.",
        pattern=r"^[a-zA-Z0-9_.-]+$",
        max_length=128,
    )
    secret_ref: SecretRef | None = Field(
        default=None, description="Credentials for the source, mounted only into the downloader."
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.fineTuneJobRef) != has(self.source)",
                    "message": "exactly one of spec.model.fineTuneJobRef and spec.model.source "
                    "must be set",
                },
                {
                    "rule": "!has(self.revision) || has(self.source)",
                    "message": "spec.model.revision applies to spec.model.source only: a "
                    "FineTuneJob's runs are revisions of their own",
                },
                {
                    "rule": "!has(self.revision) || !has(self.source) || "
                    "!(self.source.startsWith('hf://') && self.source.contains('@'))",
                    "message": "spec.model.revision and an @revision in spec.model.source "
                    "cannot both be set",
                },
            ]
        }
    }


class DynamicBatching(ApiModel):
    """Triton's dynamic batcher: groups concurrent requests into one model execution."""

    enabled: bool = Field(default=True, description="Turn the dynamic batcher on.")
    max_queue_delay_microseconds: int = Field(
        default=2000, description="How long a request may wait for a batch to fill.", ge=0
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list, description="Batch sizes the batcher aims for.", max_length=16
    )


class TritonSpec(ApiModel):
    """Triton Inference Server settings."""

    image: str | None = Field(
        default=None,
        description="Triton server image; the operator's default for the runtime when absent "
        "(kubetune's Triton image for python, NVIDIA's vLLM image for vllm).",
        max_length=512,
        pattern=IMAGE_PATTERN,
    )
    max_batch_size: int = Field(
        default=16, description="Largest batch one model execution takes.", ge=0, le=4096
    )
    dynamic_batching: DynamicBatching = Field(
        default_factory=DynamicBatching, description="Dynamic batching settings."
    )
    instance_count: int = Field(
        default=1, description="Model instances per GPU (or per CPU when no GPU).", ge=1, le=64
    )
    model_control_mode: ModelControlMode = Field(
        default=ModelControlMode.NONE,
        description="none (safe default) or explicit; explicit exposes the repository API, "
        "which can load arbitrary code.",
    )
    shm_size: Quantity = Field(
        default="1Gi", description="Size of /dev/shm; the python backend moves tensors through it."
    )


class ServingResources(SchedulingSpec):
    """Hardware per replica, and where."""

    gpus: int = Field(default=1, description="GPUs per replica (0 runs on CPU).", ge=0, le=16)
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        description="Extended resource to request, e.g. a MIG profile.",
        pattern=RESOURCE_NAME_PATTERN,
        max_length=253,
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit per replica.")
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit per replica."
    )


class AutoscalingSpec(ApiModel):
    """Horizontal autoscaling on Triton's load signals. The autoscaler then owns replicas."""

    min_replicas: int = Field(default=1, description="Fewest replicas.", ge=1, le=1000)
    max_replicas: int = Field(description="Most replicas.", ge=1, le=1000)
    metric: AutoscalingMetric = Field(
        default=AutoscalingMetric.QUEUE_TIME,
        description="queue-time (microseconds of queueing per request; on vllm the time to "
        "first token, since vLLM queues inside its engine), pending-requests, "
        "requests-per-second, gpu-utilization (percent), cpu (percent of request), "
        "time-to-first-token (microseconds) or generation-tokens-per-second (vllm).",
    )
    target: int = Field(
        description="Target value per replica, in the metric's unit.", ge=1, le=100000000
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        description="How long the load must stay low before replicas are removed (the HPA's "
        "scaleDown stabilization window): model servers are slow to start, so a short dip "
        "should not cost a replica. Scale-up is immediate.",
        ge=0,
        le=3600,
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "spec.autoscaling.minReplicas must not exceed maxReplicas",
                }
            ]
        }
    }


class SmokeTestSpec(ApiModel):
    """An inference request sent to every new pod after a rollout."""

    enabled: bool = Field(default=True, description="Send the smoke test after each rollout.")
    text: str = Field(
        default="hello", description="Input text of the smoke-test request.", max_length=4096
    )
    expected_label: str | None = Field(
        default=None, description="Label the answer must carry, when set.", max_length=256
    )


class RolloutSpec(ApiModel):
    """How a new model or setting reaches the pods."""

    strategy: RolloutStrategy = Field(
        default=RolloutStrategy.AUTO,
        description="auto (surge when a spare GPU exists, else replace one at a time), surge or "
        "replace.",
    )
    smoke_test: SmokeTestSpec = Field(
        default_factory=SmokeTestSpec, description="Post-rollout inference check."
    )


class NetworkSource(ApiModel):
    """Clients admitted to the serving ports: the pods with `podLabels` (every pod when
    empty) in the namespace `namespace`, or in the namespaces with `namespaceLabels`, or (with
    neither) in the ModelServer's own namespace. One NetworkPolicy peer."""

    namespace: str | None = Field(
        default=None,
        description="A namespace by name (its kubernetes.io/metadata.name label).",
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    )
    namespace_labels: LabelMap = label_map(
        "Namespaces by labels (all must match); excludes namespace."
    )
    pod_labels: LabelMap = label_map(
        "Pods by labels (all must match), in the namespaces above or the ModelServer's own."
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.namespace) || "
                    "(has(self.namespaceLabels) && size(self.namespaceLabels) > 0) || "
                    "(has(self.podLabels) && size(self.podLabels) > 0)",
                    "message": "a source names a namespace, namespace labels or pod labels "
                    "(an empty source would admit every pod of every namespace)",
                },
                {
                    "rule": "!has(self.namespace) || !has(self.namespaceLabels) || "
                    "size(self.namespaceLabels) == 0",
                    "message": "namespace and namespaceLabels are mutually exclusive",
                },
            ]
        }
    }


class NetworkPolicySpec(ApiModel):
    """A NetworkPolicy on the serving pods: only the named sources reach the HTTP, gRPC and
    metrics ports; everything else is refused (where the cluster's network enforces policies).
    The operator's own namespace is admitted to the HTTP port when the operator runs in the
    cluster (its smoke test calls each pod)."""

    sources: list[NetworkSource] = Field(
        default_factory=list,
        description="Who may connect. Empty: no client but the operator.",
        max_length=32,
    )


class ServiceSpec(ApiModel):
    """The Service in front of the replicas."""

    type: ServiceType = Field(default=ServiceType.CLUSTER_IP, description="Service type.")
    http_port: int = Field(default=8000, description="HTTP/REST port.", ge=1, le=65535)
    grpc_port: int = Field(default=8001, description="gRPC port.", ge=1, le=65535)
    metrics_port: int = Field(default=8002, description="Prometheus metrics port.", ge=1, le=65535)

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "self.httpPort != self.grpcPort && self.httpPort != self.metricsPort "
                    "&& self.grpcPort != self.metricsPort",
                    "message": "spec.service's httpPort, grpcPort and metricsPort must differ",
                }
            ]
        }
    }


class ModelServerSpec(ApiModel):
    """Desired state of a ModelServer."""

    model: ServedModel = Field(description="What to serve.")
    triton: TritonSpec = Field(default_factory=TritonSpec, description="Triton settings.")
    runtime: Runtime | None = Field(
        default=None,
        description="python or vllm; when absent vllm for a FineTuneJob's causal LM, python "
        "otherwise (a source's task is known only once fetched: set vllm for an LLM source).",
    )
    vllm: VllmSpec = Field(
        default_factory=VllmSpec, description="vLLM engine settings (runtime vllm only)."
    )
    resources: ServingResources = Field(
        default_factory=ServingResources, description="GPUs, CPU, memory, placement per replica."
    )
    replicas: int | None = Field(
        default=None,
        description="Fixed replica count (1 when neither this nor autoscaling is set).",
        ge=0,
        le=1000,
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Autoscale on Triton's load; excludes spec.replicas."
    )
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rollout settings.")
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="Service settings.")
    network_policy: NetworkPolicySpec | None = Field(
        default=None,
        description="Create a NetworkPolicy that admits only the named sources to the serving "
        "ports. Absent: no NetworkPolicy.",
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.replicas) && has(self.autoscaling))",
                    "message": "spec.replicas and spec.autoscaling are mutually exclusive: the "
                    "autoscaler owns the replica count",
                }
            ]
        }
    }


class Endpoints(ApiModel):
    """Where clients reach the model, inside the cluster."""

    http: str | None = Field(default=None, description="HTTP endpoint (host:port).")
    grpc: str | None = Field(default=None, description="gRPC endpoint (host:port).")


class ServedRevision(ApiModel):
    """Exactly which model the pods serve: the last revision that rolled out and passed its
    smoke test (the one a failed rollout goes back to)."""

    uri: str | None = Field(default=None, description="Where the served model came from.")
    revision: str | None = Field(default=None, description="kubetune's revision of that model.")
    task: str | None = Field(default=None, description="The model's task.")
    fine_tune_job_uid: str | None = Field(
        default=None, description="UID of the FineTuneJob run that produced it."
    )
    checksum: str | None = Field(default=None, description="Checksum of the model files.")


class SmokeTestStatus(ApiModel):
    """The last post-rollout smoke test."""

    revision: str = Field(description="Model revision tested.")
    passed: bool = Field(description="Whether every new pod answered correctly.")
    message: str = Field(default="", description="What the pods answered, or why they failed.")
    pods: list[str] = Field(default_factory=list, description="Pods tested.")
    time: datetime | None = Field(default=None, description="When the test ran.")


class ModelServerStatus(ApiModel):
    """Observed state of a ModelServer."""

    phase: Phase | None = Field(
        default=None, description="Pending, Progressing, Ready, Degraded, Failed."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, ModelLoaded, Progressing, Degraded, SmokeTestPassed, metav1-style.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="Generation described.")
    replicas: int = Field(default=0, description="Pods of the current Deployment.", ge=0)
    ready_replicas: int = Field(default=0, description="Pods whose model answers.", ge=0)
    desired_replicas: int | None = Field(default=None, description="Replicas wanted now.")
    ready_text: str | None = Field(default=None, description="ready/desired for kubectl get.")
    selector: str | None = Field(
        default=None, description="Label selector of the pods (for the scale subresource)."
    )
    endpoints: Endpoints | None = Field(default=None, description="In-cluster endpoints.")
    model_name: str | None = Field(default=None, description="Model name in Triton.")
    served: ServedRevision | None = Field(default=None, description="The model actually served.")
    smoke_test: SmokeTestStatus | None = Field(default=None, description="The last smoke test.")
    failed_revision: str | None = Field(
        default=None,
        description="A model revision that failed its smoke test or did not start; it is not "
        "rolled out again.",
    )
    failure_message: str | None = Field(
        default=None, description="Why the failed revision was rolled back."
    )


class ModelServer(ApiModel):
    """A Triton Inference Server deployment that serves one model."""

    api_version: str = Field(default="kubetune.io/v1alpha1", description="kubetune.io/v1alpha1")
    kind: str = Field(default=KIND, description="ModelServer")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ModelServerSpec = Field(description="Desired state.")
    status: ModelServerStatus = Field(
        default_factory=ModelServerStatus, description="Observed state."
    )

    model_config = ApiModel.model_config | {"extra": "ignore"}
