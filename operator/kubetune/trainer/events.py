"""Stdout events: one JSON object per line, the trainer's machine-readable log.

Pod logs are what `kubectl logs` and every log shipper collect, so progress goes there even when no
API server is reachable. One object per line (JSON Lines) keeps them parseable next to the free
text that libraries print on stderr.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any


def emit(event: str, **fields: Any) -> None:
    """Writes `{"event": event, ...fields}` as one line and flushes, so a kill loses nothing."""
    line = json.dumps({"event": event, **_json_safe(fields)}, default=str, allow_nan=False)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a diverged loss is reported as null, not a logging crash."""
    return value if value is not None and math.isfinite(value) else None


def finite_only(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a status (a dict of numbers in the CRD) can hold: the finite ones."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
