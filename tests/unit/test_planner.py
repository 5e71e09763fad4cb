"""The memory planner against transformers' own parameter counts, against the measured peak of
real CPU training steps, and against published figures for known model sizes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from kubetune import planner
from kubetune.devcluster.demo import minilm_checkpoint
from kubetune.planner import GIB, Setup
from tests.memory_probe import StoragePeak

TOLERANCE = 0.05  # measured: -2.8 % .. +2.5 % (bench/bench_planner.py prints each case)


def minilm_config() -> dict[str, Any]:
    return json.loads((minilm_checkpoint() / "config.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 256,
}
LLAMA_7B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 4096,
}
LLAMA_65B: dict[str, Any] = {
    **LLAMA_7B,
    "hidden_size": 8192,
    "intermediate_size": 22016,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
SMALL = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "vocab_size": 500}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama-gqa": TINY_LLAMA,
    "llama-7b": LLAMA_7B,
    "mistral": {
        **SMALL,
        "model_type": "mistral",
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
    },
    "qwen2-bias": {
        **SMALL,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "qwen3-head-norms": {
        **SMALL,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
    },
    "gemma-tied": {
        **SMALL,
        "model_type": "gemma",
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
    },
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 500,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 128,
    },
    "bert": {
        **SMALL,
        "model_type": "bert",
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    },
}


def hf_model(config: dict[str, Any], task: str, num_labels: int = 2, meta: bool = False) -> Any:
    cfg = transformers.AutoConfig.for_model(**config)
    auto = (
        transformers.AutoModelForCausalLM
        if task == "causal-lm"
        else transformers.AutoModelForSequenceClassification
    )
    if task != "causal-lm":
        cfg.num_labels = num_labels
        cfg.pad_token_id = 0
    with torch.device("meta" if meta else "cpu"):
        return auto.from_config(cfg)


COUNT_CASES = [
    (family, task)
    for family in sorted(FAMILIES)
    for task in ("causal-lm", "sequence-classification")
    if (family, task) != ("bert", "causal-lm")
]


@pytest.mark.parametrize(("family", "task"), COUNT_CASES)
def test_parameter_count_is_exact(family: str, task: str) -> None:
    config = FAMILIES[family]
    model = hf_model(config, task, num_labels=5, meta=True)
    expected = sum(p.numel() for p in model.parameters())
    counted = planner.count_parameters(planner.shape_from_config(config), task, num_labels=5)
    assert counted.total == expected


def test_published_llama_sizes() -> None:
    """LLaMA-7B has 6,738,415,616 parameters (Touvron et al.), LLaMA-65B 65.3 billion."""
    assert planner.count_parameters(planner.shape_from_config(LLAMA_7B), "causal-lm").total == (
        6_738_415_616
    )
    big = planner.count_parameters(planner.shape_from_config(LLAMA_65B), "causal-lm").total
    assert 65.0e9 < big < 65.5e9


def test_lora_defaults_are_peft_defaults() -> None:
    for model_type, targets in planner.LORA_DEFAULT_TARGETS.items():
        assert list(targets) == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]


@pytest.mark.parametrize(
    ("family", "task", "targets"),
    [
        ("llama-gqa", "causal-lm", ()),
        ("llama-gqa", "causal-lm", ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")),
        ("gpt2", "causal-lm", ()),
        ("bert", "sequence-classification", ()),
        ("bert", "sequence-classification", ("query", "key", "dense")),
    ],
)
def test_trainable_lora_parameters_match_peft(
    family: str, task: str, targets: tuple[str, ...]
) -> None:
    config = FAMILIES[family]
    model = hf_model(config, task, num_labels=3)
    kind = TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS
    lora = LoraConfig(task_type=kind, r=4, target_modules=list(targets) or None)
    trainable = sum(p.numel() for p in get_peft_model(model, lora).parameters() if p.requires_grad)
    setup = Setup(task=task, method="lora", lora_rank=4, lora_targets=targets, num_labels=3)
    assert planner.estimate(planner.shape_from_config(config), setup).trainable_parameters == (
        trainable
    )


def test_unknown_lora_target_names_the_field() -> None:
    shape = planner.shape_from_config(TINY_LLAMA)
    with pytest.raises(planner.PlanError, match=r"spec.lora.targetModules \['query'\]"):
        planner.lora_parameters(shape, 8, ["query"])


def test_missing_config_key_is_named() -> None:
    with pytest.raises(planner.PlanError, match="'num_hidden_layers'"):
        planner.shape_from_config({"model_type": "llama", "hidden_size": 8, "vocab_size": 4})


# ---------------------------------------------------------------------------- measured peaks


def measured_peak(model: Any, batch: dict[str, torch.Tensor], steps: int = 2) -> int:
    """Peak live tensor bytes over real AdamW steps (the second one has optimizer state)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    probe = StoragePeak([*model.parameters(), *model.buffers()])
    with probe:
        for _ in range(steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return probe.peak


CASES = [
    # model, method, batch, sequence, activation checkpointing
    ("minilm", "full", 8, 64, False),
    ("minilm", "lora", 8, 64, False),
    ("minilm", "full", 16, 64, True),
    ("llama", "full", 4, 64, False),
    ("llama", "full", 4, 128, True),
    ("llama", "lora", 4, 128, False),
    ("llama", "lora", 4, 128, True),
]


def measure_case(
    kind: str, method: str, batch: int, seq: int, checkpointing: bool
) -> tuple[int, planner.Estimate]:
    """(measured peak bytes, the planner's estimate) of one case (bench/bench_planner.py too)."""
    torch.manual_seed(0)
    if kind == "minilm":
        config, task = minilm_config(), "sequence-classification"
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm_checkpoint(), num_labels=6
        )
        labels = torch.randint(0, 6, (batch,))
    else:
        config, task = TINY_LLAMA, "causal-lm"
        model = hf_model(TINY_LLAMA, task)
    ids = torch.randint(1000, 2000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 :] = 0  # a padded row, as in real batches
    if task == "causal-lm":
        labels = ids
    if method == "lora":
        kind_ = TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS
        model = get_peft_model(model, LoraConfig(task_type=kind_, r=8, lora_dropout=0.05))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peak = measured_peak(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    setup = Setup(
        task=task,
        method=method,
        on_gpu=False,
        batch_size=batch,
        seq_length=seq,
        activation_checkpointing=checkpointing,
        num_labels=6,
    )
    return peak, planner.estimate(planner.shape_from_config(config), setup)


@pytest.mark.parametrize(("kind", "method", "batch", "seq", "checkpointing"), CASES)
def test_peak_matches_a_measured_cpu_step(
    kind: str, method: str, batch: int, seq: int, checkpointing: bool
) -> None:
    peak, estimate = measure_case(kind, method, batch, seq, checkpointing)
    assert estimate.peak == pytest.approx(peak, rel=TOLERANCE), (estimate.peak / peak - 1, peak)


# ---------------------------------------------------------------------------- published figures


def gpu_setup(**kwargs: Any) -> Setup:
    return Setup(task="causal-lm", precision="bf16", on_gpu=True, **kwargs)


def test_full_finetune_of_7b_needs_16_bytes_per_parameter() -> None:
    """Mixed-precision AdamW: fp32 weights, gradients and two moments, about 112 GB for 7B."""
    shape = planner.shape_from_config(LLAMA_7B)
    fp32 = planner.estimate(shape, Setup(task="causal-lm", precision="fp32", seq_length=512))
    assert fp32.weights + fp32.gradients + fp32.optimizer == 16 * fp32.parameters
    assert 100e9 < 16 * fp32.parameters < 112e9
    bf16 = planner.estimate(shape, gpu_setup(batch_size=1, seq_length=512))
    assert bf16.weights > fp32.weights  # plus autocast's 16-bit copies of the matmul weights
    verdict = planner.check(shape, gpu_setup(batch_size=1, seq_length=512), 80 * GIB, 8)
    assert verdict.fits is False
    assert verdict.suggestion is not None and verdict.suggestion.sharding_degree >= 2
    sharded = planner.estimate(shape, verdict.suggestion)
    assert sharded.peak <= planner.usable(80 * GIB)


def test_lora_on_7b_keeps_a_16_bit_base() -> None:
    """LoRA: the frozen base in bf16 (about 13.5 GB for 7B), adapters a fraction of a percent."""
    est = planner.estimate(
        planner.shape_from_config(LLAMA_7B), gpu_setup(method="lora", batch_size=1, seq_length=512)
    )
    assert 13.0e9 < est.weights < 14.0e9
    assert est.trainable_parameters == 32 * 2 * 8 * (4096 + 4096)  # q_proj, v_proj at r=8
    assert est.peak < 24 * GIB  # a single 24 GB GPU


def test_qlora_fits_65b_on_one_48gb_gpu() -> None:
    """QLoRA (Dettmers et al. 2023): a 65B model fine-tunes on a single 48 GB GPU, where 16-bit
    full fine-tuning takes more than 780 GB; the 4-bit base alone is about 33 GB."""
    shape = planner.shape_from_config(LLAMA_65B)
    setup = gpu_setup(method="qlora", batch_size=1, seq_length=512, activation_checkpointing=True)
    est = planner.estimate(shape, setup)
    assert 32e9 < est.weights < 36e9
    assert planner.check(shape, setup, 48 * 10**9).fits is True
    full16 = 12 * est.parameters  # 16-bit weights and gradients, fp32 AdamW moments
    assert full16 > 780e9


def test_suggests_a_smaller_batch_first() -> None:
    shape = planner.shape_from_config(LLAMA_7B)
    setup = gpu_setup(method="lora", batch_size=32, seq_length=2048)
    verdict = planner.check(shape, setup, 24 * GIB, max_devices=1)
    assert verdict.fits is False
    assert verdict.suggestion is not None
    assert 1 <= verdict.suggestion.batch_size < 32
    assert "batchSize" in verdict.message


def test_unknown_device_memory_gives_no_verdict() -> None:
    verdict = planner.check(planner.shape_from_config(TINY_LLAMA), gpu_setup(), None)
    assert verdict.fits is None
    assert "needs about" in verdict.message
