"""Runs the kopf operator with kubetune's handlers (`kubetune run`)."""

from __future__ import annotations

import asyncio
import logging

import kopf


def run_operator(
    namespaces: list[str],
    all_namespaces: bool,
    log_level: str = "info",
    liveness_endpoint: str | None = None,
    metrics_port: int = 0,
) -> int:
    """Run kopf until it is stopped. `liveness_endpoint` (e.g. http://0.0.0.0:8080/healthz) is
    kopf's health endpoint, which the chart's liveness probe calls."""
    import kubetune.handlers  # noqa: F401  (registers the handlers)
    from kubetune import metrics

    if metrics_port:
        metrics.serve(metrics_port)

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=all_namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness_endpoint,
        )
    )
    return 0


if __name__ == "__main__":  # `python -m kubetune.operator_main`: how the local cluster runs it
    raise SystemExit(run_operator(namespaces=[], all_namespaces=True))
