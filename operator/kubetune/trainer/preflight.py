"""The pre-flight check: `python -m kubetune.trainer preflight`, in a pod without GPUs, before
the training Job holds any.

1. The model source: its config.json alone (hf:// one file, s3:// one object, pvc:// the mounted
   folder), which proves the source exists and the credentials open it.
2. The dataset source: a local (pvc://) file is read and validated row by row with the very
   checks training runs; hf:// and s3:// are checked from metadata, nothing is downloaded.
3. The memory plan (`kubetune.planner`) from that config.json and the spec, against the memory of
   one GPU that the operator passes in $KUBETUNE_GPU_MEMORY_BYTES (and names the source of in
   $KUBETUNE_GPU_MEMORY_SOURCE).

The verdict is one `PreflightResult` JSON object, written as the container's termination message
and printed as a `preflight` event. The process exits 0 whenever it reached a verdict, whether
the job may run or not; a non-zero exit means the check itself could not run (a hub outage...),
which a retry may cure.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from kubetune import planner
from kubetune.api.contract import PreflightEnv
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec, Task
from kubetune.api.v1alpha1.reasons import ValidatedReason
from kubetune.api.v1alpha1.trainerconfig import (
    PreflightResult,
    TrainerConfig,
)
from kubetune.trainer import data, events
from kubetune.trainer.errors import Reason, TrainerError, write_termination_text
from kubetune.trainer.sources import probe_dataset, probe_model_config

REFUSALS = {
    Reason.MODEL_NOT_FOUND: ValidatedReason.MODEL_NOT_FOUND,
    Reason.BAD_DATA: ValidatedReason.BAD_DATA,
    Reason.ACCESS_DENIED: ValidatedReason.ACCESS_DENIED,
}


def preflight(config: TrainerConfig, environ: dict[str, str] | None = None) -> PreflightResult:
    """Runs the check and reports the verdict (stdout event, termination message)."""
    result = check(config, environ if environ is not None else dict(os.environ))
    events.emit("preflight", **result.to_wire())
    write_termination_text(json.dumps(result.to_wire(), separators=(",", ":")))
    return result


def check(config: TrainerConfig, environ: dict[str, str]) -> PreflightResult:
    spec = config.spec
    try:
        model_config = probe_model_config(config.paths.model, spec.model.revision)
        num_labels = check_dataset(config)
    except TrainerError as exc:
        if exc.reason not in REFUSALS:
            raise
        return PreflightResult(validated=False, reason=REFUSALS[exc.reason], message=exc.message)
    try:
        shape = planner.shape_from_config(model_config)
        device_bytes, source = gpu_memory(environ)
        verdict = plan(shape, spec, num_labels, device_bytes)
    except planner.PlanError as exc:
        return PreflightResult(validated=False, reason=ValidatedReason.PLAN_ERROR, message=str(exc))
    memory = planner.memory_plan(verdict, source)
    if verdict.fits is None:
        reason, message = (
            ValidatedReason.MEMORY_UNKNOWN,
            (
                f"sources reachable; {verdict.message} (no GPU memory to compare with: set "
                "spec.resources.gpuMemory or label the nodes nvidia.com/gpu.memory)"
            ),
        )
    elif verdict.fits:
        reason, message = ValidatedReason.FITS, f"sources reachable; {verdict.message}"
    else:
        reason, message = ValidatedReason.DOES_NOT_FIT, verdict.message
    return PreflightResult(
        validated=verdict.fits is not False, reason=reason, message=message, plan=memory
    )


def check_dataset(config: TrainerConfig) -> int:
    """Validates a local dataset as training would; the number of labels (2 when unknown)."""
    spec = config.spec
    location = probe_dataset(config.paths.dataset)
    if location is None:
        return 2
    path = data.find_data_file(location)
    table = data.read_table(path, data.detect_format(path, spec.dataset.format))
    if spec.task == Task.SEQUENCE_CLASSIFICATION:
        return len(data.classification_data(table, spec.dataset).labels)
    if spec.dataset.messages_field:
        data.chat_data(table, spec.dataset)
    else:
        data.causal_data(table, spec.dataset)
    return 2


def gpu_memory(environ: dict[str, str]) -> tuple[int | None, str | None]:
    value = environ.get(PreflightEnv.GPU_MEMORY_BYTES, "").strip()
    if not value:
        return None, None
    try:
        size = int(value)
    except ValueError as exc:
        raise planner.PlanError(
            f"${PreflightEnv.GPU_MEMORY_BYTES} is {value!r}, not a number of bytes"
        ) from exc
    return size, environ.get(PreflightEnv.GPU_MEMORY_SOURCE) or PreflightEnv.GPU_MEMORY_BYTES


def plan(
    shape: planner.ModelShape, spec: FineTuneJobSpec, num_labels: int, device_bytes: int | None
) -> planner.Verdict:
    """The verdict for the spec's own settings; `sharding: auto` plans FSDP over every GPU of
    the job when one GPU is not enough."""
    res = spec.resources
    devices = res.nodes * max(res.gpus_per_node, 1)
    sharding, checkpointing = _large_model_options(spec)
    degree = devices if sharding == "fsdp" else 1
    setup = planner.setup_from_spec(
        spec,
        num_labels=num_labels,
        sharding_degree=degree,
        activation_checkpointing=checkpointing,
    )
    verdict = planner.check(shape, setup, device_bytes, max_devices=devices)
    if sharding == "auto" and verdict.fits is False and devices > 1:
        sharded = planner.check(
            shape, dataclasses.replace(setup, sharding_degree=devices), device_bytes, devices
        )
        if sharded.fits:
            return dataclasses.replace(
                sharded, message=f"sharding auto: FSDP over {devices} GPUs; {sharded.message}"
            )
    return verdict


def _large_model_options(spec: FineTuneJobSpec) -> tuple[str, bool]:
    """hyperparameters.sharding and .activationCheckpointing (issue 10, items 1-2), read by name
    so this check works whether or not the spec has them yet."""
    hp: Any = spec.hyperparameters
    sharding = str(getattr(hp, "sharding", None) or "none")
    return sharding, bool(getattr(hp, "activation_checkpointing", False))
