"""The operator's metrics: reconciles counted by result, resources gauged by phase."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from kubetune import metrics


def _value(metric: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def test_reconciles_are_counted_by_result_and_timed() -> None:
    ok_before = _value("kubetune_reconciles_total", kind="Probe", result="ok")
    err_before = _value("kubetune_reconciles_total", kind="Probe", result="error")
    with metrics.reconciling("Probe"):
        pass
    with pytest.raises(RuntimeError), metrics.reconciling("Probe"):
        raise RuntimeError("boom")
    assert _value("kubetune_reconciles_total", kind="Probe", result="ok") == ok_before + 1
    assert _value("kubetune_reconciles_total", kind="Probe", result="error") == err_before + 1
    assert _value("kubetune_reconcile_duration_seconds_count", kind="Probe") >= 2


def test_resources_by_phase_follow_transitions_and_deletions() -> None:
    metrics.record_phase("Gauge", "ns/a", "Running")
    metrics.record_phase("Gauge", "ns/b", "Running")
    assert _value("kubetune_resources", kind="Gauge", phase="Running") == 2
    metrics.record_phase("Gauge", "ns/a", "Succeeded")
    assert _value("kubetune_resources", kind="Gauge", phase="Running") == 1
    assert _value("kubetune_resources", kind="Gauge", phase="Succeeded") == 1
    metrics.record_phase("Gauge", "ns/b", None)
    assert _value("kubetune_resources", kind="Gauge", phase="Running") == 0


def test_each_finetunejob_has_its_series_from_its_status_until_deleted() -> None:
    status = {
        "phase": "Running",
        "progress": {"step": 84, "totalSteps": 200, "percent": 42, "loss": 0.412},
        "gpus": 2,
        "gpuHours": 1.5,
    }
    metrics.record_job("team-a", "support", status)
    job = {"namespace": "team-a", "name": "support"}
    assert _value("kubetune_finetunejob_steps", **job) == 84
    assert _value("kubetune_finetunejob_total_steps", **job) == 200
    assert _value("kubetune_finetunejob_progress_ratio", **job) == 0.42
    assert _value("kubetune_finetunejob_loss", **job) == 0.412
    assert _value("kubetune_finetunejob_gpus", **job) == 2
    assert _value("kubetune_finetunejob_gpu_hours", **job) == 1.5
    assert _value("kubetune_finetunejob_phase", phase="Running", **job) == 1
    # A field the status lacks has no series (not a 0 that would read as a real loss).
    assert REGISTRY.get_sample_value("kubetune_finetunejob_samples_per_second", job) is None

    metrics.record_job("team-a", "support", {**status, "phase": "Succeeded"})
    assert (
        REGISTRY.get_sample_value("kubetune_finetunejob_phase", {**job, "phase": "Running"}) is None
    )
    assert _value("kubetune_finetunejob_phase", phase="Succeeded", **job) == 1

    metrics.record_job("team-a", "support", None)
    assert REGISTRY.get_sample_value("kubetune_finetunejob_steps", job) is None
