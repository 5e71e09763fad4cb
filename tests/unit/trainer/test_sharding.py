"""Choosing FSDP, finding the blocks to shard, and the CPU precision rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.trainer import modeling, sharding
from kubetune.trainer.distributed import DistContext
from kubetune.trainer.errors import ConfigError
from tests.e2e.conftest import minilm_dir
from tests.unit.test_planner import LLAMA_7B

GIB = 2**30


def spec(**fields: object) -> FineTuneJobSpec:
    hp = {k: v for k, v in fields.items() if k != "method"}
    return FineTuneJobSpec.model_validate(
        {
            "model": {"source": "hf://org/model"},
            "dataset": {"source": "pvc://data/train.jsonl"},
            "output": {"uri": "pvc://out/model"},
            "method": fields.get("method", "full"),
            "hyperparameters": hp,
        }
    )


def test_estimate_counts_16_bytes_per_trained_parameter_and_less_per_frozen_one() -> None:
    seven_b = 7_000_000_000
    # A full fine-tune of 7B needs ~112 GB: an 80 GiB GPU cannot hold it, a 141 GiB one can
    # (with a fifth left for activations); 13B (~208 GB) fits neither.
    assert not sharding.estimate_fits_one_device(spec(), seven_b, seven_b, 80 * GIB)
    assert sharding.estimate_fits_one_device(spec(), seven_b, seven_b, 141 * GIB)
    thirteen_b = 13_000_000_000
    assert not sharding.estimate_fits_one_device(spec(), thirteen_b, thirteen_b, 141 * GIB)
    # LoRA (40M adapters) over a 16-bit base: ~14.6 GB.
    assert sharding.estimate_fits_one_device(spec(method="lora"), seven_b, 40_000_000, 24 * GIB)
    # QLoRA's 4-bit base: ~4.5 GB fits a 8 GB card, LoRA's 16-bit one does not.
    qlora, lora = spec(method="qlora"), spec(method="lora")
    assert sharding.estimate_fits_one_device(qlora, seven_b, 40_000_000, 8 * GIB)
    assert not sharding.estimate_fits_one_device(lora, seven_b, 40_000_000, 8 * GIB)


def test_without_a_process_group_nothing_is_sharded() -> None:
    model = torch.nn.Linear(4, 4)
    assert not sharding.use_fsdp(spec(sharding="fsdp"), DistContext(), model)
    assert not sharding.use_fsdp(spec(sharding="auto"), DistContext(), model)


def test_qlora_refuses_fsdp_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"hyperparameters\.sharding fsdp cannot shard"):
        sharding.use_fsdp(
            spec(method="qlora", sharding="fsdp"), DistContext(), torch.nn.Linear(2, 2)
        )


def test_blocks_are_the_classes_the_model_declares_unsplittable() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    assert sharding.block_classes(model) == {"GPT2Block"}


@pytest.mark.parametrize(
    ("precision", "expected"),
    [("fp32", None), ("fp16", None), ("bf16", torch.bfloat16)],
)
def test_cpu_precision(precision: str, expected: torch.dtype | None) -> None:
    assert modeling.resolve_precision(precision, torch.device("cpu")) == expected


def test_cpu_auto_precision_follows_native_bf16() -> None:
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    auto = modeling.resolve_precision("auto", torch.device("cpu"))
    assert auto == (torch.bfloat16 if native else None)
    assert modeling.cpu_has_native_bf16() is native


def test_sharding_auto_shards_exactly_when_the_plan_says_one_device_does_not_fit(
    tmp_path: Path,
) -> None:
    """`auto` decides with the memory planner on the model's config.json (the arithmetic the
    pre-flight pod used before scheduling): a full fine-tune of a 7B Llama (~120 GiB planned)
    is sharded over 2 processes on 80 GiB GPUs and not on 141 GiB ones; LoRA of the same model
    fits one 80 GiB GPU; MiniLM is never sharded; one process or an unknown device never is."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B), encoding="utf-8")
    llama = sharding.planner_fits(tmp_path, num_labels=2)
    minilm = sharding.planner_fits(minilm_dir(), num_labels=6)
    full = spec(sharding="auto", batchSize=1, maxSeqLength=512)
    full.resources.gpus_per_node = 1
    lora = full.model_copy(update={"method": "lora"})

    def auto(s: FineTuneJobSpec, fits: sharding.FitsOneDevice, gib: int | None, world=2) -> bool:
        memory = None if gib is None else gib * GIB
        return sharding.auto_shards(s, world, memory, 0, 0, fits)  # counts: the planner's own

    assert auto(full, llama, 80)
    assert not auto(full, llama, 141)
    assert not auto(lora, llama, 80)
    assert not auto(full, minilm, 16)
    assert not auto(full, llama, 80, world=1)
    assert not auto(full, llama, None)
    # the same verdict as the planner's check at sharding degree 1
    from kubetune import planner

    setup = planner.setup_from_spec(full, num_labels=2)
    assert planner.check(planner.shape_from_config(LLAMA_7B), setup, 80 * GIB).fits is False


def test_sharding_auto_falls_back_to_the_rough_estimate_without_a_readable_config(
    tmp_path: Path,
) -> None:
    """A model folder whose config.json the planner cannot read (here: none) is judged on the
    measured parameter counts by `estimate_fits_one_device`."""
    fits = sharding.planner_fits(tmp_path, num_labels=2)
    seven_b = 7_000_000_000
    assert fits(spec(), seven_b, seven_b, 141 * GIB)
    assert not fits(spec(), seven_b, seven_b, 80 * GIB)
