"""Runs the kopf operator with kubetune's handlers (`kubetune run`)."""

from __future__ import annotations

import asyncio
import logging

import kopf


def run_operator(namespaces: list[str], all_namespaces: bool) -> int:
    import kubetune.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=all_namespaces,
            namespaces=namespaces,
        )
    )
    return 0


if __name__ == "__main__":  # `python -m kubetune.operator_main`: how the local cluster runs it
    raise SystemExit(run_operator(namespaces=[], all_namespaces=True))
