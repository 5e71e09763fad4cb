"""How much memory a fine-tune needs per device, from the model's config.json alone.

Pure arithmetic (no torch, no weights, no I/O): the operator side and the trainer's no-GPU
pre-flight pod both import it, so a job that cannot fit is refused before any GPU is held.

The model of a training step, per device:

- **weights, gradients, optimizer state** by method and precision. Full fine-tuning keeps fp32
  master weights (4 bytes), fp32 gradients (4) and AdamW's two fp32 moments (8): 16 bytes per
  parameter, the figure of the ZeRO paper; under bf16/fp16 autocast the 16-bit copies of every
  matmul weight that autograd saves for the backward add 2 more. LoRA keeps the frozen base in
  the autocast dtype (fp32 without autocast) and trains fp32 adapters (16 bytes per adapter
  parameter). QLoRA keeps the base's linear layers in 4-bit NF4 (0.5 byte plus the block
  constants: 0.5 bit per parameter, 0.127 with double quantisation) and the rest in 16 bits.
  FSDP with sharding degree N divides the fp32 state by N and adds the unsharded 16-bit weights
  and gradients of the two layers in flight (current and prefetched).
- **activations**: what autograd saves per token per layer, counted tensor by tensor for the
  two families below (post-LN encoders with GELU MLPs and dropout: BERT, RoBERTa...; pre-norm
  decoders with gated MLPs: Llama, Mistral, Qwen...; GPT-2 as a decoder with a plain MLP), plus
  the attention matrix where attention is computed in full (CPU math path; on GPUs SDPA's
  flash/memory-efficient kernels keep O(s) state) and the fp32 log-softmax of a causal LM's
  logits. Activation checkpointing keeps each layer's input and recomputes one layer at a time.
  Tensors saved only for a weight gradient are dropped when that weight is frozen (LoRA).
- **the peak**: the weights and optimizer state are always there; the gradients (full after
  the backward) and the activations (full at the end of the forward) are mostly not there at
  the same time, so the peak is `weights + optimizer + max(gradients, activations + transient)`,
  where `transient` is the largest short-lived buffer at the activation peak (the logits'
  gradients, or one MLP's intermediate). On a GPU a fixed `CUDA_CONTEXT_BYTES` and a
  fragmentation margin are added.

tests/unit/test_planner.py checks the parameter counts exactly against transformers' models and
the peak against torch's MemTracker on real CPU steps of MiniLM and a tiny Llama.
"""

from kubetune.planner.memory import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    GIB,
    HEADROOM,
    MIB,
    Estimate,
    Setup,
    estimate,
)
from kubetune.planner.shape import (
    ADAPTER_METHODS,
    LORA_DEFAULT_TARGETS,
    Linear,
    ModelShape,
    Parameters,
    PlanError,
    count_parameters,
    lora_parameters,
    lora_targets,
    shape_from_config,
)
from kubetune.planner.spec import (
    GPU_MEMORY_LABEL,
    device_memory,
    memory_plan,
    quantity_bytes,
    setup_from_spec,
)
from kubetune.planner.verdict import Verdict, alternatives, check, human_bytes, usable

__all__ = [
    "ADAPTER_METHODS",
    "CUDA_CONTEXT_BYTES",
    "FRAGMENTATION",
    "GIB",
    "GPU_MEMORY_LABEL",
    "HEADROOM",
    "LORA_DEFAULT_TARGETS",
    "MIB",
    "Estimate",
    "Linear",
    "ModelShape",
    "Parameters",
    "PlanError",
    "Setup",
    "Verdict",
    "alternatives",
    "check",
    "count_parameters",
    "device_memory",
    "estimate",
    "human_bytes",
    "lora_parameters",
    "lora_targets",
    "memory_plan",
    "quantity_bytes",
    "setup_from_spec",
    "shape_from_config",
    "usable",
]
