"""The liveness probe: kopf's health endpoint fails while a watch stream is dead.

kopf answers its liveness endpoint (`kubetune run --liveness URL`, the chart's livenessProbe)
with the results of the `@kopf.on.probe` handlers, and with 500 when one fails. Out of the box it
has none, so a kopf whose watches hang (an API server that froze, a partition that keeps the TCP
connection open) still answers 200 while it misses every change. Here one probe reports, per
watch stream, the seconds since the API server last spoke on it, and fails when one has been
silent for longer than `KUBETUNE_WATCH_STALE_SECONDS` (default: the watch timeout + 60 s).

What counts as the server speaking: an event on the stream, or an answer to a watch request.
Every watch ends after `timeoutSeconds` (kopf's `settings.watching.server_timeout`,
`KUBETUNE_WATCH_TIMEOUT_SECONDS`, 300 by default) and kopf opens the next, so a live API server
answers each stream at least that often even when nothing changes. BOOKMARKs cannot be relied
on: the API server sends them only for kinds that had an event since it started. kopf hands
neither answers nor bookmarks to handlers, so the streams are observed where kopf makes them:
`kopf._cogs.clients.watching.infinite_watch` (one per stream) and `kopf._cogs.clients.api.request`
(every call, watches among them), which kopf calls through their modules. These are private (kopf
has no public hook for stream activity); the kopf version is pinned by requirements.lock and
tests/unit/test_liveness.py checks that the hooks still see the streams.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import kopf
from kopf._cogs.clients import api, watching

# Beyond the watch timeout: the time to open the next watch, and the probe's period.
STALE_MARGIN_SECONDS = 60.0


class WatchActivity:
    """When the API server last spoke on each live watch stream (monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last: dict[str, float] = {}
        self.streams: dict[str, int] = {}

    def opened(self, key: str) -> None:
        self.streams[key] = self.streams.get(key, 0) + 1
        self.seen(key)

    def seen(self, key: str) -> None:
        self.last[key] = self.clock()

    def answered(self, key: str) -> None:
        if key in self.last:
            self.seen(key)

    def closed(self, key: str) -> None:
        self.streams[key] -= 1
        if not self.streams[key]:
            del self.streams[key], self.last[key]

    def ages(self) -> dict[str, float]:
        now = self.clock()
        return {key: round(now - seen, 1) for key, seen in sorted(self.last.items())}

    def check(self, stale_after: float) -> dict[str, float]:
        """The ages; raises when one is past `stale_after` (kopf then answers 500)."""
        ages = self.ages()
        stale = {key: age for key, age in ages.items() if age > stale_after}
        if stale:
            silent = ", ".join(f"{key} for {age:.0f}s" for key, age in stale.items())
            raise kopf.PermanentError(
                f"watch streams silent for longer than {stale_after:.0f}s: {silent}"
            )
        return ages


ACTIVITY = WatchActivity()


_infinite_watch = watching.infinite_watch
_request = api.request


def stream_key(url: str) -> str:
    """A watch stream's name: its URL's path (the resource, and the namespace if one)."""
    return url.split("?", 1)[0]


async def _observed_watch(**kwargs: Any) -> AsyncIterator[Any]:
    key = stream_key(kwargs["resource"].get_url(namespace=kwargs.get("namespace")))
    ACTIVITY.opened(key)
    try:
        async for item in _infinite_watch(**kwargs):
            ACTIVITY.seen(key)
            yield item
    finally:
        ACTIVITY.closed(key)


async def _observed_request(*args: Any, **kwargs: Any) -> Any:
    response = await _request(*args, **kwargs)
    url = str(kwargs.get("url", ""))
    if "watch=true" in url:
        ACTIVITY.answered(stream_key(url))
    return response


watching.infinite_watch = _observed_watch
api.request = _observed_request


def stale_seconds(settings: kopf.OperatorSettings) -> float:
    value = os.environ.get("KUBETUNE_WATCH_STALE_SECONDS")
    if value:
        return float(value)
    return float(settings.watching.server_timeout or 300) + STALE_MARGIN_SECONDS


@kopf.on.probe(id="watches", errors=kopf.ErrorsMode.PERMANENT)
async def watches(settings: kopf.OperatorSettings, **_: Any) -> dict[str, float]:
    """Seconds since the API server last spoke on each watch stream; fails when one is past the
    threshold. Async, so it runs on the event loop: kopf runs a sync probe on the handler
    threads, where it waited behind reconciles blocked on a frozen API server and /healthz
    timed out instead of answering 500 (tests/integration/test_faults.py, session 7)."""
    return ACTIVITY.check(stale_seconds(settings))
