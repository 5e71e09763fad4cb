"""What both resources' handlers share: field-named parse errors, events, status writes."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kubetune import metrics
from kubetune.api.v1alpha1.base import API_VERSION, Condition, ConditionStatus
from kubetune.builders.common import Settings
from kubetune.conditions import set_condition
from kubetune.kube import Forbidden, Invalid, Kube, KubeError, NotFound

log = logging.getLogger("kubetune")


@dataclass
class Context:
    """What handlers get through kopf's memo: set up once at startup."""

    kube: Kube
    settings: Settings = field(default_factory=Settings)
    _locks: defaultdict[tuple[str, str, str], threading.Lock] = field(
        default_factory=lambda: defaultdict(threading.Lock)
    )
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, kind: str, namespace: str, name: str) -> threading.Lock:
        """One lock per resource: its own handler and its children's events never interleave,
        so each reconcile sees the status the previous one wrote (one Event per transition)."""
        with self._guard:
            return self._locks[(kind, namespace, name)]


def context(memo: Any) -> Context:
    ctx: Context = memo.kubetune
    return ctx


def describe_validation_error(err: ValidationError, root: str = "") -> str:
    """'spec.resources.nodes: Input should be greater than or equal to 1' — one line per problem."""
    lines = []
    for problem in err.errors():
        path = ".".join(str(part) for part in problem["loc"])
        lines.append(f"{root + '.' if root and path else root}{path}: {problem['msg']}")
    return "; ".join(lines)


def write_status(
    kube: Kube,
    kind: str,
    plural_kind: str,
    body: dict[str, Any],
    status: dict[str, Any],
) -> None:
    meta = body["metadata"]
    try:
        kube.patch_status(API_VERSION, kind, meta["name"], meta["namespace"], status)
    except KubeError as err:
        raise kopf.TemporaryError(
            f"could not write the {plural_kind} status: {err}", delay=5
        ) from err
    if "phase" in status:
        metrics.record_phase(kind, f"{meta['namespace']}/{meta['name']}", status["phase"])


def reconcile_fresh(
    ctx: Context,
    kind: str,
    body: dict[str, Any],
    reconcile: Callable[[Context, dict[str, Any]], None],
) -> None:
    """Run `reconcile` on the object as the server has it now, under its lock, and count it.
    An object deleted (or recreated) meanwhile is left alone: the garbage collector takes the
    children of the old one."""
    meta = body["metadata"]
    key = f"{meta['namespace']}/{meta['name']}"
    with ctx.lock(kind, meta["namespace"], meta["name"]):
        fresh = ctx.kube.get(API_VERSION, kind, meta["name"], meta["namespace"])
        if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
            metrics.record_phase(kind, key, None)
            return
        with metrics.reconciling(kind):
            reconcile(ctx, fresh)


def apply_children(
    kube: Kube,
    children: list[dict[str, Any]],
    dry_run: bool,
    rejected: Callable[[str], Exception],
) -> None:
    """Server-side apply every child in order. A refusal by the server (validation, admission)
    becomes `rejected(message)`; anything else is passing and retried.

    In the dry run that precedes a spec change nothing is persisted, so a child that refers to an
    earlier one (a RoleBinding to its Role, which RBAC looks up) finds it missing: that NotFound
    says nothing about the spec and is let pass; the real apply creates them in order.
    """
    for child in children:
        what = f"{child['kind']} {child['metadata']['name']}"
        try:
            _apply_settling(kube, child, dry_run)
        except NotFound:
            if not dry_run:
                raise kopf.TemporaryError(f"applying {what}: not found", delay=10) from None
        except (Invalid, Forbidden) as err:
            raise rejected(f"the API server refused {what}: {err}") from err
        except KubeError as err:
            raise kopf.TemporaryError(f"applying {what} failed: {err}", delay=10) from err


def _apply_settling(kube: Kube, child: dict[str, Any], dry_run: bool) -> None:
    """Apply; a NotFound for what was just created (the API server's RBAC cache has not yet seen
    the Role a RoleBinding names) is retried briefly before it counts."""
    for pause in (0.2, 0.5, 1.0):
        try:
            kube.apply(child, dry_run=dry_run)
            return
        except NotFound:
            if dry_run:
                raise
            time.sleep(pause)
    kube.apply(child, dry_run=dry_run)


def conditions_of(body: dict[str, Any]) -> list[Condition]:
    raw = (body.get("status") or {}).get("conditions") or []
    result = []
    for item in raw:
        try:
            result.append(Condition.model_validate(item))
        except ValidationError:
            continue  # a condition someone else wrote badly is dropped, not fatal
    return result


def with_conditions(
    conditions: list[Condition],
    generation: int,
    updates: Sequence[tuple[str, bool | ConditionStatus, str, str]],
) -> list[Condition]:
    for type_, status, reason, message in updates:
        conditions = set_condition(conditions, type_, status, reason, message, generation)
    return conditions


@contextmanager
def later() -> Iterator[None]:
    """In event handlers (which kopf does not retry) a passing failure waits for the next event
    or the timer instead of being logged as a crash."""
    try:
        yield
    except kopf.TemporaryError as err:
        log.info("will retry later: %s", err)


def post_event(body: dict[str, Any], warning: bool, reason: str, message: str) -> None:
    """An Event on the resource; never fails the reconcile (events are best-effort)."""
    try:
        target = cast(kopf.Body, body)
        if warning:
            kopf.warn(target, reason=reason, message=message)
        else:
            kopf.info(target, reason=reason, message=message)
    except Exception:
        log.debug("could not post event %s", reason, exc_info=True)
