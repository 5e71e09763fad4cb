"""Failure classification and the termination message the operator reads."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from kubetune.trainer.__main__ import fail
from kubetune.trainer.errors import (
    TERMINATION_LOG_ENV,
    BadDataError,
    ExitCode,
    Reason,
    classify,
    exit_code,
    write_termination_message,
)
from kubetune.trainer.events import emit, finite_only


def hub_response(status: int) -> httpx2.Response:
    """A real HTTP response object, as the hub client attaches to its errors."""
    return httpx2.Response(status, request=httpx2.Request("GET", "https://hub.invalid/api/x"))


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError: classification goes by the type's name."""


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (BadDataError("x"), Reason.BAD_DATA),
        (MemoryError(), Reason.OUT_OF_MEMORY),
        (OutOfMemoryError("boom"), Reason.OUT_OF_MEMORY),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), Reason.OUT_OF_MEMORY),
        (PermissionError(13, "Permission denied", "/data"), Reason.ACCESS_DENIED),
        (GatedRepoError("gated", response=hub_response(403)), Reason.ACCESS_DENIED),
        (RepositoryNotFoundError("nope", response=hub_response(404)), Reason.MODEL_NOT_FOUND),
        (HfHubHTTPError("403 Forbidden", response=hub_response(403)), Reason.ACCESS_DENIED),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), Reason.OUT_OF_MEMORY),
        (
            RuntimeError("[Rank 1] Watchdog caught collective operation timeout: NCCL ALLREDUCE"),
            Reason.NCCL_TIMEOUT,
        ),
        (ValueError("something else"), Reason.OTHER),
    ],
)
def test_exceptions_are_classified(exc: BaseException, reason: Reason) -> None:
    assert classify(exc)[0] is reason


def test_every_reason_has_its_own_exit_code() -> None:
    codes = [exit_code(reason) for reason in Reason]
    assert len(set(codes)) == len(codes)
    assert 0 not in codes
    assert exit_code(Reason.PREEMPTED) == ExitCode.PREEMPTED == 143


def test_termination_message_is_reason_then_message(tmp_path: Path) -> None:
    target = tmp_path / "termination-log"
    assert write_termination_message(Reason.BAD_DATA, "line 3 of x.jsonl: bad", target)
    assert target.read_text() == "BadData: line 3 of x.jsonl: bad\n"


def test_termination_message_is_capped_below_the_kubelet_limit(tmp_path: Path) -> None:
    target = tmp_path / "termination-log"
    write_termination_message(Reason.OTHER, "x" * 10_000, target)
    assert len(target.read_bytes()) <= 4096


def test_missing_folder_is_skipped_silently(tmp_path: Path) -> None:
    assert not write_termination_message(Reason.OTHER, "m", tmp_path / "no" / "log")


def test_fail_prints_the_event_and_writes_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(target))
    code = fail(BadDataError("line 2 of /d.jsonl: field 'label' is missing"))
    assert code == ExitCode.BAD_DATA
    assert target.read_text().startswith("BadData: line 2 of /d.jsonl")
    out = capsys.readouterr().out
    assert '"event": "failed"' in out
    assert '"reason": "BadData"' in out


def test_events_never_write_invalid_json(capsys: pytest.CaptureFixture[str]) -> None:
    """A diverged loss (NaN, inf) becomes null: the line stays parseable JSON."""
    emit("progress", loss=float("nan"), evalMetrics={"loss": float("inf"), "accuracy": 0.5})
    line = json.loads(capsys.readouterr().out)
    assert line == {
        "event": "progress",
        "loss": None,
        "evalMetrics": {"loss": None, "accuracy": 0.5},
    }
    assert finite_only({"loss": float("nan"), "accuracy": 0.5}) == {"accuracy": 0.5}
