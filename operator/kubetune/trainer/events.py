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
    line = json.dumps({"event": event, **fields}, default=str, allow_nan=False)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a diverged loss is reported as null, not a logging crash."""
    return value if value is not None and math.isfinite(value) else None
