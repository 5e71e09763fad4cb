"""The watch of a FineTuneJob's ConfigMap, and of each namespace's trainer identity (the
ServiceAccount, Role and RoleBinding every training pod there shares).

What these children send that matters is rare: an edit by someone else, or a deletion (their
creation is the reconcile's own write). kopf, for every object of every kind it watches, keeps a
per-object memory for as long as the object exists and, while its events come, a worker task and
a queue; in a burst of new jobs these kinds were four of the seven objects per job that kopf
kept, and their creation events, all dropped, went through all of that.

Here the stream is kopf's own (`infinite_watch`: its listing, its resumption from the last
resourceVersion, its relisting after 410 Gone, its backoff, the API server's label selector,
and the liveness probe's view of every stream, handlers/liveness.py), and nothing is kept per
object: a creation or a listed object is dropped on the event loop, an edit or a deletion goes
to the FineTuneJob's child handling (finetunejob._child_event) as kopf's event handler sent it,
or for the trainer identity to finetunejob.identity_event.
`kopf._cogs.clients.watching` is private (the liveness probe hooks the same function); the kopf
version is pinned by requirements.lock. tests/unit/test_children_watch.py checks which streams
open; tests/integration/test_finetunejob.py::test_deleted_and_edited_children_are_restored runs
them against a real API server (it fails when their events are dropped).

It runs only where kopf runs the handlers: a standby replica (operator_main) starts neither.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import Any

import kopf
from kopf._cogs.clients import watching
from kopf._cogs.structs import references

from kubetune.builders.common import FTJ_LABEL, MANAGED_BY
from kubetune.builders.training import IDENTITY_SELECTOR

log = logging.getLogger("kubetune")

SELECTOR = f"{MANAGED_BY}=kubetune,{FTJ_LABEL}"
KINDS = {
    references.Resource("", "v1", "configmaps", kind="ConfigMap", namespaced=True): SELECTOR,
    references.Resource(
        "", "v1", "serviceaccounts", kind="ServiceAccount", namespaced=True
    ): IDENTITY_SELECTOR,
    references.Resource(
        "rbac.authorization.k8s.io", "v1", "roles", kind="Role", namespaced=True
    ): IDENTITY_SELECTOR,
    references.Resource(
        "rbac.authorization.k8s.io", "v1", "rolebindings", kind="RoleBinding", namespaced=True
    ): IDENTITY_SELECTOR,
}

# What `kubetune run` was given (operator_main sets it before kopf starts): every namespace, or
# kopf's namespace patterns.
_SCOPE: dict[str, Any] = {"clusterwide": True, "namespaces": []}
_TASKS: set[asyncio.Task[None]] = set()


def set_scope(namespaces: Collection[str], clusterwide: bool) -> None:
    _SCOPE.update(clusterwide=clusterwide or not namespaces, namespaces=list(namespaces))


def streams(
    namespaces: Collection[str], clusterwide: bool
) -> tuple[list[str | None], Callable[[str], bool]]:
    """The namespaces to open a stream in (None: cluster-wide), and which namespaces' events
    count. Plain names get a stream each; kopf's patterns ("team-*", "team-*,!team-x") a
    cluster-wide stream whose events are matched against them, as kopf matches namespaces."""
    if clusterwide:
        return [None], lambda _namespace: True
    specific = references.select_specific_namespaces(namespaces)
    if len(specific) == len(set(namespaces)):
        return [str(name) for name in sorted(specific)], lambda _namespace: True
    patterns = list(namespaces)
    return [None], lambda namespace: any(
        references.match_namespace(references.NamespaceName(namespace), p) for p in patterns
    )


async def follow(
    settings: kopf.OperatorSettings,
    resource: references.Resource,
    namespace: str | None,
    counts: Callable[[str], bool],
    handle: Callable[[dict[str, Any]], None],
) -> None:
    """One stream, forever: every edit and deletion to `handle` (on the event loop; it returns
    at once and leaves any blocking work to the handler threads)."""
    async for item in watching.infinite_watch(
        settings=settings,
        resource=resource,
        namespace=None if namespace is None else references.NamespaceName(namespace),
    ):
        if not isinstance(item, dict) or item.get("type") not in ("MODIFIED", "DELETED"):
            continue  # a listed object (type None), a creation, the listing's end (a Bookmark)
        obj = item.get("object") or {}
        if not counts(str((obj.get("metadata") or {}).get("namespace") or "")):
            continue
        try:
            handle({"type": item["type"], "object": obj})
        except Exception:
            log.exception("could not handle the %s event of %s", item["type"], resource.plural)


def start(settings: kopf.OperatorSettings, handle: Callable[[dict[str, Any]], None]) -> int:
    """Open the streams (on the running loop); returns how many."""
    for resource, selector in KINDS.items():
        settings.watching.label_selectors[resource.group, resource.plural] = selector
    namespaces, counts = streams(_SCOPE["namespaces"], _SCOPE["clusterwide"])
    loop = asyncio.get_running_loop()
    for resource in KINDS:
        for namespace in namespaces:
            task = loop.create_task(follow(settings, resource, namespace, counts, handle))
            _TASKS.add(task)
    return len(_TASKS)


def stop() -> None:
    for task in _TASKS:
        task.cancel()
    _TASKS.clear()
