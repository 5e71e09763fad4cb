"""The contract between the operator and the pods it creates, imported by both sides.

The operator renders pods that set these environment variables and read these exit codes; the
trainer reads the variables and exits with the codes. Keeping them in one module means a rename
on one side cannot silently break the other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import IntEnum, StrEnum
from pathlib import Path


class TrainerExit(IntEnum):
    """Exit codes of `python -m kubetune.trainer`, one per failure reason (docs/trainer.md).

    2 is left to argparse (usage errors); 143 (128 + SIGTERM) is the conventional code of a process
    stopped by SIGTERM, used after the preemption checkpoint is safely written.
    """

    OK = 0
    OTHER = 1
    BAD_DATA = 3
    MODEL_NOT_FOUND = 4
    ACCESS_DENIED = 5
    OUT_OF_MEMORY = 6
    NCCL_TIMEOUT = 7
    PREEMPTED = 143


# A retry cannot fix these: the Job's podFailurePolicy fails the whole Job at once on them.
NON_RETRYABLE_EXITS = (TrainerExit.BAD_DATA, TrainerExit.MODEL_NOT_FOUND, TrainerExit.ACCESS_DENIED)


# The ServiceAccount training pods run as, one per namespace (builders/training.py,
# build_trainer_identity); the chart's ValidatingAdmissionPolicy names it too.
TRAINER_ACCOUNT = "kubetune-trainer"


class TrainerEnv(StrEnum):
    """Environment variables the operator sets in training pods."""

    CONFIG = "KUBETUNE_TRAINER_CONFIG"
    TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"


# Credentials: each location's Secret reaches the trainer under its own prefix, so a dataset's and
# an output's S3 keys never mix ("KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID" from spec.output.secretRef).
MODEL, DATASET, OUTPUT = "MODEL", "DATASET", "OUTPUT"
SECRET_KEYS = {
    "hf": ("HF_TOKEN",),
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"),
}


def credential_env(role: str, key: str) -> str:
    return f"KUBETUNE_{role}_{key}"


def credentials(role: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The Secret keys given for one location ({"AWS_ACCESS_KEY_ID": ...}), read from `environ`."""
    keys = {key for scheme in SECRET_KEYS.values() for key in scheme}
    found = {key: environ.get(credential_env(role, key), "") for key in sorted(keys)}
    return {key: value for key, value in found.items() if value}


# --- issue 10 (pre-flight check): begin
class PreflightEnv(StrEnum):
    """What the operator tells the pre-flight pod (`python -m kubetune.trainer preflight`), which
    answers with one PreflightResult JSON object in its termination message."""

    GPU_MEMORY_BYTES = "KUBETUNE_GPU_MEMORY_BYTES"  # one GPU's memory; absent: not known
    GPU_MEMORY_SOURCE = "KUBETUNE_GPU_MEMORY_SOURCE"  # where that figure came from


# --- issue 10 (pre-flight check): end


def write_termination_file(target: Path, body: str) -> bool:
    """Writes `body` where the kubelet reads a container's termination message; False (and
    nothing raised) when the place is not writable, as outside a pod.

    In a pod the kubelet bind-mounts the file itself, writable, into a folder of the read-only
    root: the file's own access decides there, the folder's only when there is no file yet (a
    check of the folder alone lost every message on a real kubelet)."""
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        return False
    try:
        target.write_text(body + "\n", encoding="utf-8")
    except OSError:
        return False
    return True
