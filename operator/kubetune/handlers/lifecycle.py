"""Operator start-up: kopf's settings, and the clients every handler shares (through memo)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import kopf

from kubetune.builders.common import Settings
from kubetune.handlers.common import Context
from kubetune.handlers.memory import handler_threads
from kubetune.kube import Kube

PREFIX = "kubetune.io"
# The kinds with kopf change handlers (on.create/update/resume), which diff a body against the
# last handled one: only the ModelServer. Everything else is driven by watch events.
CHANGING_KINDS = frozenset({"ModelServer"})
# Handler threads: a reconcile mostly waits on the API server, and in a 1,000-job burst 16 of
# them were the limit (all pods 32.9 s; 30.3 s with 32, 27.7 s with 64, 30.4 s with 128: the
# chart's `workers`, docs/benchmarks-control-plane.md, session 7).
DEFAULT_WORKERS = 64


class ChangingKindsOnly(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, built only for the kinds that have change handlers.

    For every watch event of every resource kopf builds the body's "essence" (a deep copy of the
    whole body, managedFields and status included, then another to clear its progress keys) and
    diffs it against the last handled one, whether or not a change handler will look at the
    diff. With only event handlers on a kind (FineTuneJobs, every child, pods) the diff is never
    read, and those copies were 10.5 % of the operator's samples in a 1,000-job burst, all of
    it on the event loop that every watch event waits for (py-spy, docs/benchmarks-control-plane.md,
    session 7). For the other kinds there is no essence: the diff is empty, which is what kopf
    sees for an object without change handlers anyway."""

    def __init__(self, kinds: frozenset[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kinds = kinds

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if body.get("kind") not in self.kinds:
            return None  # type: ignore[return-value]
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        if body.get("kind") not in self.kinds:
            return None
        return super().fetch(body=body)


def server_side_selectors(registry: kopf.OperatorRegistry) -> dict[tuple[str, str], str]:
    """Label selectors for the API server, per watched kind: what every handler of that kind
    requires of an object's labels.

    kopf applies a handler's `labels=` filter after the event arrived: without a selector on the
    watch itself every ConfigMap, Service, Job, Deployment, ... of the cluster reaches the
    operator, is parsed, and gets kopf's per-object memory for as long as it exists, kubetune's
    or not. A kind with one handler that wants every object (pods: the GPU-use index) keeps an
    unfiltered watch. A label dropped from a child ends its match, and the API server sends
    that watch a DELETED event for it: the child is restored as if it had gone."""
    required: dict[tuple[str, str], dict[str, object] | None] = {}
    for handlers in (
        registry._watching,
        registry._indexing,
        registry._changing,
        registry._spawning,
    ):
        for handler in handlers.get_all_handlers():
            selector = handler.selector
            if selector is None or not isinstance(selector.any_name, str):
                continue
            kind = (selector.group or "", selector.any_name)
            wanted: dict[str, object] = {
                key: value
                for key, value in (handler.labels or {}).items()
                if isinstance(value, str) or value is kopf.PRESENT
            }
            if kind not in required:
                required[kind] = wanted
            elif (known := required[kind]) is not None:
                common: dict[str, object] = {k: v for k, v in known.items() if wanted.get(k) == v}
                required[kind] = common or None
            if not wanted:
                required[kind] = None
    return {
        kind: ",".join(
            key if value is kopf.PRESENT else f"{key}={value}" for key, value in labels.items()
        )
        for kind, labels in sorted(required.items())
        if labels
    }


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own bookkeeping lives in annotations: the CRDs' strict status schema would prune it.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = ChangingKindsOnly(
        CHANGING_KINDS, prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    # kopf's own log lines ("Handler 'reconcile' succeeded") become Events only from WARNING up:
    # at INFO every reconcile and timer tick would be a write. kubetune's Events (one per
    # condition transition) are posted explicitly.
    settings.posting.level = logging.WARNING
    # Each watch ends after this long and kopf opens the next; the API server sends a BOOKMARK
    # 2 s before the end (and once a minute), which is what the liveness probe listens for.
    server_timeout = int(os.environ.get("KUBETUNE_WATCH_TIMEOUT_SECONDS", "300"))
    settings.watching.server_timeout = server_timeout
    settings.watching.client_timeout = server_timeout + 30
    for kind, selector in server_side_selectors(kopf.get_default_registry()).items():
        settings.watching.label_selectors[kind] = selector
    workers = int(os.environ.get("KUBETUNE_WORKERS", str(DEFAULT_WORKERS)))
    settings.execution.executor = handler_threads(workers)
    settings.execution.max_workers = workers
    settings.networking.error_backoffs = [1, 2, 5, 10]
    defaults = Settings()
    memo.kubetune = Context(
        kube=Kube.from_environment(os.environ.get("KUBECONFIG"), threads=workers),
        executor=settings.execution.executor,
        settings=Settings(
            trainer_image=os.environ.get("KUBETUNE_TRAINER_IMAGE", defaults.trainer_image),
            fetcher_image=os.environ.get("KUBETUNE_FETCHER_IMAGE", defaults.fetcher_image),
            preflight=os.environ.get("KUBETUNE_PREFLIGHT", "") in ("1", "true"),
            vllm_image=os.environ.get("KUBETUNE_VLLM_IMAGE", defaults.vllm_image),
            smoke_test_gate=os.environ.get("KUBETUNE_SMOKE_TEST_GATE", "true") != "false",
            operator_namespace=_own_namespace(),
        ),
    )


def _own_namespace() -> str | None:
    """The namespace of the operator's pod (the ServiceAccount mount's file); None outside."""
    try:
        return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or None
    except OSError:
        return None


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The official client's configuration: in-cluster in a pod, else $KUBECONFIG."""
    info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
    return info
