"""Failure classification: every way the trainer can fail ends as one reason a person can act on.

The operator cannot read a Python traceback, but Kubernetes keeps a container's termination
message (the file at `terminationMessagePath`) in the pod status. The trainer writes
`Reason: message` there and exits with a code per reason, so the operator can copy the reason into
`status.failureReason` and decide whether a retry can help (it cannot for BadData, ModelNotFound or
AccessDenied; it might for OutOfMemory with a smaller batch, and for Other).

This module imports nothing heavy, so it is usable (and testable) before torch is loaded.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

from kubetune.api.contract import TrainerExit, write_termination_file

TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# Kubernetes truncates the termination message to 4096 bytes; leave room for the reason line.
MAX_TERMINATION_MESSAGE = 4000


class Reason(StrEnum):
    BAD_DATA = "BadData"
    OUT_OF_MEMORY = "OutOfMemory"
    ACCESS_DENIED = "AccessDenied"
    MODEL_NOT_FOUND = "ModelNotFound"
    NCCL_TIMEOUT = "NcclTimeout"
    OTHER = "Other"
    PREEMPTED = "Preempted"


# One list of exit codes for both sides: the operator's podFailurePolicy reads the same enum.
ExitCode = TrainerExit


EXIT_CODES: dict[Reason, ExitCode] = {
    Reason.OTHER: ExitCode.OTHER,
    Reason.BAD_DATA: ExitCode.BAD_DATA,
    Reason.MODEL_NOT_FOUND: ExitCode.MODEL_NOT_FOUND,
    Reason.ACCESS_DENIED: ExitCode.ACCESS_DENIED,
    Reason.OUT_OF_MEMORY: ExitCode.OUT_OF_MEMORY,
    Reason.NCCL_TIMEOUT: ExitCode.NCCL_TIMEOUT,
    Reason.PREEMPTED: ExitCode.PREEMPTED,
}


class TrainerError(Exception):
    """A failure the trainer understood: it carries a reason and a message naming the cause."""

    reason: Reason = Reason.OTHER

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadDataError(TrainerError):
    reason = Reason.BAD_DATA


class ModelNotFoundError(TrainerError):
    reason = Reason.MODEL_NOT_FOUND


class AccessDeniedError(TrainerError):
    reason = Reason.ACCESS_DENIED


class OutOfMemoryError(TrainerError):
    reason = Reason.OUT_OF_MEMORY


class ConfigError(TrainerError):
    """The config is missing or invalid: a bug in whoever wrote it, not in the data."""

    reason = Reason.OTHER


class Preempted(TrainerError):  # a stop, not an error, but it unwinds the same way
    """SIGTERM arrived; the checkpoint is written and the process should stop now."""

    reason = Reason.PREEMPTED


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed")
_DENIED_MARKERS = ("401", "403", "unauthorized", "forbidden", "access denied", "accessdenied")
_NOT_FOUND_TYPES = ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError")


def classify(exc: BaseException) -> tuple[Reason, str]:
    """Maps any exception to a reason and a one-line message.

    Third-party exceptions are matched by type name and text rather than imported, so the
    classification works whichever optional packages (huggingface_hub, botocore) are installed.
    """
    if isinstance(exc, TrainerError):
        return exc.reason, exc.message
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in names:
        return Reason.OUT_OF_MEMORY, text
    if any(marker in lowered for marker in _OOM_MARKERS):
        return Reason.OUT_OF_MEMORY, text
    if "nccl" in lowered and ("timeout" in lowered or "timed out" in lowered):
        return Reason.NCCL_TIMEOUT, text
    if isinstance(exc, PermissionError) or "GatedRepoError" in names:
        return Reason.ACCESS_DENIED, text
    if names & set(_NOT_FOUND_TYPES):
        return Reason.MODEL_NOT_FOUND, text
    if ("HfHubHTTPError" in names or "ClientError" in names) and any(
        marker in lowered for marker in _DENIED_MARKERS
    ):
        return Reason.ACCESS_DENIED, text
    return Reason.OTHER, text


def exit_code(reason: Reason) -> int:
    return int(EXIT_CODES[reason])


def termination_log_path() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG))


def write_termination_message(reason: Reason, message: str, path: Path | None = None) -> bool:
    """Writes `Reason: message` where the kubelet reads it; silently skips an unwritable place.

    Outside a pod /dev/termination-log usually does not exist and its directory is not writable
    by an ordinary user: a local run must not fail because of that.
    """
    return write_termination_text(f"{reason}: {message}"[:MAX_TERMINATION_MESSAGE], path)


def write_termination_text(body: str, path: Path | None = None) -> bool:
    """Writes `body` as the termination message (see write_termination_message)."""
    return write_termination_file(path or termination_log_path(), body)
