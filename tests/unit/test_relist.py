"""Context.relisted: which listing events are a second look (after a broken watch) at an object
this process already knew, so the handlers reconcile it (a child deleted meanwhile sent no
event). The end-to-end case is the API server restart in tests/integration/test_faults.py."""

from __future__ import annotations

from typing import Any

from kubetune.handlers.common import Context


def _event(kind: str | None, uid: str) -> dict[str, Any]:
    return {"type": kind, "object": {"metadata": {"uid": uid}}}


def test_only_a_second_listing_of_a_known_object_is_a_relist() -> None:
    ctx = Context(kube=None)  # type: ignore[arg-type]
    assert not ctx.relisted("FineTuneJob", _event(None, "a"))  # start-up: the resume handler
    assert not ctx.relisted("FineTuneJob", _event("ADDED", "b"))  # created while watching
    assert not ctx.relisted("FineTuneJob", _event("MODIFIED", "a"))
    assert ctx.relisted("FineTuneJob", _event(None, "a"))  # listed again: 410 Gone
    assert ctx.relisted("FineTuneJob", _event(None, "b"))
    assert not ctx.relisted("ModelServer", _event(None, "a"))  # per kind
    assert not ctx.relisted("FineTuneJob", _event("DELETED", "a"))
    assert not ctx.relisted("FineTuneJob", _event(None, "a"))  # a new object of the same uid
    assert not ctx.relisted("FineTuneJob", {"type": None, "object": {}})
