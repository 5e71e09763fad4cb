"""The smoke test as a gate before traffic: a pod readiness gate the operator opens per pod.

ModelServer pods carry ``readinessGates: [{conditionType: kubetune.io/smoke-test-passed}]``
(builders/serving.py). The kubelet reports such a pod Ready — so the Service sends it traffic —
only when its containers are ready AND that condition is True, and only the operator sets it:
after THAT pod answered its smoke test. A pod whose model answers wrongly keeps the condition
False, never becomes Ready, and a rollout of it stalls with the old pods still serving (the
Deployment's maxUnavailable is never exceeded); pods the autoscaler adds later pass the same gate.

The flow for each pod of a ModelServer (a reconcile on pod events, see docs/serving.md):

1. ``needs_smoke_test(pod)``: it has the gate, runs, its containers are ready (Triton's own
   readiness: the model loaded) and the condition is not yet True;
2. ``smoke_test_pod(pod, ...)``: the smoke test against that pod's own IP, not the Service;
3. ``gate_verdict(pod, result)``: the condition to write, or None when it is already written;
4. ``verdict.patch(now)``: the body of a strategic-merge PATCH of ``pods/<name>/status``
   (conditions merge by type, so the kubelet's own conditions stay).

Everything but step 2 is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from kubetune.api.v1alpha1.modelserver import SMOKE_TEST_CONDITION, SmokeTestSpec
from kubetune.serving.smoketest import SmokeResult, smoke_test

PASSED = "SmokeTestPassed"
FAILED = "SmokeTestFailed"
MESSAGE_LIMIT = 1024  # a condition message is for people; the full text goes to an Event


@dataclass(frozen=True)
class GateVerdict:
    """The smoke-test condition one pod should carry."""

    status: Literal["True", "False"]
    reason: str
    message: str

    def patch(self, now: datetime) -> dict[str, Any]:
        """Strategic-merge patch of pods/status setting the condition (merge key: type)."""
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "status": {
                "conditions": [
                    {
                        "type": SMOKE_TEST_CONDITION,
                        "status": self.status,
                        "reason": self.reason,
                        "message": self.message,
                        "lastProbeTime": stamp,
                        "lastTransitionTime": stamp,
                    }
                ]
            }
        }


def _conditions(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(c.get("type")): c for c in (pod.get("status") or {}).get("conditions") or [] if c}


def has_gate(pod: dict[str, Any]) -> bool:
    gates = (pod.get("spec") or {}).get("readinessGates") or []
    return any(g.get("conditionType") == SMOKE_TEST_CONDITION for g in gates)


def gate_status(pod: dict[str, Any]) -> str | None:
    """The condition's status on the pod now ("True", "False"), None when never set."""
    condition = _conditions(pod).get(SMOKE_TEST_CONDITION)
    return None if condition is None else str(condition.get("status"))


def gate_message(pod: dict[str, Any]) -> str:
    condition = _conditions(pod).get(SMOKE_TEST_CONDITION) or {}
    return str(condition.get("message") or "")


def needs_smoke_test(pod: dict[str, Any]) -> bool:
    """A gated pod whose model is loaded (containers ready) and whose gate is not open yet.
    A pod being deleted, or one whose gate is open, is never tested (again): once True the
    condition stays, and Triton's readiness probe covers the pod from then on."""
    if not has_gate(pod) or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Running"):
        return False
    ready = _conditions(pod).get("ContainersReady", {}).get("status") == "True"
    return ready and gate_status(pod) != "True"


def gate_verdict(pod: dict[str, Any], result: SmokeResult) -> GateVerdict | None:
    """What the pod's condition must say after ``result`` (that pod's own smoke test); None
    when the pod has no gate or already carries exactly this verdict (no write)."""
    if not has_gate(pod):
        return None
    status: Literal["True", "False"] = "True" if result.ok else "False"
    verdict = GateVerdict(status, PASSED if result.ok else FAILED, result.message[:MESSAGE_LIMIT])
    current = _conditions(pod).get(SMOKE_TEST_CONDITION)
    if current and current.get("status") == status and current.get("message") == verdict.message:
        return None
    return verdict


def pod_url(pod: dict[str, Any], http_port: int) -> str | None:
    """host:port of the pod's own Triton (its IP, bypassing the Service); None before it has
    an IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    return f"[{ip}]:{http_port}" if ":" in ip else f"{ip}:{http_port}"


def smoke_test_pod(
    pod: dict[str, Any],
    model_name: str,
    spec: SmokeTestSpec,
    http_port: int,
    timeout: float = 30.0,
) -> SmokeResult:
    """The smoke test against this one pod (it never raises, like ``smoke_test``)."""
    url = pod_url(pod, http_port)
    if url is None:
        name = (pod.get("metadata") or {}).get("name")
        return SmokeResult(False, model_name, error=f"pod {name} has no IP yet")
    return smoke_test(url, model_name, spec.text, spec.expected_label, timeout=timeout)
