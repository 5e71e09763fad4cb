"""The shipped monitoring configuration: every pods metric an HPA the operator generates may name
has a prometheus-adapter rule, and the rules become the adapter's --config the way the
prometheus-community chart makes it. (The rules run for real in tests/e2e/test_autoscaling.py.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from kubetune.builders.serving import PODS_METRICS
from kubetune.devcluster.monitoring import adapter_config

MONITORING = Path(__file__).resolve().parents[2] / "examples" / "monitoring"


def test_every_pods_metric_the_hpa_names_has_a_shipped_rule() -> None:
    values = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
    rules = adapter_config(values)["rules"]
    served = [rule["name"]["as"] for rule in rules]
    assert sorted(served) == sorted(set(PODS_METRICS.values()))
    for rule in rules:
        # Mapped to pods (what a Pods metric of an HPA reads), over the series' own labels.
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "<<.GroupBy>>" in rule["metricsQuery"]
    assert values["rules"]["default"] is False  # only these, not every series of the cluster


def test_the_scrape_configs_label_series_with_the_pod_the_adapter_maps() -> None:
    scrape = yaml.safe_load((MONITORING / "prometheus-scrape-configs.yaml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    targets = {
        rule.get("target_label"): rule.get("source_labels")
        for rule in jobs["kubernetes-pods"]["relabel_configs"]
    }
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    keep = jobs["kubernetes-pods"]["relabel_configs"][0]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
