"""handlers/lifecycle.py's ChangingKindsOnly: kopf's diff base (a deep copy of every event's
body) is built only for the kinds with change handlers; the rest get kopf's empty diff."""

from __future__ import annotations

import json
from typing import Any

import kopf
from kopf._cogs.structs import diffs

from kubetune.handlers.lifecycle import CHANGING_KINDS, PREFIX, ChangingKindsOnly

KEY = f"{PREFIX}/last-handled-configuration"


def _body(kind: str) -> Any:
    return kopf.Body(
        {
            "apiVersion": "v1",
            "kind": kind,
            "metadata": {
                "name": "x",
                "namespace": "ns",
                "annotations": {KEY: json.dumps({"spec": {"replicas": 1}})},
            },
            "spec": {"replicas": 2},
            "status": {"phase": "Running"},
        }
    )


def test_only_the_kinds_with_change_handlers_get_an_essence() -> None:
    storage = ChangingKindsOnly(CHANGING_KINDS, prefix=PREFIX, key="last-handled-configuration")
    served = _body("ModelServer")
    new, old = storage.build(body=served), storage.fetch(body=served)
    assert new["spec"] == {"replicas": 2} and old == {"spec": {"replicas": 1}}
    assert diffs.diff(old, new)  # the change a ModelServer's update handler is called for
    for kind in ("FineTuneJob", "Pod", "Job"):
        body = _body(kind)
        new, old = storage.build(body=body), storage.fetch(body=body)
        assert new is None and old is None and diffs.diff(old, new) == diffs.EMPTY
