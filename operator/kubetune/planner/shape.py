"""The model as the planner sees it: shapes and parameter counts from config.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
