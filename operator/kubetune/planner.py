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

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec, MemoryPlan, PlanSuggestion

GIB = 1024**3
MIB = 1024**2
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
FRAGMENTATION = 0.10  # the caching allocator's slack over live tensors
HEADROOM = 0.95  # a plan fits when it uses at most this share of the device

ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "ernie"}
)
GPT2_TYPES = frozenset({"gpt2"})
# peft's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), checked by a test.
LORA_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
}
QUANTISED_METHODS = frozenset({"qlora"})
ADAPTER_METHODS = frozenset({"lora", "qlora"})


class PlanError(ValueError):
    """config.json lacks what the planner needs; the message names the key."""


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class Linear:
    """One matmul weight of a layer: its name (as peft targets it) and shape."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    """What the planner reads from config.json."""

    model_type: str
    decoder: bool  # a causal LM family (pre-norm, no dropout by default) vs a BERT-like encoder
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool  # SwiGLU/GeGLU: gate, up, down
    max_positions: int  # learned position embeddings (0: rotary)
    type_vocab_size: int
    tie_word_embeddings: bool
    norm_bias: bool  # LayerNorm (weight + bias) vs RMSNorm (weight)
    dropout: float
    attention_dropout: float = 0.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    head_norms: bool = False  # Qwen3: RMSNorm over each head's q and k

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def linears(self) -> list[Linear]:
        """The matmul weights of one layer."""
        h, i = self.hidden_size, self.intermediate_size
        if self.model_type in GPT2_TYPES:
            return [
                Linear("c_attn", h, 3 * h, True),
                Linear("c_proj", h, h, True),
                Linear("c_fc", h, i, True),
                Linear("mlp.c_proj", i, h, True),
            ]
        if not self.decoder:
            return [
                Linear("query", h, h, True),
                Linear("key", h, h, True),
                Linear("value", h, h, True),
                Linear("attention.output.dense", h, h, True),
                Linear("intermediate.dense", h, i, True),
                Linear("output.dense", i, h, True),
            ]
        layers = [
            Linear("q_proj", h, self.q_dim, self.qkv_bias),
            Linear("k_proj", h, self.kv_dim, self.qkv_bias),
            Linear("v_proj", h, self.kv_dim, self.qkv_bias),
            Linear("o_proj", self.q_dim, h, self.o_bias),
        ]
        if self.gated_mlp:
            layers.append(Linear("gate_proj", h, i, self.mlp_bias))
        mlp = [Linear("up_proj", h, i, self.mlp_bias), Linear("down_proj", i, h, self.mlp_bias)]
        return [*layers, *mlp]


def _get(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise PlanError(f"config.json has no {' or '.join(repr(k) for k in keys)}")
    return default


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """The planner's view of a Hugging Face config.json (a dict); PlanError names a missing key."""
    text = config.get("text_config")
    if isinstance(text, Mapping):  # multimodal wrappers keep the language model's config here
        config = {**text, "model_type": text.get("model_type", config.get("model_type"))}
    model_type = str(config.get("model_type") or "")
    if not model_type:
        raise PlanError("config.json has no 'model_type'")
    hidden = int(_get(config, "hidden_size", "n_embd", "d_model"))
    layers = int(_get(config, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_get(config, "num_attention_heads", "n_head"))
    vocab = int(_get(config, "vocab_size"))
    gpt2 = model_type in GPT2_TYPES
    decoder = model_type not in ENCODER_TYPES
    if gpt2:
        intermediate = int(config.get("n_inner") or 4 * hidden)
    else:
        intermediate = int(_get(config, "intermediate_size", "ffn_dim", "n_inner"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    encoder_like = not decoder or gpt2
    dropout = float(
        config.get("hidden_dropout_prob", config.get("resid_pdrop", config.get("dropout", 0.0)))
        or 0.0
    )
    attention_bias = bool(config.get("attention_bias", False))
    default_tied = encoder_like or model_type.startswith("gemma")
    return ModelShape(
        model_type=model_type,
        decoder=decoder,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        gated_mlp=not encoder_like,
        max_positions=int(_get(config, "max_position_embeddings", "n_positions"))
        if encoder_like
        else 0,
        type_vocab_size=0 if decoder else int(config.get("type_vocab_size", 2)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", default_tied)),
        norm_bias=encoder_like,
        dropout=dropout,
        attention_dropout=float(
            next(
                (
                    config[k]
                    for k in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
                    if config.get(k)
                ),
                0.0,
            )
        ),
        qkv_bias=attention_bias or model_type == "qwen2",  # Qwen2: q/k/v biases, no o bias
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        head_norms=model_type == "qwen3",
    )


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Parameters:
    """Parameter counts by where they live (quantisation touches only the layers' linears)."""

    embeddings: int
    layer_linears: int  # all layers
    layer_other: int  # norms, all layers
    head: int  # final norm, pooler, classifier or untied lm_head

    @property
    def total(self) -> int:
        return self.embeddings + self.layer_linears + self.layer_other + self.head


def count_parameters(shape: ModelShape, task: str, num_labels: int = 2) -> Parameters:
    """Exact for the families above with the task's head (checked against transformers)."""
    h = shape.hidden_size
    norm = 2 * h if shape.norm_bias else h
    embeddings = shape.vocab_size * h + shape.max_positions * h + shape.type_vocab_size * h
    if not shape.decoder:
        embeddings += norm  # BERT's embedding LayerNorm
    linears = sum(lin.fan_in * lin.fan_out + lin.fan_out * lin.bias for lin in shape.linears())
    other = 2 * norm + (2 * shape.head_dim if shape.head_norms else 0)
    head = norm if shape.decoder else 0  # the final norm
    if task == "causal-lm":
        head += 0 if shape.tie_word_embeddings else shape.vocab_size * h
    else:
        head += (0 if shape.decoder else h * h + h) + _classifier(shape, num_labels)  # + pooler
    return Parameters(embeddings, shape.num_layers * linears, shape.num_layers * other, head)


def _classifier(shape: ModelShape, num_labels: int) -> int:
    """BERT's "classifier" has a bias; decoders' "score" has none."""
    return shape.hidden_size * num_labels + (0 if shape.decoder else num_labels)


def lora_targets(shape: ModelShape, targets: Sequence[str]) -> list[Linear]:
    """The layer linears LoRA adapts: peft matches a target as a suffix of the module name."""
    names = tuple(targets) or LORA_DEFAULT_TARGETS.get(shape.model_type, ())
    if not names:
        raise PlanError(
            f"no default LoRA target modules for model_type {shape.model_type!r}; name them in "
            "spec.lora.targetModules"
        )
    chosen = [lin for lin in shape.linears() if any(_suffix(lin.name, n) for n in names)]
    if not chosen:
        known = ", ".join(lin.name.rsplit(".", 1)[-1] for lin in shape.linears())
        raise PlanError(
            f"spec.lora.targetModules {list(names)} match no layer of this {shape.model_type} "
            f"model (its linear layers: {known})"
        )
    return chosen


def _suffix(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target) or name.rsplit(".", 1)[-1] == target


def lora_parameters(
    shape: ModelShape,
    rank: int,
    targets: Sequence[str],
    task: str = "causal-lm",
    num_labels: int = 2,
) -> int:
    """A (fan_in x r) and B (r x fan_out) per adapted linear, and for classification the copy
    of the new head that peft trains (`modules_to_save`)."""
    per_layer = sum(rank * (lin.fan_in + lin.fan_out) for lin in lora_targets(shape, targets))
    total = shape.num_layers * per_layer
    if task == "causal-lm":
        return total
    h = shape.hidden_size
    pooler = not shape.decoder
    if pooler and targets and any(_suffix("pooler.dense", t) for t in targets):
        total += rank * 2 * h  # a target such as "dense" also adapts BERT's pooler
    return total + _classifier(shape, num_labels)


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


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """An estimate against a device's memory, with the least change that makes it fit."""

    estimate: Estimate
    setup: Setup
    device_bytes: int | None
    fits: bool | None  # None: the device's memory is not known
    suggestion: Setup | None = None
    message: str = ""


def usable(device_bytes: int) -> int:
    return int(device_bytes * HEADROOM)


def check(
    shape: ModelShape, setup: Setup, device_bytes: int | None, max_devices: int = 1
) -> Verdict:
    """Whether `setup` fits `device_bytes` and, if not, the first of `alternatives` that does."""
    est = estimate(shape, setup)
    need = human_bytes(est.peak)
    if device_bytes is None:
        return Verdict(est, setup, None, None, message=f"needs about {need} per device")
    have = human_bytes(device_bytes)
    if est.peak <= usable(device_bytes):
        return Verdict(est, setup, device_bytes, True, message=f"needs {need} of {have}")
    for candidate in alternatives(setup, max_devices):
        peak = estimate(shape, candidate).peak
        if peak <= usable(device_bytes):
            changes = ", ".join(_changes(setup, candidate))
            return Verdict(
                est,
                setup,
                device_bytes,
                False,
                suggestion=candidate,
                message=f"needs {need} per device, more than the {have} available; "
                f"with {changes} it needs {human_bytes(peak)}",
            )
    return Verdict(
        est,
        setup,
        device_bytes,
        False,
        message=f"needs {need} per device, more than the {have} available, and does not fit "
        f"even with batch size 1, activation checkpointing and sharding over {max_devices} "
        "GPUs; use method lora or qlora, a shorter maxSeqLength or larger GPUs",
    )


def alternatives(setup: Setup, max_devices: int) -> list[Setup]:
    """What to try, least disruptive first: a smaller batch (gradient accumulation keeps the
    global batch), then activation checkpointing, then FSDP over more of the job's GPUs."""
    out: list[Setup] = []
    degrees = [setup.sharding_degree] + [
        d for d in _powers_of_two(max_devices) if d > setup.sharding_degree
    ]
    for degree in degrees:
        for ckpt in dict.fromkeys([setup.activation_checkpointing, True]):
            for batch in range(setup.batch_size, 0, -1):
                out.append(
                    replace(
                        setup,
                        batch_size=batch,
                        activation_checkpointing=ckpt,
                        sharding_degree=degree,
                    )
                )
    return [s for s in out if s != setup]


def _powers_of_two(limit: int) -> list[int]:
    values = [2**k for k in range(1, max(limit, 1).bit_length()) if 2**k <= limit]
    return [*values, limit] if limit > 1 and limit not in values else values


def _changes(setup: Setup, fit: Setup) -> list[str]:
    changes: list[str] = []
    if fit.batch_size != setup.batch_size:
        changes.append(
            f"batchSize {fit.batch_size} (gradientAccumulationSteps keeps the global batch)"
        )
    if fit.activation_checkpointing != setup.activation_checkpointing:
        changes.append("activationCheckpointing")
    if fit.sharding_degree != setup.sharding_degree:
        changes.append(f"FSDP over {fit.sharding_degree} GPUs")
    return changes


def human_bytes(value: int) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


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
