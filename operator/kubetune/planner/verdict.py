"""An estimate against a device's memory, and the least change that makes it fit."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kubetune.planner.memory import GIB, HEADROOM, MIB, Estimate, Setup, estimate
from kubetune.planner.shape import ModelShape

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
