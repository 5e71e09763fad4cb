"""From a FineTuneJob to the planner and back: device memory, the Setup, status.plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec, MemoryPlan, PlanSuggestion
from kubetune.planner.memory import MIB, Setup
from kubetune.planner.verdict import Verdict

# --------------------------------------------------------------------------- the FineTuneJob

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # GPU feature discovery: MiB of one GPU
_SUFFIXES = {
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes ("80Gi", "81920Mi", "8e9") as an integer."""
    text = quantity.strip()
    for suffix, factor in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))


def device_memory(
    spec: FineTuneJobSpec, node_labels: Sequence[Mapping[str, str]] = ()
) -> tuple[int | None, str | None]:
    """(bytes of one device, where that figure came from) for the plan to compare with.

    `spec.resources.gpuMemory` wins; else the smallest `nvidia.com/gpu.memory` label (MiB) of
    the nodes the job may land on (the handler passes those nodes' labels); for CPU training,
    the pod's memory limit. None when nothing says.
    """
    res = spec.resources
    if res.gpus_per_node == 0:
        if res.memory:
            return quantity_bytes(res.memory), "spec.resources.memory"
        return None, None
    if res.gpu_memory:
        return quantity_bytes(res.gpu_memory), "spec.resources.gpuMemory"
    sizes = []
    for labels in node_labels:
        value = labels.get(GPU_MEMORY_LABEL, "")
        if value.isdigit():
            sizes.append(int(value) * MIB)
    if sizes:
        return min(sizes), f"node label {GPU_MEMORY_LABEL}"
    return None, None


def setup_from_spec(
    spec: FineTuneJobSpec,
    *,
    num_labels: int = 2,
    sharding_degree: int = 1,
    activation_checkpointing: bool = False,
) -> Setup:
    """The planner's Setup for a FineTuneJob; sharding and checkpointing come in as values."""
    hp = spec.hyperparameters
    lora = spec.lora
    return Setup(
        task=str(spec.task),
        method=str(spec.method),
        precision=str(hp.precision),
        on_gpu=spec.resources.gpus_per_node > 0,
        batch_size=hp.batch_size,
        seq_length=hp.max_seq_length,
        sharding_degree=sharding_degree,
        activation_checkpointing=activation_checkpointing,
        lora_rank=lora.rank if lora else 8,
        lora_targets=tuple(lora.target_modules) if lora else (),
        lora_dropout=lora.dropout if lora else 0.05,
        num_labels=num_labels,
    )


def memory_plan(verdict: Verdict, device_source: str | None) -> MemoryPlan:
    """The verdict as `status.plan`."""
    est, setup, fit = verdict.estimate, verdict.setup, verdict.suggestion
    suggestion = None
    if fit is not None:
        suggestion = PlanSuggestion(
            batch_size=fit.batch_size if fit.batch_size != setup.batch_size else None,
            sharding_degree=fit.sharding_degree
            if fit.sharding_degree != setup.sharding_degree
            else None,
            activation_checkpointing=True
            if fit.activation_checkpointing and not setup.activation_checkpointing
            else None,
        )
    return MemoryPlan(
        parameters=est.parameters,
        trainable_parameters=est.trainable_parameters,
        per_device_bytes=est.peak,
        weights_bytes=est.weights,
        gradients_bytes=est.gradients,
        optimizer_bytes=est.optimizer,
        activations_bytes=est.activations + est.transient,
        device_memory_bytes=verdict.device_bytes,
        device_memory_source=device_source if verdict.device_bytes is not None else None,
        fits=verdict.fits,
        batch_size=setup.batch_size,
        seq_length=setup.seq_length,
        sharding_degree=setup.sharding_degree,
        activation_checkpointing=setup.activation_checkpointing,
        suggestion=suggestion,
        message=verdict.message[:2048],
    )
