from __future__ import annotations

from datetime import UTC, datetime

from kubetune.api.v1alpha1.base import ConditionStatus
from kubetune.conditions import get_condition, is_true, set_condition

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)


def test_transition_time_moves_only_when_status_flips() -> None:
    conds = set_condition([], "Ready", False, "Starting", at=T0)
    conds = set_condition(conds, "Ready", False, "StillStarting", "more detail", at=T1)
    ready = get_condition(conds, "Ready")
    assert ready is not None
    assert (ready.reason, ready.message, ready.last_transition_time) == (
        "StillStarting",
        "more detail",
        T0,
    )
    conds = set_condition(conds, "Ready", True, "Up", at=T1)
    ready = get_condition(conds, "Ready")
    assert (
        ready is not None
        and ready.last_transition_time == T1
        and ready.status == ConditionStatus.TRUE
    )


def test_other_conditions_are_kept_in_order() -> None:
    conds = set_condition([], "Ready", True, "Up", at=T0)
    conds = set_condition(conds, "Degraded", False, "Fine", at=T0)
    conds = set_condition(conds, "Ready", False, "Down", observed_generation=3, at=T1)
    assert [c.type for c in conds] == ["Ready", "Degraded"]
    assert conds[0].observed_generation == 3
    assert is_true(conds, "Ready") is False
    assert conds[0].to_wire()["lastTransitionTime"] == "2026-01-02T00:00:00Z"
