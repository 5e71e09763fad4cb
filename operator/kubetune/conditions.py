"""metav1-style conditions: set one, keep the rest, move lastTransitionTime only on a flip.

kopf patches status with a JSON merge patch, which replaces lists whole, so callers always write the
full list that `set_condition` returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from kubetune.api.v1alpha1.base import Condition, ConditionStatus


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def set_condition(
    conditions: Iterable[Condition],
    type_: str,
    status: ConditionStatus | bool,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
    at: datetime | None = None,
) -> list[Condition]:
    """Return `conditions` with `type_` set; its transition time changes only when status flips."""
    if isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    result: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type_:
            result.append(cond)
            continue
        found = True
        flipped = cond.status != status
        result.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                observed_generation=observed_generation,
                last_transition_time=(at or now()) if flipped else cond.last_transition_time,
            )
        )
    if not found:
        result.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                observed_generation=observed_generation,
                last_transition_time=at or now(),
            )
        )
    return result


def get_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Iterable[Condition], type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.status == ConditionStatus.TRUE
