"""Model, tokenizer, LoRA, precision and the optimizer: everything the loop trains.

The choices that make training fast live here: bf16 autocast where the GPU has it, fused AdamW
(CUDA and CPU), no weight decay on biases and norms, and (for LoRA on a GPU) frozen base weights
kept in the 16-bit training dtype, which halves their memory while the adapters train in fp32.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kubetune.api.v1alpha1.finetunejob import (
    FineTuneJobSpec,
    Hyperparameters,
    LoraSpec,
    Method,
    Precision,
    Task,
)
from kubetune.trainer.errors import ConfigError, ModelNotFoundError


def load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's tokenizer, with a pad token (causal LMs often ship without one)."""
    from transformers import AutoTokenizer  # heavy; only in training pods

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load a tokenizer from {model_dir} (paths.model): {exc}"
        ) from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelNotFoundError(
                f"the tokenizer in {model_dir} has neither a pad nor an eos token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    auto picks bf16 where the hardware multiplies bf16 natively (no loss scaling needed): a GPU
    that supports it, or a CPU with AMX or AVX512-BF16 (bench/bench_trainer.py: about 30% less
    time per step than fp32 on a Sapphire Rapids core); fp32 elsewhere. bf16 asked for on a CPU
    is honoured (slower without native support); fp16 on a CPU falls back to fp32, as CPU fp16
    autocast has neither native kernels nor a loss scaler here.
    """
    if precision == Precision.FP32:
        return None
    if device.type != "cuda":
        if precision == Precision.AUTO:
            return torch.bfloat16 if cpu_has_native_bf16() else None
        return torch.bfloat16 if precision == Precision.BF16 else None
    if precision == Precision.AUTO:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(Precision(precision))


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16, as torch's own CPU feature probe sees them (and the OS allows)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def load_model(
    model_dir: Path,
    spec: FineTuneJobSpec,
    labels: list[str] | None,
    pad_token_id: int,
    base_dtype: torch.dtype | None,
    quantize: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The pretrained model with the task's head (a new classifier for classification).

    `quantize` holds from_pretrained's quantization_config and device_map (QLoRA's 4-bit base)."""
    import transformers

    # An explicit dtype: transformers 5 otherwise loads in the checkpoint's dtype (bf16 for most
    # published LLMs), which would leave full fine-tuning without fp32 master weights.
    kwargs: dict[str, Any] = {**(quantize or {}), "dtype": base_dtype or torch.float32}
    try:
        if spec.task == Task.SEQUENCE_CLASSIFICATION:
            assert labels is not None
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                model_dir,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                pad_token_id=pad_token_id,
                **kwargs,
            )
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(
            f"cannot load a {spec.task} model from {model_dir} (paths.model, spec.model.source "
            f"{spec.model.source}): {exc}"
        ) from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model  # type: ignore[no-any-return]


def apply_lora(model: torch.nn.Module, spec: FineTuneJobSpec) -> torch.nn.Module:
    """Wraps the model with LoRA adapters; only they (and a new classifier head) train."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = spec.lora or LoraSpec()
    task_type = (
        TaskType.SEQ_CLS if spec.task == Task.SEQUENCE_CLASSIFICATION else TaskType.CAUSAL_LM
    )
    config = LoraConfig(
        task_type=task_type,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or None,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            f"LoRA cannot adapt this model: {exc}; name the layers in spec.lora.targetModules"
        ) from exc
    for param in wrapped.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # adapters train in fp32 over 16-bit frozen weights
    return wrapped


LORA_METHODS = (Method.LORA, Method.QLORA)
HEAD_MODULES = ["classifier", "score", "lm_head"]  # never quantised: new or tied heads


def is_lora(spec: FineTuneJobSpec) -> bool:
    return spec.method in LORA_METHODS


def nf4_loading(device: torch.device, compute_dtype: torch.dtype | None) -> dict[str, Any]:
    """from_pretrained arguments that load the base in 4-bit NF4 with bitsandbytes (QLoRA:
    double quantisation, bf16 compute unless the run is fp32), placed on this rank's device."""
    try:
        import bitsandbytes  # noqa: F401  # transformers imports it by name; fail here, clearly
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ConfigError(
            f"spec.method qlora needs the 'bitsandbytes' package, which does not import in this "
            f"image: {exc}"
        ) from exc
    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        llm_int8_skip_modules=HEAD_MODULES,
    )
    return {"quantization_config": config, "device_map": {"": device}}


def build_model(
    model_dir: Path,
    spec: FineTuneJobSpec,
    labels: list[str] | None,
    pad_token_id: int,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
) -> torch.nn.Module:
    """Full fine-tuning keeps fp32 master weights; LoRA may keep the frozen base in 16 bits,
    QLoRA keeps it in 4-bit NF4 (already on `device`: bitsandbytes quantises as it places)."""
    if spec.method == Method.QLORA:
        quantize = nf4_loading(device, autocast_dtype)
        model = load_model(model_dir, spec, labels, pad_token_id, None, quantize)
        keep_4bit_layout_trainable(model)
        return apply_lora(prepare_4bit(model, spec), spec)
    lora = spec.method == Method.LORA
    base_dtype = autocast_dtype if lora else None
    model = load_model(model_dir, spec, labels, pad_token_id, base_dtype)
    if spec.hyperparameters.activation_checkpointing:
        enable_activation_checkpointing(model)
    return apply_lora(model, spec) if lora else model


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes 0.50 repacks a Linear4bit's weights in place for its CPU inference kernel the
    first time the layer runs in eval mode without gradients; training on the repacked layout then
    fails (an in-place add on a view of a leaf). The trainer evaluates between epochs, so that
    repacking is switched off (the flag its forward consults): evaluation uses the training kernel.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010


def prepare_4bit(model: torch.nn.Module, spec: FineTuneJobSpec) -> torch.nn.Module:
    """peft's preparation of a k-bit base: the weights that stay unquantised (norms, embeddings)
    in fp32 for stable training, everything frozen, input gradients for checkpointing."""
    from peft import prepare_model_for_kbit_training

    checkpointing = spec.hyperparameters.activation_checkpointing
    return prepare_model_for_kbit_training(  # type: ignore[no-untyped-call,no-any-return]
        model,
        use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Each transformer block keeps only its input for the backward pass and recomputes the rest
    (non-reentrant torch.utils.checkpoint, which also works under FSDP and with frozen inputs)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"hyperparameters.activationCheckpointing: {type(model).__name__} does not support "
            "activation checkpointing; set it to false"
        )
    model.gradient_checkpointing_enable(  # type: ignore[operator]
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )


def build_export_model(
    model_dir: Path,
    spec: FineTuneJobSpec,
    labels: list[str] | None,
    pad_token_id: int,
    autocast_dtype: torch.dtype | None,
    state: dict[str, torch.Tensor],
) -> torch.nn.Module:
    """An unsharded, unquantised copy on the host holding the trained weights: what an FSDP run
    (`state`: every weight, gathered once) or a QLoRA run (`state`: adapters and head; the base
    is reloaded in bf16, so the merge happens in bf16 rather than in 4 bits) exports."""
    lora = is_lora(spec)
    base_dtype = {Method.QLORA: torch.bfloat16, Method.LORA: autocast_dtype}.get(
        Method(spec.method)
    )
    model = load_model(model_dir, spec, labels, pad_token_id, base_dtype)
    if lora:
        model = apply_lora(model, spec)
    load_trainable_state(model, state, lora)
    return model


def build_optimizer(
    model: torch.nn.Module, hp: Hyperparameters, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights get no weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": hp.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CUDA, and CPU since torch 2.4) updates every tensor in one pass: on
    # MiniLM it makes the CPU optimizer step about 6x faster than the per-tensor loop.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        groups, lr=hp.learning_rate, fused=fused, foreach=None if fused else True
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear decay to zero at the last step."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_state(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: every weight for full fine-tuning, only trained ones for LoRA."""
    if not lora:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], lora: bool
) -> None:
    """Restores checkpointed weights; a mismatch means the spec's model or method changed."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    try:
        result = model.load_state_dict(state, strict=not lora)
    except RuntimeError as exc:
        raise ConfigError(f"the checkpoint does not fit this model: {exc}") from exc
    absent = sorted(trainable - state.keys()) if lora else []
    if result.unexpected_keys or absent:
        raise ConfigError(
            f"the checkpoint does not fit this model (unexpected {result.unexpected_keys[:5]}, "
            f"absent {absent[:5]}): were spec.model or spec.method changed?"
        )
