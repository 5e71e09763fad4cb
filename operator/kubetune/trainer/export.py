"""The end product (rank 0): a Hugging Face checkpoint, its metadata and a Triton repository.

Layout of paths.output::

    config.json, model.safetensors, tokenizer files   save_pretrained (label map in config.json)
    triton-repository/<model>/...                     when spec.output.triton
    kubetune-model.json                               written LAST: its presence means complete

A LoRA run with spec.lora.merge writes a plain checkpoint with the adapters folded into the base
weights; without merge it writes the adapter (adapter_config.json + weights) and, for Triton, a
merged copy packaged into the repository, because the serving side never imports peft.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import kubetune
from kubetune.api.contract import OUTPUT
from kubetune.api.v1alpha1.finetunejob import OutputStatus
from kubetune.api.v1alpha1.trainerconfig import TrainerConfig
from kubetune.trainer.modeling import is_lora
from kubetune.trainer.sources import s3_client

METADATA_FILE = "kubetune-model.json"
METADATA_FORMAT = "kubetune.io/model/v1"
TRITON_DIR = "triton-repository"


def model_name(config: TrainerConfig) -> str:
    """The name Triton serves it under: the FineTuneJob's name, else the output folder's."""
    raw = config.job.name if config.job else Path(config.paths.output).name or "model"
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", raw)


def export(
    config: TrainerConfig,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    labels: list[str] | None,
    metrics: dict[str, float],
    steps: int,
) -> OutputStatus:
    spec = config.spec
    output = Path(config.paths.output)
    output.mkdir(parents=True, exist_ok=True)
    _clear_previous_export(output)
    lora = is_lora(spec)
    merge = not lora or spec.lora is None or spec.lora.merge
    final = model.merge_and_unload() if lora and merge else model  # type: ignore[operator]
    servable = _save(final, tokenizer, output)
    triton_uri = None
    if spec.output.triton:
        _package_for_triton(config, output if merge else _merged_copy(model, tokenizer, output))
        triton_uri = f"{spec.output.uri.rstrip('/')}/{TRITON_DIR}"
    metadata = _metadata(config, output, labels, metrics, steps)
    metadata.update(loraMerged=lora and merge, servable=servable)
    metadata["tritonModelName"] = model_name(config) if triton_uri else None
    temp = output / f".{METADATA_FILE}.tmp"
    temp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, output / METADATA_FILE)
    if config.paths.upload_uri:
        upload(output, config.paths.upload_uri)
    return OutputStatus(
        model_uri=spec.output.uri, triton_repository_uri=triton_uri, metrics=metrics
    )


def _package_for_triton(config: TrainerConfig, source: Path) -> None:
    """`<output>/triton-repository/<model name>/`, by the serving module's writer."""
    from kubetune.serving import repository  # file I/O only, no torch

    output = Path(config.paths.output)
    try:
        repository.write_model_repository(
            source,
            output / TRITON_DIR,
            model_name(config),
            config.spec.task,
            max_sequence_length=config.spec.hyperparameters.max_seq_length,
        )
    finally:
        if source != output:  # a merged copy made only for packaging
            shutil.rmtree(source, ignore_errors=True)


def _metadata(
    config: TrainerConfig,
    output: Path,
    labels: list[str] | None,
    metrics: dict[str, float],
    steps: int,
) -> dict[str, Any]:
    """kubetune-model.json: what the model is, how it was made, and checksums of its weights
    (the combined checksum has the serving manifest's format, so the two can be compared)."""
    from kubetune.serving import repository

    spec = config.spec
    weights = [
        repository.WeightsFile(p.name, repository.sha256_file(p), p.stat().st_size)
        for p in _weight_paths(output)
    ]
    return {
        "format": METADATA_FORMAT,
        "task": str(spec.task),
        "method": str(spec.method),
        "labels": labels,
        "baseModel": spec.model.source,
        "baseModelRevision": spec.model.revision,
        "maxSequenceLength": spec.hyperparameters.max_seq_length,
        "metrics": metrics,
        "trainedSteps": steps,
        "weights": [{"file": w.name, "sha256": w.sha256, "size": w.size} for w in weights],
        "weightsSha256": repository.combined_checksum(weights) if weights else None,
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "kubetuneVersion": kubetune.__version__,
    }


def _save(model: torch.nn.Module, tokenizer: Any, folder: Path) -> bool:
    """save_pretrained; returns whether the folder is a plain (servable) checkpoint."""
    model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


def _merged_copy(model: torch.nn.Module, tokenizer: Any, output: Path) -> Path:
    """An unmerged adapter stays in the output; Triton gets a merged copy (peft's merge on a copy
    would double the memory, so the adapters are merged in place: the adapter is already saved)."""
    folder = output / ".merged-for-triton"
    shutil.rmtree(folder, ignore_errors=True)
    _save(model.merge_and_unload(), tokenizer, folder)  # type: ignore[operator]
    return folder


WEIGHTS = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


def _weight_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and WEIGHTS.match(p.name))


def _clear_previous_export(output: Path) -> None:
    """Removes what an earlier export of this job left (the metadata first: until it is written
    again the folder reads as incomplete), so no stale weights file is counted as this model's:
    a full run's model.safetensors next to a later LoRA run's adapter, say."""
    (output / METADATA_FILE).unlink(missing_ok=True)
    stale = [
        *_weight_paths(output),
        output / "adapter_config.json",
        output / "model.safetensors.index.json",
    ]
    for path in stale:
        path.unlink(missing_ok=True)


def upload(folder: Path, uri: str) -> None:
    """Copies the output folder to s3://bucket/prefix (paths.uploadUri) with boto3, with the
    output's own credentials (spec.output.secretRef)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3_client(OUTPUT)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(
            part.startswith(".") for part in path.relative_to(folder).parts
        ):
            key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(folder).as_posix()]))
            client.upload_file(str(path), bucket, key)
