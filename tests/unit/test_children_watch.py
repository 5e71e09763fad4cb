"""Which streams the setup children's watch opens (handlers/children.py): the same namespaces
kopf serves, as kopf reads its namespace patterns."""

from __future__ import annotations

from kubetune.handlers.children import streams


def test_every_namespace_is_one_cluster_wide_stream() -> None:
    namespaces, counts = streams([], clusterwide=True)
    assert namespaces == [None]
    assert counts("anything")


def test_named_namespaces_get_a_stream_each() -> None:
    namespaces, counts = streams(["team-b", "team-a"], clusterwide=False)
    assert namespaces == ["team-a", "team-b"]
    assert counts("team-a")


def test_patterns_are_one_cluster_wide_stream_matched_as_kopf_matches_them() -> None:
    namespaces, counts = streams(["team-*,!team-x", "ml"], clusterwide=False)
    assert namespaces == [None]
    assert counts("team-a") and counts("ml")
    assert not counts("team-x")
    assert not counts("default")
