"""kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status): what Flux and kpt conclude from an
object's status, computed by the real library through hack/gotools/kstatus."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kubetune.devcluster.gotools import KSTATUS
from tests.tools import json_lines


def kstatus_all(objects: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(status, message) per object: InProgress, Current, Failed, Terminating, NotFound,
    Unknown. One process for all of them."""
    results = []
    for line in json_lines(KSTATUS, objects):
        if "error" in line:
            raise AssertionError(f"kstatus refused the object: {line['error']}")
        results.append((line["status"], line.get("message", "")))
    return results


def kstatus(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) that kstatus computes for one object (a FineTuneJob, a ModelServer, or
    any other kind), for instance ("Failed", "OutOfMemory: ...")."""
    (result,) = kstatus_all([obj])
    return result
