"""FineTuneJob: "fine-tune this model on this dataset with these GPUs"."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from kubetune.api.v1alpha1.base import (
    DNS1123_NAME_PATTERN,
    IMAGE_PATTERN,
    LABEL_VALUE_PATTERN,
    RESOURCE_NAME_PATTERN,
    ApiModel,
    Condition,
    Quantity,
    SchedulingSpec,
    SecretRef,
)

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
# pvc://<claim>/...: the claim is a PersistentVolumeClaim's name (a DNS subdomain), which the pods
# mount; hf:// and s3:// take any URI without whitespace.
_CLAIM = DNS1123_NAME_PATTERN.removeprefix("^").removesuffix("$")
SOURCE_PATTERN = rf"^((hf|s3)://[^\s]+|pvc://{_CLAIM}(/[^\s]*)?)$"
OUTPUT_PATTERN = rf"^(s3://[^\s]+|pvc://{_CLAIM}(/[^\s]*)?)$"


class Task(StrEnum):
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    CAUSAL_LM = "causal-lm"


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"  # LoRA over a base quantised to 4-bit NF4 (bitsandbytes)


class Sharding(StrEnum):
    NONE = "none"  # DDP: every process holds the whole model, its gradients and optimizer state
    FSDP = "fsdp"  # FSDP2: parameters, gradients and optimizer state sharded over all processes
    AUTO = "auto"  # fsdp when several processes train a model that does not fit one device


class DatasetFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class Precision(StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class ModelSpec(ApiModel):
    """The pretrained model to start from."""

    source: str = Field(
        description=(
            "Where the checkpoint is: hf://org/name (Hugging Face hub), pvc://claim/path "
            "(a folder on a PersistentVolumeClaim) or s3://bucket/prefix."
        ),
        pattern=SOURCE_PATTERN,
        max_length=1024,
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) to pin; only for hf:// sources.",
        max_length=256,
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description=(
            "Secret with credentials for the source: HF_TOKEN for hf://, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY for s3://. Mounted only into the containers that download."
        ),
    )


class DatasetSpec(ApiModel):
    """The training data."""

    source: str = Field(
        description="Where the data is: hf://, pvc://claim/path/file.jsonl or s3://bucket/key.",
        pattern=SOURCE_PATTERN,
        max_length=1024,
    )
    format: DatasetFormat | None = Field(
        default=None, description="jsonl, csv or parquet; inferred from the file name when absent."
    )
    text_field: str = Field(
        default="text", description="Column with the input text.", min_length=1, max_length=128
    )
    label_field: str = Field(
        default="label",
        description="Column with the label (sequence-classification) or the target text.",
        min_length=1,
        max_length=128,
    )
    validation_split: float = Field(
        default=0.1,
        description="Fraction of the rows held out for evaluation (0 disables evaluation).",
        ge=0.0,
        le=0.5,
    )
    secret_ref: SecretRef | None = Field(
        default=None, description="Secret with credentials for the source (see model.secretRef)."
    )
    # --- issue 10 (chat data): begin
    messages_field: str | None = Field(
        default=None,
        description=(
            "Column with a conversation: a list of {role, content} turns (system, user, "
            "assistant). Rendered with the tokenizer's chat template; only the assistant's "
            "tokens are trained on. causal-lm only; textField and labelField are then unused."
        ),
        min_length=1,
        max_length=128,
    )
    # --- issue 10 (chat data): end


class LoraSpec(ApiModel):
    """Low-rank adaptation settings (peft)."""

    rank: int = Field(default=8, description="Rank r of the update matrices.", ge=1, le=512)
    alpha: int = Field(default=16, description="Scaling numerator (alpha / rank).", ge=1, le=4096)
    dropout: float = Field(default=0.05, description="Dropout on the LoRA path.", ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names to adapt; empty lets peft pick the architecture's defaults.",
        max_length=64,
    )
    merge: bool = Field(
        default=True, description="Merge the adapter into the base weights for serving."
    )


class Hyperparameters(ApiModel):
    """Optimisation settings. Batch size is per GPU (per process)."""

    epochs: int = Field(default=1, description="Passes over the training data.", ge=1, le=1000)
    learning_rate: float = Field(
        default=5e-5, description="Peak learning rate of AdamW.", gt=0.0, le=1.0
    )
    batch_size: int = Field(default=16, description="Examples per step per process.", ge=1, le=4096)
    max_seq_length: int = Field(
        default=128, description="Tokens per example after truncation.", ge=8, le=131072
    )
    warmup_ratio: float = Field(
        default=0.0, description="Fraction of the steps spent warming up.", ge=0.0, le=1.0
    )
    weight_decay: float = Field(default=0.0, description="AdamW weight decay.", ge=0.0, le=1.0)
    gradient_accumulation_steps: int = Field(
        default=1, description="Micro-batches accumulated per optimizer step.", ge=1, le=1024
    )
    seed: int = Field(default=42, description="Seed of every random generator.", ge=0)
    precision: Precision = Field(
        default=Precision.AUTO,
        description="bf16, fp16 or fp32 autocast; auto picks bf16 where the GPU (or the CPU, with "
        "AMX or AVX512-BF16) multiplies it natively, else fp32.",
    )
    sharding: Sharding = Field(
        default=Sharding.AUTO,
        description="none (DDP), fsdp (FSDP2 over all processes, sharded checkpoints) or auto "
        "(fsdp when the model does not fit one device and there are several processes).",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each transformer block's activations in the backward pass: less "
        "memory for about a third more compute.",
    )
    # --- issue 10 (packing): begin
    packing: bool = Field(
        default=False,
        description=(
            "Pack short examples into sequences of up to maxSeqLength tokens (causal-lm). "
            "Attention stays within each example: position ids restart per example."
        ),
    )
    # --- issue 10 (packing): end


class ResourcesSpec(SchedulingSpec):
    """How much hardware, and where."""

    nodes: int = Field(default=1, description="Training pods (one per node).", ge=1, le=256)
    gpus_per_node: int = Field(
        default=1,
        description="GPUs per pod; sets the GPU request and torchrun's nproc_per_node. 0 trains "
        "on CPU.",
        ge=0,
        le=16,
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        description="Extended resource to request, e.g. nvidia.com/mig-1g.10gb for a MIG profile.",
        pattern=RESOURCE_NAME_PATTERN,
        max_length=253,
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit per pod.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit per pod.")
    shm_size: Quantity = Field(
        default="2Gi", description="Size of /dev/shm (a memory-backed volume) for data loaders."
    )
    # --- issue 10 (memory plan): begin
    gpu_memory: Quantity | None = Field(
        default=None,
        description=(
            "Memory of one GPU (e.g. 80Gi) that the pre-flight memory plan compares with; "
            "default: the nvidia.com/gpu.memory label (MiB) of the nodes the job may use."
        ),
    )
    # --- issue 10 (memory plan): end


class OutputSpec(ApiModel):
    """Where the fine-tuned model goes."""

    uri: str = Field(
        description="pvc://claim/path or s3://bucket/prefix; the model lands in this folder.",
        pattern=OUTPUT_PATTERN,
        max_length=1024,
    )
    triton: bool = Field(
        default=True, description="Also write a Triton model repository next to the model."
    )
    secret_ref: SecretRef | None = Field(
        default=None, description="Secret with credentials for an s3:// output."
    )


class CheckpointingSpec(ApiModel):
    """Periodic checkpoints, so a preempted or restarted job resumes instead of starting over."""

    enabled: bool = Field(default=True, description="Write checkpoints (always also on SIGTERM).")
    every_steps: int = Field(default=200, description="Checkpoint every N optimizer steps.", ge=1)
    keep_last: int = Field(default=2, description="Checkpoints kept on disk.", ge=1, le=100)


class RunPolicy(ApiModel):
    """Lifecycle of the training pods."""

    backoff_limit: int = Field(
        default=2, description="Retries of the whole job before it is Failed.", ge=0, le=100
    )
    active_deadline_seconds: int | None = Field(
        default=None, description="Wall-clock limit; the job fails when it is exceeded.", ge=1
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, description="Delete the pods this long after the job finished.", ge=0
    )
    suspend: bool = Field(
        default=False, description="Hold (or stop) the pods; resuming continues from a checkpoint."
    )
    heartbeat_timeout_seconds: int = Field(
        default=900,
        description=(
            "The trainer reports at least every few seconds while it downloads, trains and "
            "evaluates; after this long without a report the job is Stalled (TrainerHeartbeat)."
        ),
        ge=30,
    )
    restart_on_stale_heartbeat: bool = Field(
        default=False,
        description=(
            "Delete the silent training pods when the heartbeat goes stale: the Job replaces "
            "them and training resumes from the last checkpoint (counts against backoffLimit)."
        ),
    )


IMMUTABLE_AFTER_START = ("model", "dataset", "task", "method", "lora", "hyperparameters", "output")


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob."""

    model: ModelSpec = Field(description="The pretrained model to start from.")
    dataset: DatasetSpec = Field(description="The training data.")
    task: Task = Field(
        default=Task.SEQUENCE_CLASSIFICATION,
        description="sequence-classification (text -> label) or causal-lm (text generation).",
    )
    method: Method = Field(
        default=Method.FULL,
        description="full (every weight), lora (low-rank adapters) or qlora (adapters over a "
        "4-bit NF4 base; needs bitsandbytes and a GPU or its CPU backend).",
    )
    lora: LoraSpec | None = Field(
        default=None, description="LoRA settings; only with method lora or qlora."
    )
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimisation settings."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Nodes, GPUs per node, CPU, memory, placement."
    )
    output: OutputSpec = Field(description="Where the fine-tuned model goes.")
    checkpointing: CheckpointingSpec = Field(
        default_factory=CheckpointingSpec, description="Periodic checkpoints."
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, deadline, TTL.")
    queue_name: str | None = Field(
        default=None,
        description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label.",
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
    )
    image: str | None = Field(
        default=None,
        description="Trainer image; the operator's default when absent.",
        max_length=512,
        pattern=IMAGE_PATTERN,
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.lora) || self.method in ['lora', 'qlora']",
                    "message": "spec.lora is only allowed with spec.method 'lora' or 'qlora'",
                    "fieldPath": ".lora",
                },
                # --- issue 10 (chat data, packing): begin
                {
                    "rule": "!has(self.dataset.messagesField) || self.task == 'causal-lm'",
                    "message": "spec.dataset.messagesField is only allowed with task 'causal-lm'",
                    "fieldPath": ".dataset.messagesField",
                },
                {
                    "rule": "!has(self.hyperparameters) || !has(self.hyperparameters.packing) "
                    "|| !self.hyperparameters.packing || self.task == 'causal-lm'",
                    "message": "spec.hyperparameters.packing is only allowed with task 'causal-lm'",
                    "fieldPath": ".hyperparameters.packing",
                },
                # --- issue 10 (chat data, packing): end
            ]
        }
    }


class Progress(ApiModel):
    """Live training progress, written by the trainer."""

    step: int = Field(default=0, description="Optimizer steps done.", ge=0)
    total_steps: int = Field(default=0, description="Optimizer steps in the whole run.", ge=0)
    epoch: float = Field(default=0.0, description="Fractional epoch.", ge=0.0)
    percent: int = Field(default=0, description="step / totalSteps in percent.", ge=0, le=100)
    loss: float | None = Field(default=None, description="Smoothed training loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    samples_per_second: float | None = Field(default=None, description="Training throughput.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to finish.")
    eval_metrics: dict[str, float] = Field(
        default_factory=dict, description="Latest evaluation metrics (accuracy, f1, loss...)."
    )
    last_heartbeat: datetime | None = Field(
        default=None, description="When the trainer last reported; a stale one means a stall."
    )


class Checkpoint(ApiModel):
    """The last complete checkpoint."""

    step: int = Field(description="Step the checkpoint was taken at.", ge=0)
    path: str = Field(description="Where it is, inside the output location.")
    time: datetime = Field(description="When it was written.")


class OutputStatus(ApiModel):
    """What the job produced."""

    model_uri: str | None = Field(default=None, description="The fine-tuned model.")
    triton_repository_uri: str | None = Field(
        default=None, description="The Triton model repository, ready to serve."
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="Final evaluation metrics.")


# --- issue 10 (memory plan): begin
class PlanSuggestion(ApiModel):
    """The least change with which the plan fits."""

    batch_size: int | None = Field(default=None, description="Per-device batch size that fits.")
    sharding_degree: int | None = Field(
        default=None, description="FSDP over this many GPUs (hyperparameters.sharding fsdp)."
    )
    activation_checkpointing: bool | None = Field(
        default=None, description="Turn on hyperparameters.activationCheckpointing."
    )


class MemoryPlan(ApiModel):
    """The pre-flight memory plan: bytes per device from the model's config.json and the spec."""

    parameters: int = Field(description="Parameters of the model with the task's head.", ge=0)
    trainable_parameters: int = Field(description="Parameters that train.", ge=0)
    per_device_bytes: int = Field(description="Estimated peak memory of one device.", ge=0)
    weights_bytes: int = Field(description="Weights (and 16-bit copies) per device.", ge=0)
    gradients_bytes: int = Field(description="Gradients per device.", ge=0)
    optimizer_bytes: int = Field(description="AdamW state per device.", ge=0)
    activations_bytes: int = Field(
        description="Activations (and transient buffers) at the peak.", ge=0
    )
    device_memory_bytes: int | None = Field(
        default=None, description="The memory of one device the plan was compared with."
    )
    device_memory_source: str | None = Field(
        default=None,
        description="Where that figure came from: spec.resources.gpuMemory, a node label, or "
        "the pod memory limit for CPU training.",
    )
    fits: bool | None = Field(default=None, description="Whether the plan fits (unknown: null).")
    batch_size: int = Field(description="Per-device batch size planned for.", ge=1)
    seq_length: int = Field(description="Sequence length planned for.", ge=1)
    sharding_degree: int = Field(default=1, description="FSDP degree planned for.", ge=1)
    activation_checkpointing: bool = Field(default=False, description="Planned with it on.")
    suggestion: PlanSuggestion | None = Field(
        default=None, description="The least change with which it fits."
    )
    message: str = Field(default="", description="The verdict in words.", max_length=2048)


# --- issue 10 (memory plan): end


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob."""

    phase: Phase | None = Field(
        default=None, description="Pending, Running, Succeeded, Failed, Suspended."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Running, Succeeded, Failed, Suspended and others, metav1-style.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, description="The generation the status describes."
    )
    training_job: str | None = Field(
        default=None,
        description=(
            "The batch/v1 Job that runs the training pods. Only that Job's pods may patch this "
            "status with the trainer's ServiceAccount (the chart's ValidatingAdmissionPolicy)."
        ),
    )
    progress: Progress | None = Field(default=None, description="Live progress.")
    progress_text: str | None = Field(
        default=None, description="Progress as shown by kubectl get, e.g. '42% 84/200'."
    )
    gpus: int | None = Field(default=None, description="GPUs the job holds while running.")
    active: int = Field(default=0, description="Training pods running.", ge=0)
    succeeded: int = Field(default=0, description="Training pods finished successfully.", ge=0)
    failed: int = Field(default=0, description="Training pod failures so far.", ge=0)
    start_time: datetime | None = Field(default=None, description="When training started.")
    completion_time: datetime | None = Field(default=None, description="When the job finished.")
    last_checkpoint: Checkpoint | None = Field(
        default=None, description="Last complete checkpoint."
    )
    output: OutputStatus | None = Field(default=None, description="What the job produced.")
    gpu_hours: float | None = Field(default=None, description="GPU-hours consumed so far.")
    energy_kwh: float | None = Field(default=None, description="Estimated energy, kWh.")
    failure_reason: str | None = Field(
        default=None, description="Why the job failed, classified (OutOfMemory, BadData...)."
    )
    failure_message: str | None = Field(default=None, description="Details of the failure.")
    # --- issue 10 (memory plan): begin
    plan: MemoryPlan | None = Field(
        default=None, description="The pre-flight memory plan (Validated condition)."
    )
    # --- issue 10 (memory plan): end


class FineTuneJob(ApiModel):
    """A fine-tuning run: the model, the data, the method and the GPUs it needs."""

    api_version: str = Field(default="kubetune.io/v1alpha1", description="kubetune.io/v1alpha1")
    kind: str = Field(default=KIND, description="FineTuneJob")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="Desired state.")
    status: FineTuneJobStatus = Field(
        default_factory=FineTuneJobStatus, description="Observed state."
    )

    model_config = ApiModel.model_config | {"extra": "ignore"}
