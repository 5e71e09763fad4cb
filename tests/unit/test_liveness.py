"""The watch-liveness probe's bookkeeping, and that its hooks sit where kopf makes the streams.

The end-to-end check (a frozen API server fails the probe, a thawed one passes it) is in
tests/integration/test_faults.py; this one fails fast when a kopf upgrade moves the hooks."""

from __future__ import annotations

from pathlib import Path

import kopf
import pytest
from kopf._cogs.clients import api, watching
from kopf._core.reactor import queueing

from kubetune.handlers import liveness


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stream_is_stale_when_the_server_has_not_spoken_for_longer_than_the_threshold() -> None:
    clock = Clock()
    activity = liveness.WatchActivity(clock)
    activity.opened("/api/v1/pods")
    activity.opened("/apis/batch/v1/jobs")
    clock.now += 20
    activity.answered("/api/v1/pods")  # a watch request answered: the server is alive
    activity.answered("/api/v1/secrets")  # not a stream the operator has: ignored
    clock.now += 20
    with pytest.raises(kopf.PermanentError, match=r"/apis/batch/v1/jobs for 40s"):
        activity.check(30)
    activity.seen("/apis/batch/v1/jobs")  # an event
    assert activity.check(30) == {"/api/v1/pods": 20.0, "/apis/batch/v1/jobs": 0.0}


def test_a_closed_stream_is_forgotten_once_its_last_watcher_closes() -> None:
    clock = Clock()
    activity = liveness.WatchActivity(clock)
    activity.opened("/api/v1/pods")
    activity.opened("/api/v1/pods")
    activity.closed("/api/v1/pods")
    clock.now += 100
    with pytest.raises(kopf.PermanentError):
        activity.check(30)
    activity.closed("/api/v1/pods")
    assert activity.check(30) == {}


def test_the_hooks_are_what_kopf_calls() -> None:
    """kopf's watcher calls watching.infinite_watch and its stream calls api.request through
    their modules, so the replaced functions are the ones that run."""
    assert watching.infinite_watch is liveness._observed_watch
    assert api.request is liveness._observed_request
    assert "watching.infinite_watch(" in Path(queueing.__file__).read_text()
    assert "await request(" in Path(api.__file__).read_text()


def test_the_threshold_follows_the_watch_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 300
    monkeypatch.delenv("KUBETUNE_WATCH_STALE_SECONDS", raising=False)
    assert liveness.stale_seconds(settings) == 360
    monkeypatch.setenv("KUBETUNE_WATCH_STALE_SECONDS", "25")
    assert liveness.stale_seconds(settings) == 25
