"""Does a live object already hold what kubetune would apply? Pure: no I/O.

kubetune writes a child only when it differs from the desired manifest, so a cluster with nothing
to do receives no writes. Server-side apply itself cannot tell us this without a request (a no-op
apply is still a write request, and a dry run is one too), so the comparison is done here, on the
object the watch or a read already gave us: every field the desired manifest sets must be present
in the live object with an equal value. Fields only the live object has (defaults, status, other
managers' fields) do not count, and quantities compare by value ("0.5" equals "500m").

Kept by hand because the clients' libraries offer no "is this apply a no-op" check; the comparison
is deliberately strict the other way round: anything unsure counts as a difference (one extra,
harmless apply).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

_EMPTY: tuple[Any, ...] = (None, {}, [], "")


def differs(desired: Any, live: Any) -> bool:
    """True when applying `desired` could change `live`."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return desired not in _EMPTY or live not in _EMPTY
        for key, want in desired.items():
            have = live.get(key)
            if want in _EMPTY and have in _EMPTY:
                continue
            if key not in live or differs(want, have):
                return True
        return False
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return True
        return any(differs(want, have) for want, have in zip(desired, live, strict=True))
    if desired == live:
        return False
    if isinstance(desired, str) and isinstance(live, str):
        return _quantity(desired) is None or _quantity(desired) != _quantity(live)
    return True


def _quantity(text: str) -> Decimal | None:
    """A Kubernetes quantity's value ("4Gi", "500m", "1e3"), or None when it is not one."""
    try:
        value: Decimal = parse_quantity(text)
    except (ValueError, ArithmeticError):
        return None
    return value
