"""The operator's metrics as Prometheus sees them: the real Prometheus (built from its Go module)
scrapes the integration tier's operator process, and the per-job series follow a FineTuneJob's
status (what the trainer reports) and go when the job is deleted.

The scrape is a static target here (the operator runs on this machine); in a cluster the chart's
metrics Service, or its ServiceMonitor, points Prometheus at the same endpoint.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.monitoring import Prometheus, start_prometheus
from tests.cluster_fixtures import OperatorProcess, Resources
from tests.integration.test_finetunejob import finetunejob
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def prometheus(cluster: LocalCluster, operator: OperatorProcess) -> Prometheus:
    """A Prometheus of this module's own (a cluster component: the cluster's `down` stops it)."""
    return start_prometheus(
        cluster,
        [
            {
                "job_name": "kubetune-operator",
                "static_configs": [{"targets": [f"127.0.0.1:{operator.metrics_port}"]}],
            }
        ],
        scrape_interval="1s",
    )


def _series(prometheus: Prometheus, promql: str) -> dict[str, float]:
    """label set (as 'k=v,...' of the labels that matter here) -> value."""
    out = {}
    for sample in prometheus.query(promql):
        labels = sample["metric"]
        key = ",".join(f"{k}={labels[k]}" for k in ("name", "phase") if k in labels)
        out[key] = float(sample["value"][1])
    return out


def test_prometheus_scrapes_the_operator_and_sees_each_jobs_progress(
    prometheus: Prometheus, resources: Resources, namespace: str, volumes: Any
) -> None:
    wait_for(
        lambda: any(t["health"] == "up" for t in prometheus.targets()),
        timeout=60,
        what="Prometheus to scrape the operator",
    )
    resources.create("finetunejobs", finetunejob("tracked", resources={"gpusPerNode": 1}))
    resources.wait_phase("finetunejobs", "tracked", "Running")
    # What the trainer writes as it goes.
    resources.patch_status(
        "finetunejobs",
        "tracked",
        {"progress": {"step": 30, "totalSteps": 120, "percent": 25, "loss": 0.75}},
    )
    selector = f'{{namespace="{namespace}",name="tracked"}}'
    wait_for(
        lambda: (
            _series(prometheus, f"kubetune_finetunejob_steps{selector}") == {"name=tracked": 30}
        ),
        timeout=60,
        what="the job's steps in Prometheus",
    )
    assert _series(prometheus, f"kubetune_finetunejob_total_steps{selector}") == {
        "name=tracked": 120
    }
    assert _series(prometheus, f"kubetune_finetunejob_progress_ratio{selector}") == {
        "name=tracked": 0.25
    }
    assert _series(prometheus, f"kubetune_finetunejob_loss{selector}") == {"name=tracked": 0.75}
    assert _series(prometheus, f"kubetune_finetunejob_gpus{selector}") == {"name=tracked": 1}
    assert _series(prometheus, f"kubetune_finetunejob_phase{selector}") == {
        "name=tracked,phase=Running": 1
    }
    # GPU-hours are the operator's own reckoning from the start time: present, and not negative.
    hours = wait_for(
        lambda: _series(prometheus, f"kubetune_finetunejob_gpu_hours{selector}"),
        timeout=60,
        what="the job's GPU-hours in Prometheus",
    )
    assert hours["name=tracked"] >= 0
    # The API server keeps both usage fields (a name outside the CRD's schema is pruned
    # silently: energy was written as energyKWh and never stored).
    usage = resources.get("finetunejobs", "tracked")["status"]
    assert usage["gpuHours"] >= 0 and usage["energyKwh"] >= 0, usage
    # The operator's own series are scraped from the same endpoint.
    assert _series(prometheus, 'kubetune_reconciles_total{kind="FineTuneJob",result="ok"}')

    resources.delete("finetunejobs", "tracked")
    wait_for(
        lambda: not prometheus.query(f"kubetune_finetunejob_steps{selector}"),
        timeout=60,
        what="the deleted job's series to go",
    )
