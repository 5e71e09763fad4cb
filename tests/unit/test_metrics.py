"""The operator's metrics: reconciles counted by result, resources gauged by phase."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from kubetune import metrics


def _value(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
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
