"""No user field can make a generated pod privileged, and every generated pod passes Pod Security
"restricted", for any spec the API accepts (hypothesis over every spec field, those that reach
the pod included: images, resources, placement, affinity passed through, sources, secrets).

"restricted" is judged by the real k8s.io/pod-security-admission policy package at the cluster's
version (hack/gotools/podsecurity), the code the API server's PodSecurity admission runs.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given

from tests.tools.podsecurity import pod_security, violations
from tests.tools.specs import children, examples, valid_specs

EXAMPLES = 150


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects if "template" in o.get("spec", {})]


def privilege(pod: dict[str, Any]) -> list[str]:
    """Every way this pod spec reaches beyond its container."""
    found = [f"spec.{k}" for k in ("hostNetwork", "hostPID", "hostIPC", "hostUsers") if pod.get(k)]
    found += [f"volume {v['name']}: hostPath" for v in pod.get("volumes", []) if "hostPath" in v]
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        context = c.get("securityContext") or {}
        if context.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: privilege escalation allowed")
        if (context.get("capabilities") or {}).get("add"):
            found.append(f"{c['name']}: capabilities added")
        if (context.get("capabilities") or {}).get("drop") != ["ALL"]:
            found.append(f"{c['name']}: capabilities not all dropped")
        found += [f"{c['name']}: hostPort" for p in c.get("ports", []) if "hostPort" in p]
    return found


def _check(kind: str, spec: dict[str, Any]) -> None:
    built = children(kind, spec)
    pods = pod_specs(built)
    assert pods, "every kind runs pods"
    assert [finding for pod in pods for finding in privilege(pod)] == []
    assert violations(built) == []


@examples(EXAMPLES)
@given(valid_specs("FineTuneJob"))
def test_no_finetunejob_spec_makes_a_privileged_or_unrestricted_pod(spec: dict[str, Any]) -> None:
    _check("FineTuneJob", spec)


@examples(EXAMPLES)
@given(valid_specs("ModelServer"))
def test_no_modelserver_spec_makes_a_privileged_or_unrestricted_pod(spec: dict[str, Any]) -> None:
    _check("ModelServer", spec)


def test_the_evaluator_refuses_what_restricted_forbids() -> None:
    """The checker is live: the same pods with one forbidden setting each are refused, with the
    reason the API server's admission would give."""
    (job,) = [
        c
        for c in children(
            "FineTuneJob",
            {
                "model": {"source": "pvc://models/base"},
                "dataset": {"source": "pvc://datasets/d.jsonl"},
                "output": {"uri": "pvc://models/out"},
            },
        )
        if c["metadata"]["name"] == "x-train"
    ]
    pod = job["spec"]["template"]["spec"]
    assert [v["allowed"] for v in pod_security([job])] == [True]
    breaks = {
        "host namespaces": lambda: pod.update(hostNetwork=True),
        "restricted volume types": lambda: pod["volumes"].append(
            {"name": "h", "hostPath": {"path": "/"}}
        ),
        "privileged": lambda: pod["containers"][0]["securityContext"].update(privileged=True),
        "unrestricted capabilities": lambda: pod["containers"][0]["securityContext"].update(
            capabilities={"drop": ["ALL"], "add": ["NET_ADMIN"]}
        ),
    }
    original = copy.deepcopy(job)
    for reason, apply in breaks.items():
        job = copy.deepcopy(original)
        pod = job["spec"]["template"]["spec"]
        apply()
        (verdict,) = pod_security([job])
        assert not verdict["allowed"]
        assert reason in [f["reason"] for f in verdict["forbidden"]], verdict
        assert privilege(pod) != []
