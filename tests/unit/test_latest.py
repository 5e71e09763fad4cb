"""handlers/latest.py: the newest copy of each watched object, which reconciles read instead of
the API server. The rules that keep it from answering older than a read would."""

from __future__ import annotations

from typing import Any

from kubetune.handlers.latest import Latest


def _body(version: str, phase: str, name: str = "job") -> dict[str, Any]:
    return {
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": version,
            "managedFields": [{"manager": "kubetune", "fieldsV1": {"f:status": {}}}],
        },
        "status": {"phase": phase},
    }


def test_only_what_a_watch_showed_is_held_and_a_miss_means_read_it() -> None:
    latest = Latest()
    latest.answered("FineTuneJob", _body("5", "Pending"))  # no event of it yet: not held
    assert latest.recall("FineTuneJob", "ns", "job") is None
    latest.seen("FineTuneJob", None, _body("5", "Pending"))  # the listing
    assert latest.recall("FineTuneJob", "ns", "job")["status"]["phase"] == "Pending"
    assert latest.recall("Job", "ns", "job") is None  # another kind, another entry


def test_an_event_older_than_the_answer_to_a_write_does_not_undo_it() -> None:
    latest = Latest()
    latest.seen("FineTuneJob", "ADDED", _body("5", ""))
    latest.answered("FineTuneJob", _body("9", "Running"))  # the operator's own write
    latest.seen("FineTuneJob", "MODIFIED", _body("7", "Pending"))  # was on its way meanwhile
    assert latest.recall("FineTuneJob", "ns", "job")["status"]["phase"] == "Running"
    latest.seen("FineTuneJob", "MODIFIED", _body("12", "Succeeded"))
    assert latest.recall("FineTuneJob", "ns", "job")["status"]["phase"] == "Succeeded"


def test_a_deleted_object_is_forgotten_and_a_recreated_one_held_anew() -> None:
    latest = Latest()
    latest.seen("FineTuneJob", "ADDED", _body("5", "Running"))
    latest.seen("FineTuneJob", "DELETED", _body("6", "Running"))
    assert latest.recall("FineTuneJob", "ns", "job") is None and len(latest) == 0
    latest.seen("FineTuneJob", "ADDED", _body("8", ""))
    assert latest.recall("FineTuneJob", "ns", "job")["status"]["phase"] == ""


def test_each_reader_gets_its_own_copy_without_managed_fields() -> None:
    latest = Latest()
    latest.seen("FineTuneJob", "ADDED", _body("5", "Pending"))
    first = latest.recall("FineTuneJob", "ns", "job")
    assert first is not None and "managedFields" not in first["metadata"]
    first["status"]["phase"] = "changed by a reader"
    assert latest.recall("FineTuneJob", "ns", "job")["status"]["phase"] == "Pending"


def test_a_version_that_is_not_an_integer_always_replaces() -> None:
    latest = Latest()
    latest.seen("FineTuneJob", "ADDED", _body("9", "Pending"))
    latest.seen("FineTuneJob", "MODIFIED", _body("opaque", "Running"))
    assert latest.recall("FineTuneJob", "ns", "job")["status"]["phase"] == "Running"
