"""Bytes per device of one training step: weights, gradients, optimizer state, activations."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.planner.shape import (
    ADAPTER_METHODS,
    GPT2_TYPES,
    QUANTISED_METHODS,
    ModelShape,
    count_parameters,
    lora_parameters,
    lora_targets,
)

GIB = 1024**3
MIB = 1024**2
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
FRAGMENTATION = 0.10  # the caching allocator's slack over live tensors
HEADROOM = 0.95  # a plan fits when it uses at most this share of the device


# --------------------------------------------------------------------------- the setup


@dataclass(frozen=True)
class Setup:
    """How the job trains, as plain values (the planner does not read the spec's models)."""

    task: str = "sequence-classification"
    method: str = "full"  # full | lora | qlora
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    on_gpu: bool = True
    batch_size: int = 1  # per device
    seq_length: int = 512
    sharding_degree: int = 1  # FSDP: devices the state is sharded over (1: DDP)
    activation_checkpointing: bool = False
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.05
    num_labels: int = 2
    double_quant: bool = True

    @property
    def autocast_bytes(self) -> int:
        """Bytes of one activation element: 2 under bf16/fp16 autocast, else 4 (CPUs: fp32)."""
        if not self.on_gpu or self.precision == "fp32":
            return 4
        return 2

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_length


@dataclass(frozen=True)
class Estimate:
    """Bytes per device, by what holds them."""

    parameters: int
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    overhead: int

    @property
    def peak(self) -> int:
        live = self.weights + self.optimizer
        return live + max(self.gradients, self.activations + self.transient) + self.overhead


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    params = count_parameters(shape, setup.task, setup.num_labels)
    total = params.total
    shards = max(1, setup.sharding_degree)
    act = setup.autocast_bytes
    method = setup.method
    if method in ADAPTER_METHODS:
        trainable = lora_parameters(
            shape, setup.lora_rank, setup.lora_targets, setup.task, setup.num_labels
        )
        base_bytes = act if method == "lora" else None
        if base_bytes is not None:
            frozen = total * base_bytes
        else:  # qlora: layer linears in NF4, everything else in 16 bits
            nf4 = 0.5 + (0.127 if setup.double_quant else 0.5) / 8
            frozen = int(params.layer_linears * nf4) + (total - params.layer_linears) * 2
        weights = frozen // shards + trainable * 4 // shards
        gradients = trainable * 4 // shards
        optimizer = trainable * 8 // shards
    else:
        trainable = total
        weights = total * 4 // shards
        gradients = total * 4 // shards
        optimizer = total * 8 // shards
        if act == 2 and shards == 1:
            # autocast's 16-bit copies of the matmul weights, saved for the backward
            lm_head = shape.vocab_size * shape.hidden_size if setup.task == "causal-lm" else 0
            weights += (params.layer_linears + lm_head) * 2
    if shards > 1:
        # FSDP2: the unsharded 16-bit (or fp32) weights and gradients of two layers in flight,
        # or of the root unit (embeddings and head) when it is the larger
        layer = (params.layer_linears + params.layer_other) // max(1, shape.num_layers)
        weights += max(2 * layer, params.embeddings + params.head) * act
        if method not in ADAPTER_METHODS:
            gradients += 2 * layer * act
    elif method in QUANTISED_METHODS:
        weights += max(lin.fan_in * lin.fan_out for lin in shape.linears()) * 2  # dequantised
    activations, transient = _activations(shape, setup)
    overhead = 0
    if setup.on_gpu:
        tensors = weights + optimizer + max(gradients, activations + transient)
        overhead = CUDA_CONTEXT_BYTES + int(tensors * FRAGMENTATION)
    return Estimate(
        parameters=total,
        trainable_parameters=trainable,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        transient=transient,
        overhead=overhead,
    )


# --------------------------------------------------------------------------- activations


def _layer_elements(shape: ModelShape, setup: Setup) -> tuple[float, float]:
    """(activation elements, 1-byte dropout-mask elements) one layer saves per token.

    Counted tensor by tensor from what autograd keeps for the backward. A linear layer's input
    is kept only for its weight's gradient, so a frozen base (LoRA) drops those ("wgrad").
    """
    h, i, q = shape.hidden_size, shape.intermediate_size, shape.q_dim
    wgrad = 0.0 if setup.method in ADAPTER_METHODS else 1.0
    masks = 0.0
    if shape.decoder and shape.model_type not in GPT2_TYPES:
        # pre-RMSNorm x2: its input; the normalised value (for the norm's weight) and the
        # output (for q/k/v and gate/up).
        norms = 2 * (h + wgrad * 2 * h)
        # q; k and v repeated to every head (padded batches take that path); the attention
        # output, kept by the kernel; o_proj's contiguous input.
        attention = 4 * q + wgrad * q
        # gate, its activation and up (the product's operands); down_proj's input.
        mlp = 3 * i + wgrad * i
        elements = norms + attention + mlp
    else:
        # post-LayerNorm x2 (their inputs); q, k, v, the scaled q of the math attention;
        # the context (o's input), q/k/v's input, the GELU's input, the GELU's output and the
        # first LayerNorm's output (the MLP's input).
        elements = 2 * h + 4 * q + i + wgrad * (q + h + i + h)
        if shape.dropout > 0:
            masks += 2 * h
    if not setup.on_gpu and shape.attention_dropout > 0:
        # CPUs run SDPA with dropout on the math path: it keeps Q.K^T's softmax, the dropout
        # mask and the dropped-out probabilities (GPU kernels keep O(s) state instead).
        elements += shape.num_heads * setup.seq_length * 3
    if setup.method in ADAPTER_METHODS:
        for lin in lora_targets(shape, setup.lora_targets):  # x after dropout, its mask, x @ A
            elements += setup.lora_rank + (lin.fan_in if setup.lora_dropout > 0 else 0)
            masks += lin.fan_in if setup.lora_dropout > 0 else 0
    return elements, masks


def _activations(shape: ModelShape, setup: Setup) -> tuple[int, int]:
    """(activation bytes at the end of the forward, transient bytes at that moment)."""
    act = setup.autocast_bytes
    h, tokens = shape.hidden_size, setup.tokens
    elements, masks = _layer_elements(shape, setup)
    layer = int(tokens * (elements * act + masks))
    transient = tokens * (shape.intermediate_size + 2 * h) * act + h * shape.intermediate_size * 4
    if setup.activation_checkpointing:
        # every layer's input; one layer is recomputed at a time, in the backward, after the
        # loss's buffers are gone
        layers = shape.num_layers * tokens * h * act
        transient = max(transient, layer)
    else:
        layers = shape.num_layers * layer
    outside = tokens * (2 * h * act + (h if shape.dropout > 0 else 0))  # embeddings, last norm
    if setup.task == "causal-lm":
        logits = tokens * shape.vocab_size * 4  # the loss's fp32 log-softmax
        outside += tokens * h * act + logits  # lm_head's input
        transient = max(transient, 2 * logits)  # the gradients of both
    return int(layers + outside), int(transient)
