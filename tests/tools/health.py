"""What each state of a kubetune resource must read as, to kstatus (Flux, kpt) and to Argo CD.

`assert_health(obj, state)` runs both for real on an object, whether hand-written (the unit
tests' contract objects) or read from a cluster where the real operator wrote its status.
"""

from __future__ import annotations

from typing import Any

from tests.tools.argocd import argocd_health
from tests.tools.kstatus import kstatus

# state -> (kstatus status, Argo CD health status); docs/install.md has the same table.
EXPECTED = {
    "ftj-pending": ("InProgress", "Progressing"),
    "ftj-running": ("InProgress", "Progressing"),
    "ftj-queued": ("InProgress", "Progressing"),
    "ftj-unschedulable": ("InProgress", "Progressing"),
    "ftj-succeeded": ("Current", "Healthy"),
    "ftj-failed": ("Failed", "Degraded"),
    "ftj-heartbeat-lost": ("Failed", "Degraded"),
    "ftj-invalid": ("Failed", "Degraded"),
    "ftj-suspended": ("InProgress", "Suspended"),
    "ftj-spec-not-yet-seen": ("InProgress", "Progressing"),
    "ms-waiting-for-job": ("InProgress", "Progressing"),
    "ms-rolling-out": ("InProgress", "Progressing"),
    "ms-rolling-back": ("InProgress", "Progressing"),
    "ms-unschedulable": ("InProgress", "Progressing"),
    "ms-serving": ("Current", "Healthy"),
    "ms-scaled-to-zero": ("Current", "Suspended"),
    "ms-rolled-back": ("Failed", "Degraded"),
    "ms-failed": ("Failed", "Degraded"),
    "ms-spec-not-yet-seen": ("InProgress", "Progressing"),
}


def health(obj: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, str]]:
    """((kstatus status, message), (Argo CD status, message)) of one object."""
    return kstatus(obj), argocd_health(obj)


def assert_health(obj: dict[str, Any], state: str, says: str = "") -> None:
    """`obj` reads as `state` to both tools, and both messages contain `says`."""
    (ks, ks_message), (argo, argo_message) = health(obj)
    assert (ks, argo) == EXPECTED[state], (state, ks_message, argo_message)
    assert says in ks_message, (state, ks_message)
    assert says in argo_message, (state, argo_message)
