"""The pre-flight check (`python -m kubetune.trainer preflight`): sources reachable, data valid,
memory planned against the GPU the operator names — on the shipped MiniLM checkpoint and data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune import planner
from kubetune.api.contract import PreflightEnv
from kubetune.api.v1alpha1.finetunejob import Hyperparameters
from kubetune.api.v1alpha1.reasons import ValidatedReason
from kubetune.api.v1alpha1.trainerconfig import (
    PreflightResult,
    TrainerConfig,
)
from kubetune.devcluster.demo import minilm_checkpoint
from kubetune.trainer.preflight import check, plan
from tests.unit.test_planner import LLAMA_7B

ROOT = Path(__file__).resolve().parents[3]
DATASET = ROOT / "examples" / "data" / "support-intents.jsonl"
GIB = 1024**3


def config(
    tmp_path: Path, model: str | None = None, dataset: Path = DATASET, **hp: Any
) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "spec": {
                "model": {"source": "pvc://models/minilm"},
                "dataset": {"source": "pvc://data/train.jsonl"},
                "hyperparameters": {"batchSize": 16, "maxSeqLength": 128, **hp},
                "resources": {"gpusPerNode": 1},
                "output": {"uri": "pvc://models/out"},
            },
            "paths": {
                "model": model or str(minilm_checkpoint()),
                "dataset": str(dataset),
                "output": str(tmp_path / "out"),
                "checkpoints": str(tmp_path / "ckpt"),
            },
            "reporting": {"toApiServer": False},
        }
    )


def gpu(size: int, source: str = "node label nvidia.com/gpu.memory") -> dict[str, str]:
    return {PreflightEnv.GPU_MEMORY_BYTES: str(size), PreflightEnv.GPU_MEMORY_SOURCE: source}


def test_fits_a_large_gpu(tmp_path: Path) -> None:
    result = check(config(tmp_path), gpu(80 * GIB))
    assert result.validated is True
    assert result.reason == ValidatedReason.FITS
    plan = result.plan
    assert plan is not None and plan.fits is True
    assert plan.parameters == 22_715_526  # MiniLM-L6 with its 6-intent classifier, as loaded
    assert plan.device_memory_bytes == 80 * GIB
    assert plan.device_memory_source == "node label nvidia.com/gpu.memory"
    assert 0 < plan.per_device_bytes < 4 * GIB


def test_does_not_fit_and_suggests_a_batch_size(tmp_path: Path) -> None:
    result = check(config(tmp_path, batchSize=512, maxSeqLength=512), gpu(3 * GIB))
    assert result.validated is False
    assert result.reason == ValidatedReason.DOES_NOT_FIT
    assert result.plan is not None and result.plan.fits is False
    assert result.plan.per_device_bytes > 3 * GIB
    suggestion = result.plan.suggestion
    assert suggestion is not None and suggestion.batch_size is not None
    assert suggestion.batch_size < 512
    assert f"batchSize {suggestion.batch_size}" in result.message


def test_without_gpu_memory_the_plan_is_reported_unjudged(tmp_path: Path) -> None:
    result = check(config(tmp_path), {})
    assert result.validated is True
    assert result.reason == ValidatedReason.MEMORY_UNKNOWN
    assert result.plan is not None and result.plan.fits is None
    assert "spec.resources.gpuMemory" in result.message


def test_a_missing_model_is_refused(tmp_path: Path) -> None:
    result = check(config(tmp_path, model=str(tmp_path / "nothing")), gpu(80 * GIB))
    assert (result.validated, result.reason) == (False, ValidatedReason.MODEL_NOT_FOUND)
    assert "does not exist" in result.message
    assert result.plan is None


def test_an_unreachable_hub_model_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub: the real client says so
    result = check(config(tmp_path, model="hf://nobody/no-such-model"), gpu(80 * GIB))
    assert (result.validated, result.reason) == (False, ValidatedReason.MODEL_NOT_FOUND)
    assert "hf://nobody/no-such-model (spec.model.source)" in result.message


def test_bad_data_is_refused_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "hello", "label": "a"}\n{"text": "no label"}\n', encoding="utf-8")
    result = check(config(tmp_path, dataset=bad), gpu(80 * GIB))
    assert (result.validated, result.reason) == (False, ValidatedReason.BAD_DATA)
    assert f"line 2 of {bad}" in result.message


def test_the_command_writes_the_verdict_without_importing_torch(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(config(tmp_path).model_dump_json(by_alias=True), encoding="utf-8")
    log = tmp_path / "termination-log"
    script = (
        "import sys; from kubetune.trainer.__main__ import main; "
        f"code = main(['preflight', '--config', {str(path)!r}]); "
        "assert 'torch' not in sys.modules, 'the pre-flight imported torch'; sys.exit(code)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'operator'}",
        "KUBETUNE_TERMINATION_LOG": str(log),
        **gpu(80 * GIB, "spec.resources.gpuMemory"),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = PreflightResult.model_validate_json(log.read_text(encoding="utf-8"))
    assert result.reason == ValidatedReason.FITS
    (event,) = [json.loads(line) for line in done.stdout.splitlines() if '"preflight"' in line]
    assert event["plan"]["deviceMemorySource"] == "spec.resources.gpuMemory"


def test_sharding_auto_plans_fsdp_over_the_jobs_gpus(tmp_path: Path) -> None:
    """hyperparameters.sharding (items 1-2 of issue 10) is read by name: a spec that has it
    with `auto` is planned with FSDP over every GPU of the job when one GPU is not enough."""

    class WithSharding(Hyperparameters):
        sharding: str = "auto"

    base = config(tmp_path, batchSize=8, maxSeqLength=128).spec
    spec = base.model_copy(
        update={
            "hyperparameters": WithSharding(batch_size=8, max_seq_length=128),
            "resources": base.resources.model_copy(update={"gpus_per_node": 8}),
        }
    )
    shape = planner.shape_from_config(LLAMA_7B)
    verdict = plan(shape, spec, 2, 80 * GIB)
    assert verdict.fits is True
    assert verdict.setup.sharding_degree == 8
    assert verdict.message.startswith("sharding auto: FSDP over 8 GPUs")
    unsharded = base.hyperparameters.model_copy(update={"sharding": "none"})
    alone = plan(
        shape,
        base.model_copy(update={"resources": spec.resources, "hyperparameters": unsharded}),
        2,
        80 * GIB,
    )
    assert alone.fits is False and alone.setup.sharding_degree == 1
