"""FSDP2: parameters, gradients and optimizer state sharded over every process of the job.

`torch.distributed.fsdp.fully_shard` is applied to each transformer block (the classes a Hugging
Face model lists in `_no_split_modules`) and then to the whole model, so one block's parameters
are gathered at a time; the embeddings and the head (tied or not) live in the root group. On GPUs
the blocks compute in bf16 (all-gathered in bf16) and reduce gradients in fp32; the sharded master
weights and AdamW's state stay fp32. On CPU everything stays fp32 (gloo has no bf16 reduction
worth having; CPU autocast still applies inside the blocks when the precision asks for it).

Checkpoints are sharded too (`torch.distributed.checkpoint`: every rank writes its own shards of
the model and optimizer), and the export gathers the full weights once, on rank 0.

`auto` needs to know whether the model fits one device. The memory planner answers that from the
model's config.json, as the pre-flight pod did before any GPU was held (`planner_fits`: the same
arithmetic, so the trainer shards exactly when the plan said one device does not fit); a config
the planner cannot read falls back to `estimate_fits_one_device` on the measured counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kubetune import planner
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec, Method, Precision, Sharding
from kubetune.trainer.distributed import DistContext
from kubetune.trainer.errors import ConfigError

# (spec, parameters, trainable parameters, bytes of one device) -> does an unsharded copy fit?
# The planner (kubetune's memory planner, run by the operator before scheduling) can stand in
# here with the same signature; `estimate_fits_one_device` is the trainer's own rough estimate.
FitsOneDevice = Callable[[FineTuneJobSpec, int, int, int], bool]

SHARDS_FOLDER = "sharded"  # inside a checkpoint folder: the torch.distributed.checkpoint files


def estimate_fits_one_device(
    spec: FineTuneJobSpec, parameters: int, trainable: int, device_bytes: int
) -> bool:
    """Weights, gradients and AdamW state of an unsharded copy, with a fifth left for
    activations: fp32 master weights (4 bytes), fp32 gradients (4) and two fp32 moments (8)
    per trainable parameter; frozen weights at 2 bytes (LoRA's 16-bit base) or ~0.5 (QLoRA)."""
    frozen = parameters - trainable
    frozen_bytes = {Method.FULL: 4.0, Method.LORA: 2.0, Method.QLORA: 0.55}[Method(spec.method)]
    needed = trainable * 16 + frozen * frozen_bytes
    return needed <= 0.8 * device_bytes


def planner_fits(model_dir: Path, num_labels: int) -> FitsOneDevice:
    """The memory planner's verdict for an unsharded copy (sharding degree 1), from the model's
    config.json: what the pre-flight check compared with the GPU's memory before scheduling."""

    def fits(spec: FineTuneJobSpec, parameters: int, trainable: int, device_bytes: int) -> bool:
        try:
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
            shape = planner.shape_from_config(config)
        except (OSError, ValueError):  # PlanError is a ValueError: an architecture it lacks
            return estimate_fits_one_device(spec, parameters, trainable, device_bytes)
        setup = planner.setup_from_spec(
            spec,
            num_labels=num_labels,
            sharding_degree=1,
            activation_checkpointing=spec.hyperparameters.activation_checkpointing,
        )
        return planner.check(shape, setup, device_bytes).fits is True

    return fits


def auto_shards(
    spec: FineTuneJobSpec,
    world_size: int,
    device_bytes: int | None,
    parameters: int,
    trainable: int,
    fits: FitsOneDevice,
) -> bool:
    """`sharding: auto`: FSDP when there are several processes, each on a GPU of
    `device_bytes`, and `fits` says an unsharded copy does not fit one of them."""
    if world_size < 2 or device_bytes is None or spec.hyperparameters.precision == Precision.FP16:
        return False
    return not fits(spec, parameters, trainable, device_bytes)


def use_fsdp(
    spec: FineTuneJobSpec,
    ctx: DistContext,
    model: torch.nn.Module,
    fits: FitsOneDevice = estimate_fits_one_device,
) -> bool:
    """none: DDP; fsdp: FSDP; auto: FSDP when several processes hold a model too large for one
    device (CPU runs are never sharded automatically: their "device" is the host's memory)."""
    sharding = Sharding(spec.hyperparameters.sharding)
    if sharding == Sharding.FSDP and spec.method == Method.QLORA:
        raise ConfigError(
            "hyperparameters.sharding fsdp cannot shard method qlora's 4-bit base "
            "(bitsandbytes' packed weights are not DTensors); use sharding none or auto"
        )
    if sharding == Sharding.NONE or spec.method == Method.QLORA or not dist.is_initialized():
        return False
    if sharding == Sharding.FSDP:
        return True  # also over one process (it then shards nothing, but runs FSDP's path)
    memory = None
    if ctx.distributed and ctx.device.type == "cuda":
        memory = torch.cuda.get_device_properties(ctx.device).total_memory
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return auto_shards(spec, ctx.world_size, memory, total, trainable, fits)


def block_classes(model: torch.nn.Module) -> set[str]:
    """The transformer block classes, as the model (or the one peft wraps) declares them."""
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            names.update(declared)
    return names


def shard(model: torch.nn.Module, ctx: DistContext, compute_dtype: torch.dtype | None) -> Any:
    """Shards the blocks, then the root, over a 1-D mesh of all ranks; returns the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy()
    if ctx.device.type == "cuda" and compute_dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model.to(ctx.device)
    blocks = block_classes(model)
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """FSDP's no_sync: gradients accumulate unreduced until the last micro-batch of a step."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]


def local_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (over DTensor gradients it is a replicated DTensor)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ------------------------------------------------------------------ checkpoints


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def sharded_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, lora: bool
) -> dict[str, Any]:
    """Model (for LoRA only what trains) and optimizer state, as this rank's shards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    if lora:
        keep = _trainable_names(model)
        model_state = {k: v for k, v in model_state.items() if k in keep}
    return {"model": model_state, "optim": optim_state}


def save_shards(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lora: bool
) -> None:
    """Every rank writes its shards into `folder` (collective; files are fsynced)."""
    from torch.distributed.checkpoint.state_dict_saver import save

    save(sharded_state(model, optimizer, lora), checkpoint_id=str(folder))


def load_shards(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lora: bool
) -> None:
    """Reads the shards back into the model and optimizer (collective; DCP reshards when the
    world size changed)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    state = sharded_state(model, optimizer, lora)
    try:
        load(state, checkpoint_id=str(folder))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"the sharded checkpoint {folder} does not fit this model: {exc}; were spec.model "
            "or spec.method changed?"
        ) from exc
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=not lora),
    )


def full_state_on_rank0(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, gathered once to rank 0's host memory (collective; empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.get_rank() != 0:
        return {}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
