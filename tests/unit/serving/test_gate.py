"""The readiness gate's pure part: which pods to test, what their condition must say, and the
patch that says it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetune.api.v1alpha1.modelserver import SMOKE_TEST_CONDITION
from kubetune.serving.gate import gate_verdict, needs_smoke_test, pod_url
from kubetune.serving.smoketest import SmokeResult

PASS = SmokeResult(True, "m", generated_text="hi there", latency_s=0.01)
FAIL = SmokeResult(False, "m", error="the model generated nothing for 'hello'")


def pod(
    *, gate: bool = True, ready: str = "True", condition: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    conditions = [{"type": "ContainersReady", "status": ready}]
    if condition is not None:
        conditions.append({"type": SMOKE_TEST_CONDITION, **condition})
    body: dict[str, Any] = {
        "metadata": {"name": "p"},
        "spec": {"readinessGates": [{"conditionType": SMOKE_TEST_CONDITION}] if gate else []},
        "status": {"phase": "Running", "podIP": "10.0.0.7", "conditions": conditions},
    }
    body["metadata"].update(extra)
    return body


def test_a_loaded_gated_pod_without_a_verdict_is_tested() -> None:
    assert needs_smoke_test(pod())
    assert needs_smoke_test(pod(condition={"status": "False", "message": "old failure"}))


def test_pods_that_must_not_be_tested() -> None:
    assert not needs_smoke_test(pod(gate=False))  # a Deployment from before the gate
    assert not needs_smoke_test(pod(ready="False"))  # the model is still loading
    assert not needs_smoke_test(pod(condition={"status": "True"}))  # passed: stays open
    assert not needs_smoke_test(pod(deletionTimestamp="2026-01-01T00:00:00Z"))


def test_verdicts() -> None:
    opened = gate_verdict(pod(), PASS)
    assert opened is not None and opened.status == "True" and opened.reason == "SmokeTestPassed"
    closed = gate_verdict(pod(), FAIL)
    assert closed is not None and closed.status == "False"
    assert "generated nothing" in closed.message
    assert gate_verdict(pod(gate=False), PASS) is None
    # The same failure again is not written again (no status churn on every reconcile).
    same = pod(condition={"status": "False", "message": closed.message})
    assert gate_verdict(same, FAIL) is None


def test_the_patch_sets_only_the_gate_condition() -> None:
    verdict = gate_verdict(pod(), PASS)
    assert verdict is not None
    patch = verdict.patch(datetime(2026, 12, 1, 9, 30, tzinfo=UTC))
    [condition] = patch["status"]["conditions"]
    assert condition["type"] == SMOKE_TEST_CONDITION
    assert condition["status"] == "True"
    assert condition["lastTransitionTime"] == "2026-12-01T09:30:00Z"


def test_the_pod_is_reached_on_its_own_ip() -> None:
    assert pod_url(pod(), 8000) == "10.0.0.7:8000"
    ipv6 = pod()
    ipv6["status"]["podIP"] = "fd00::7"
    assert pod_url(ipv6, 8000) == "[fd00::7]:8000"
    no_ip = pod()
    del no_ip["status"]["podIP"]
    assert pod_url(no_ip, 8000) is None
