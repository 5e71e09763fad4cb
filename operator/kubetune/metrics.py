"""The operator's own Prometheus metrics: reconciles and their durations per kind, and resources
by phase. Served on their own port (`kubetune run --metrics-port`), apart from kopf's health."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "kubetune_reconciles_total", "Reconciles by resource kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time one reconcile takes, by resource kind.",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RESOURCES = Gauge("kubetune_resources", "Resources by kind and phase.", ["kind", "phase"])

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


@contextmanager
def reconciling(kind: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        RECONCILES.labels(kind, "error").inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)


def record_phase(kind: str, key: str, phase: str | None) -> None:
    """Remember one resource's phase (None: it is gone) and refresh the per-phase gauge."""
    with _lock:
        if phase is None:
            _phases.pop((kind, key), None)
        else:
            _phases[(kind, key)] = phase
        counts: dict[str, int] = {}
        for (k, _), p in _phases.items():
            if k == kind:
                counts[p] = counts.get(p, 0) + 1
        for (label_kind, label_phase), _ in list(_label_sets().items()):
            if label_kind == kind and label_phase not in counts:
                RESOURCES.labels(kind, label_phase).set(0)
        for p, n in counts.items():
            RESOURCES.labels(kind, p).set(n)


def _label_sets() -> dict[tuple[str, str], None]:
    return {
        (sample.labels["kind"], sample.labels["phase"]): None
        for metric in RESOURCES.collect()
        for sample in metric.samples
    }


def serve(port: int) -> None:
    start_http_server(port)
