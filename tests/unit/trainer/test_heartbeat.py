"""The trainer beats while it downloads and exports (no steps, so no progress reports)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kubetune.trainer import reporting


class Recorder:
    """Takes the place of the StatusWriter (which needs an API server) to see what is sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.beats = threading.Semaphore(0)

    def submit(self, status: dict[str, Any]) -> None:
        self.sent.append(status)
        self.beats.release()


def test_beats_while_busy_and_stops_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reporting, "HEARTBEAT_SECONDS", 0.05)
    reporter = reporting.Reporter.__new__(reporting.Reporter)
    reporter.is_main = True
    recorder = Recorder()
    reporter.status = recorder  # type: ignore[assignment]
    with reporter.beating("fetching the model"):
        for _ in range(3):  # three beats arrive while the block runs
            assert recorder.beats.acquire(timeout=10)
    count = len(recorder.sent)  # the beating thread was joined on leaving the block
    assert all(set(s["progress"]) == {"lastHeartbeat"} for s in recorder.sent)
    time.sleep(0.3)  # six heartbeat intervals: none may come any more
    assert len(recorder.sent) == count


def test_a_heartbeat_does_not_drop_an_unsent_progress_report() -> None:
    writer = reporting.StatusWriter.__new__(reporting.StatusWriter)
    writer._enabled = True
    writer._pending = {}
    writer._cond = threading.Condition()
    writer.submit({"progress": {"step": 7, "totalSteps": 10, "lastHeartbeat": "a"}})
    writer.submit({"progress": {"lastHeartbeat": "b"}})
    assert writer._pending == {"progress": {"step": 7, "totalSteps": 10, "lastHeartbeat": "b"}}
