"""The API server filters the children's watches: kopf's `labels=` filters act only after an
event arrived, so without a selector on the watch every ConfigMap, Job, Deployment ... of the
cluster would reach the operator and be kept in kopf's per-object memory."""

from __future__ import annotations

import asyncio

import kopf
from kopf._cogs.structs.references import Resource

import kubetune.handlers  # noqa: F401  (registers the handlers)
from kubetune.handlers import children
from kubetune.handlers.lifecycle import server_side_selectors

MANAGED = "app.kubernetes.io/managed-by=kubetune"


def test_every_child_kind_is_watched_through_a_label_selector() -> None:
    selectors = server_side_selectors(kopf.get_default_registry())
    assert selectors[("batch", "jobs")] == f"{MANAGED},kubetune.io/finetunejob"
    assert selectors[("apps", "deployments")] == f"{MANAGED},kubetune.io/modelserver"
    # Both kinds own Services: what they have in common.
    assert selectors[("", "services")] == MANAGED
    for group, plural in (
        ("autoscaling", "horizontalpodautoscalers"),
        ("policy", "poddisruptionbudgets"),
        ("networking.k8s.io", "networkpolicies"),
    ):
        assert selectors[(group, plural)].startswith(MANAGED)


def test_the_setup_childrens_watch_is_filtered_too_and_not_kopfs() -> None:
    """The ConfigMap (per job) and the trainer identity's ServiceAccount, Role, RoleBinding (per
    namespace): handlers/children.py's streams, on kopf's watch function with the same kind of
    selector; kopf itself no longer watches them."""
    selectors = server_side_selectors(kopf.get_default_registry())
    settings = kopf.OperatorSettings()

    async def started() -> int:
        count = children.start(settings, lambda _event: None)
        children.stop()
        return count

    assert asyncio.run(started()) == len(children.KINDS) == 4
    identity = f"{MANAGED},app.kubernetes.io/component=trainer-identity"
    expected = {
        "configmaps": f"{MANAGED},kubetune.io/finetunejob",
        "serviceaccounts": identity,
        "roles": identity,
        "rolebindings": identity,
    }
    for resource in children.KINDS:
        assert (resource.group, resource.plural) not in selectors
        assert settings.watching.label_selectors.collect(resource) == [expected[resource.plural]]


def test_kinds_some_handler_wants_whole_are_not_filtered() -> None:
    selectors = server_side_selectors(kopf.get_default_registry())
    # The GPU-use index counts every pod; claims, nodes and the custom resources are read whole.
    for kind in (
        ("", "pods"),
        ("", "nodes"),
        ("", "persistentvolumeclaims"),
        ("kubetune.io", "finetunejobs"),
        ("kubetune.io", "modelservers"),
    ):
        assert kind not in selectors


def test_kopf_puts_them_on_the_watch_of_that_kind_only() -> None:
    settings = kopf.OperatorSettings()
    for kind, selector in server_side_selectors(kopf.get_default_registry()).items():
        settings.watching.label_selectors[kind] = selector
    jobs = Resource("batch", "v1", "jobs", kind="Job", namespaced=True)
    pods = Resource("", "v1", "pods", kind="Pod", namespaced=True)
    other_jobs = Resource("example.com", "v1", "jobs", kind="Job", namespaced=True)
    assert settings.watching.label_selectors.collect(jobs) == [f"{MANAGED},kubetune.io/finetunejob"]
    assert settings.watching.label_selectors.collect(pods) == []
    assert settings.watching.label_selectors.collect(other_jobs) == []
