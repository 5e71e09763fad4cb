"""The operator's own Prometheus metrics: reconciles and their durations per kind, resources by
phase, and one series per FineTuneJob (progress, loss, GPU-hours...) from its status. Served on
their own port (`kubetune run --metrics-port`), apart from kopf's health; the chart puts a metrics
Service (and, when asked, a ServiceMonitor) in front of it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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

_phases: dict[tuple[str, str], str] = {}  # (kind, "namespace/name") -> phase
_counts: dict[tuple[str, str], int] = {}  # (kind, phase) -> resources in it
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
    """Remember one resource's phase (None: it is gone) and move the per-phase gauge: the phase
    it left goes down (to 0, not away, once it is empty), the one it entered up. Called on every
    look at every resource, so it touches only those two counts (counting all resources again
    each time was an eighth of the operator's CPU in a burst of 1,000 jobs, session 12)."""
    with _lock:
        before = _phases.pop((kind, key), None) if phase is None else _phases.get((kind, key))
        if phase is not None:
            _phases[(kind, key)] = phase
        if before == phase:
            return
        if before is not None:
            _counts[(kind, before)] -= 1
            RESOURCES.labels(kind, before).set(_counts[(kind, before)])
        if phase is not None:
            _counts[(kind, phase)] = _counts.get((kind, phase), 0) + 1
            RESOURCES.labels(kind, phase).set(_counts[(kind, phase)])


# Per FineTuneJob: (metric name, help, the status field it reads: "progress.x" inside the
# trainer's progress). Gauges, since they are read back from the status (a restarted operator shows
# the same values, it counts nothing itself); gpu_hours only grows, so rate() of it is the GPUs the
# job holds.
JOB_SERIES: tuple[tuple[str, str, str], ...] = (
    ("kubetune_finetunejob_steps", "Optimizer steps done.", "progress.step"),
    (
        "kubetune_finetunejob_total_steps",
        "Optimizer steps of the whole run.",
        "progress.totalSteps",
    ),
    (
        "kubetune_finetunejob_progress_ratio",
        "Steps done / steps of the run (0-1).",
        "progress.percent",
    ),
    ("kubetune_finetunejob_loss", "Smoothed training loss last reported.", "progress.loss"),
    (
        "kubetune_finetunejob_samples_per_second",
        "Training throughput.",
        "progress.samplesPerSecond",
    ),
    ("kubetune_finetunejob_gpus", "GPUs the job holds while running.", "gpus"),
    ("kubetune_finetunejob_gpu_hours", "GPU-hours the job has consumed so far.", "gpuHours"),
)
JOB_PHASE = "kubetune_finetunejob_phase"


def _job_values(status: Mapping[str, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for name, _, path in JOB_SERIES:
        holder, _, key = path.rpartition(".")
        raw = (status.get(holder) or {}) if holder else status
        value = raw.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            values[name] = float(value) / (100 if key == "percent" else 1)
    return values


class JobCollector(Collector):
    """The latest status of every FineTuneJob the operator has seen, as gauges labelled
    namespace and name (and phase, for the phase series). A deleted job's series go with it."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], tuple[str | None, dict[str, float]]] = {}
        self._lock = threading.Lock()

    def record(self, namespace: str, name: str, status: Mapping[str, Any] | None) -> None:
        """Remember the job's status (None: the job is gone)."""
        with self._lock:
            if status is None:
                self._jobs.pop((namespace, name), None)
            else:
                self._jobs[(namespace, name)] = (status.get("phase"), _job_values(status))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            jobs = dict(self._jobs)
        families = {
            name: GaugeMetricFamily(name, help_, labels=["namespace", "name"])
            for name, help_, _ in JOB_SERIES
        }
        phase = GaugeMetricFamily(
            JOB_PHASE, "1 for the job's current phase.", labels=["namespace", "name", "phase"]
        )
        for (namespace, name), (current, values) in sorted(jobs.items()):
            for metric, value in values.items():
                families[metric].add_metric([namespace, name], value)
            if current:
                phase.add_metric([namespace, name, current], 1.0)
        yield from families.values()
        yield phase


JOBS = JobCollector()
REGISTRY.register(JOBS)


def record_job(namespace: str, name: str, status: Mapping[str, Any] | None) -> None:
    JOBS.record(namespace, name, status)


def serve(port: int) -> None:
    start_http_server(port)
