"""No user field can make a generated pod privileged, and every generated pod passes Pod Security
"restricted", for any spec the API accepts (hypothesis over every spec field, those that reach
the pod included: images, resources, placement, affinity passed through, sources, secrets).

"restricted" is judged by the real k8s.io/pod-security-admission policy package at the cluster's
version (hack/gotools/podsecurity), the code the API server's PodSecurity admission runs.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings

from kubetune.api.v1alpha1 import FineTuneJob, ModelServer
from kubetune.builders import serving, training
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import ResolvedModel
from tests.tools.podsecurity import pod_security, violations
from tests.tools.specs import valid_specs

SETTINGS = Settings(trainer_image="example.test/trainer:1", fetcher_image="example.test/fetcher:1")
EXAMPLES = 150


def _body(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": spec,
    }


def children(kind: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    body = _body(kind, spec)
    owner = Owner.from_body(body)
    if kind == "FineTuneJob":
        return training.build_children(FineTuneJob.model_validate(body), owner, SETTINGS)
    ms = ModelServer.model_validate(body)
    uri = ms.spec.model.source or "pvc://models/out/x/triton-repository"
    model = ResolvedModel(uri=uri, revision="r1", task="sequence-classification")
    built, _ = serving.build_children(ms, owner, model, SETTINGS, spare_gpus=1)
    return built


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


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(valid_specs("FineTuneJob"))
def test_no_finetunejob_spec_makes_a_privileged_or_unrestricted_pod(spec: dict[str, Any]) -> None:
    _check("FineTuneJob", spec)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
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
        if c["kind"] == "Job"
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
