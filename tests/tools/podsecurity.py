"""Pod Security Standards, as the API server's PodSecurity admission evaluates them: the real
k8s.io/pod-security-admission policy package (the cluster's version) through
hack/gotools/podsecurity."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kubetune.devcluster.gotools import PODSECURITY
from tests.tools import json_lines


def pod_security(
    objects: Iterable[dict[str, Any]], level: str = "restricted"
) -> list[dict[str, Any]]:
    """One verdict per pod or pod template found among the objects (Pods, Jobs, Deployments,
    ...; other kinds are skipped): {"kind", "name", "allowed", "forbidden": [{"reason",
    "detail"}]}."""
    return json_lines(PODSECURITY, objects, f"-level={level}", "-version=latest")


def violations(objects: Iterable[dict[str, Any]], level: str = "restricted") -> list[str]:
    """Every forbidden finding as "Kind/name: reason: detail"; empty when all pods pass."""
    return [
        f"{v['kind']}/{v['name']}: {f['reason']}: {f['detail']}"
        for v in pod_security(objects, level)
        for f in v["forbidden"]
    ]
