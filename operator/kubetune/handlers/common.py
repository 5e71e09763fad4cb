"""What both resources' handlers share: field-named parse errors, events, status writes."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kubetune import metrics
from kubetune.api.v1alpha1.base import API_VERSION, Condition, ConditionStatus
from kubetune.api.v1alpha1.reasons import ConditionType as T
from kubetune.builders.common import Settings
from kubetune.builders.drift import differs
from kubetune.conditions import set_condition
from kubetune.handlers.indexes import Indexes
from kubetune.handlers.latest import Latest
from kubetune.kube import Conflict, Forbidden, Invalid, Kube, KubeError, NotFound

log = logging.getLogger("kubetune")

# A child the API server refused (a quota, an admission webhook, Pod Security, RBAC) may be
# allowed later, with no change to the spec: the refused spec is tried again after each of these
# delays (then every last one), jittered by a fifth, and each try starts with a dry run, so a
# refusal that holds writes nothing.
REFUSAL_RETRY_SECONDS = (5.0, 15.0, 45.0, 120.0, 300.0)


@dataclass
class Context:
    """What handlers get through kopf's memo: set up once at startup."""

    kube: Kube
    settings: Settings = field(default_factory=Settings)
    indexes: Indexes = field(default_factory=Indexes)
    # The newest FineTuneJobs and training Jobs their watches and the operator's own writes
    # showed: what a reconcile reads instead of asking the server (handlers/latest.py).
    latest: Latest = field(default_factory=Latest)
    # kopf's threads for sync handlers, which `blocking` hands work to (None: asyncio's default).
    executor: Executor | None = None
    _locks: defaultdict[tuple[str, str, str], threading.Lock] = field(
        default_factory=lambda: defaultdict(threading.Lock)
    )
    _guard: threading.Lock = field(default_factory=threading.Lock)
    # (kind, namespace, name) -> (generation, tries so far) of specs the server refused.
    _refusals: dict[tuple[str, str, str], tuple[int, int]] = field(default_factory=dict)
    _retrying: set[tuple[str, str, str]] = field(default_factory=set)
    _waiting: set[tuple[str, str, str]] = field(default_factory=set)  # retry_once's
    # The running FineTuneJobs as their watch last showed them, by (namespace, name): the parts
    # of the status the heartbeat look decides on, and the job's heartbeat timeout.
    running: dict[tuple[str, str], tuple[dict[str, Any], float]] = field(default_factory=dict)
    # Children's events not acted on yet, by owner (kind, namespace, name): the owner's stub and
    # the latest event of each child. See `note_child`.
    _noted: dict[tuple[str, str, str], tuple[dict[str, Any], dict[Any, dict[str, Any]]]] = field(
        default_factory=dict
    )
    # Resources a periodic check looks at (e.g. running jobs, whose trainer may go silent),
    # and the checks' threads by name.
    watched: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    _periodic: set[str] = field(default_factory=set)
    _seen: set[tuple[str, str]] = field(default_factory=set)
    # Whether Kueue's Workloads are served: set by the first Workload event (kopf watches them
    # only once Kueue's CRDs exist). Asking for an unserved kind costs a discovery refresh,
    # which the dynamic client does not do safely from several threads.
    kueue: bool = False
    # Namespaces whose trainer identity (builders/training.py, build_trainer_identity) this
    # process has applied or found as built: checked once per namespace, not per job.
    identities: set[str] = field(default_factory=set)

    def relisted(self, kind: str, event: Mapping[str, Any]) -> bool:
        """True for a listing event (type None) of an object this process has seen before.

        kopf lists a resource again when a watch could not be resumed (410 Gone: after an API
        server restart, or a watch dead for minutes), and its resume handlers run only once per
        process. A child deleted or edited while the watch was dead sent no event that arrived
        and is not in the new listing either, so the parent's listing is the one chance to
        notice: it is reconciled then."""
        uid = ((event.get("object") or {}).get("metadata") or {}).get("uid")
        if not uid:
            return False
        key = (kind, str(uid))
        with self._guard:
            if event.get("type") == "DELETED":
                self._seen.discard(key)
                return False
            seen = key in self._seen
            self._seen.add(key)
        return seen and event.get("type") is None

    def schedule(self, delay: float, action: Callable[[], None]) -> None:
        """Run `action` once after `delay` seconds, on a daemon thread."""
        timer = threading.Timer(delay, action)
        timer.daemon = True
        timer.start()

    def retry_refusal(
        self, kind: str, body: dict[str, Any], action: Callable[[], None]
    ) -> float | None:
        """Run `action` again after the next delay of REFUSAL_RETRY_SECONDS for this resource
        (counted per generation); nothing when a retry is already waiting. Returns the delay."""
        meta = body["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        generation = int(meta.get("generation") or 0)
        with self._guard:
            if key in self._retrying:
                return None
            seen, tries = self._refusals.get(key, (generation, 0))
            tries = tries if seen == generation else 0
            self._refusals[key] = (generation, tries + 1)
            self._retrying.add(key)
        delay = REFUSAL_RETRY_SECONDS[min(tries, len(REFUSAL_RETRY_SECONDS) - 1)]
        delay *= random.uniform(0.8, 1.2)
        log.info(
            "%s %s/%s: the API server refused a child; trying again in %.0fs (try %d)",
            kind, meta["namespace"], meta["name"], delay, tries + 2,
        )  # fmt: skip

        def again() -> None:
            with self._guard:
                self._retrying.discard(key)
            with later():
                action()

        self.schedule(delay, again)
        return delay

    def retry_once(
        self, kind: str, namespace: str, name: str, delay: float, action: Callable[[], None]
    ) -> None:
        """Run `action` after `delay` seconds unless a retry of this resource already waits."""
        key = (kind, namespace, name)
        with self._guard:
            if key in self._waiting:
                return
            self._waiting.add(key)

        def again() -> None:
            with self._guard:
                self._waiting.discard(key)
            action()

        self.schedule(delay, again)

    def note_child(
        self,
        kind: str,
        owner: dict[str, Any],
        child: Any,
        event: dict[str, Any],
    ) -> bool:
        """Keep a child's event for its owner until the owner's next look at its children
        (`take_children`). True when no look is waiting yet: the caller must start one. False
        when one is already waiting, which will see this event too.

        As in controller-runtime's work queue, events that arrive while their owner waits are
        folded into one reconcile: a burst of pod and Job changes (created, scheduled, running,
        the Job's counts) costs one read of the owner and at most one status write, not one each,
        and only the latest event of each child is kept while the owner waits, not every body.
        """
        meta = owner["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        with self._guard:
            noted = self._noted.get(key)
            if noted is None:
                self._noted[key] = ({"metadata": dict(meta)}, {child: event})
                return True
            stub, events = noted
            if stub["metadata"].get("uid") != meta.get("uid"):
                stub["metadata"].pop("uid", None)  # children of two owners' lives: read it anew
            events[child] = event
            return False

    def take_children(
        self, kind: str, namespace: str, name: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The owner's stub and its children's noted events, which are forgotten here: events
        that come after this start the next look."""
        with self._guard:
            stub, events = self._noted.pop(
                (kind, namespace, name),
                ({"metadata": {"namespace": namespace, "name": name}}, {}),
            )
        return stub, list(events.values())

    def watch(
        self,
        check: str,
        namespace: str,
        name: str,
        wanted: bool,
        interval: float,
        action: Callable[[str, str], None],
    ) -> None:
        """Keep (`wanted`) or drop `namespace/name` from the periodic `check`, which calls
        `action(namespace, name)` for each one every `interval` seconds, on one daemon thread
        for all of them (started with the first). A kopf timer would do it per object, and kopf
        keeps the whole last body of every object that has one."""
        with self._guard:
            keys = self.watched.setdefault(check, set())
            if wanted:
                keys.add((namespace, name))
            else:
                keys.discard((namespace, name))
            if not wanted or check in self._periodic:
                return
            self._periodic.add(check)

        def loop() -> None:
            while True:
                time.sleep(interval)
                with self._guard:
                    due = sorted(self.watched.get(check, ()))
                for ns, obj in due:
                    with later():
                        try:
                            action(ns, obj)
                        except Exception:
                            log.exception("periodic %s of %s/%s failed", check, ns, obj)

        threading.Thread(target=loop, name=f"kubetune-{check}", daemon=True).start()

    def refusal_over(self, kind: str, namespace: str, name: str) -> None:
        """The resource's children were applied: a later refusal starts the delays anew."""
        with self._guard:
            self._refusals.pop((kind, namespace, name), None)

    def lock(self, kind: str, namespace: str, name: str) -> threading.Lock:
        """One lock per resource: its own handler and its children's events never interleave,
        so each reconcile sees the status the previous one wrote (one Event per transition)."""
        with self._guard:
            return self._locks[(kind, namespace, name)]


def context(memo: Any, kwargs: Mapping[str, Any] | None = None) -> Context:
    """The shared context; kopf hands every handler its indexes, which are kept here."""
    ctx: Context = memo.kubetune
    if kwargs and (indexes := Indexes.from_kwargs(kwargs)) is not None:
        ctx.indexes = indexes
    return ctx


async def blocking(ctx: Context, action: Callable[[], None]) -> None:
    """Run `action` (API calls) on the threads of kopf's sync handlers, in this context (kopf.event
    finds its queue through context variables). The watch-event handlers are async and hand work
    over only when there is some: most events (a job's progress, a child's own creation) are
    answered on the event loop without holding a thread that a reconcile waits for."""
    context_now = contextvars.copy_context()
    await asyncio.get_running_loop().run_in_executor(ctx.executor, context_now.run, action)


def describe_validation_error(err: ValidationError, root: str = "") -> str:
    """'spec.resources.nodes: Input should be greater than or equal to 1' — one line per problem."""
    lines = []
    for problem in err.errors():
        path = ".".join(str(part) for part in problem["loc"])
        lines.append(f"{root + '.' if root and path else root}{path}: {problem['msg']}")
    return "; ".join(lines)


# Recomputed from the clock at every reconcile: written along with a real change, never alone
# (otherwise every look at a running job would be a write).
# Children created with a POST when they are known to be missing, applied afterwards: for a Job
# the API server spends 2.2 ms of CPU on the create against 3.9 ms on the server-side apply of
# the same body (bench/bench_request_cost.py, 1,000 of each; a tenth of what a FineTuneJob's
# requests cost it in a burst). The created fields belong to kubetune as an Update manager, and
# to it as an Apply manager too once it applies again: a field kubetune stops sending stays on
# the Job, which `differs` (only what the desired manifest sets is compared) already means for
# every child. The setup children cost the same either way and stay applied.
CREATED_BY_POST = frozenset({"Job"})
CLOCK_FIELDS = frozenset({"gpuHours", "energyKwh"})
# A False here is the alarming state, True the normal one.
NORMALLY_TRUE = frozenset({T.SCHEDULED, T.TRAINER_HEARTBEAT, T.MODEL_LOADED, T.SMOKE_TEST_PASSED})
ALARMING_WHEN_TRUE = frozenset({T.STALLED, T.FAILED, T.DEGRADED})


def status_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The part of `new` that differs from `old` (what a merge patch must carry), or {} when
    nothing but the clock moved."""
    changed = {key: value for key, value in new.items() if _plain(old.get(key)) != _plain(value)}
    if not set(changed) - CLOCK_FIELDS:
        return {}
    return changed


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def write_status(
    kube: Kube,
    kind: str,
    plural_kind: str,
    body: dict[str, Any],
    status: dict[str, Any],
    latest: Latest | None = None,
) -> bool:
    """Patch the status with what changed, post an Event for every condition that moved, and
    write nothing when nothing did. True when something was written. The server's answer goes
    to `latest`, where the next reconcile reads the object."""
    meta = body["metadata"]
    old = body.get("status") or {}
    changes = status_changes(old, status)
    if "phase" in status:
        metrics.record_phase(kind, f"{meta['namespace']}/{meta['name']}", status["phase"])
    if not changes:
        return False
    try:
        answer = kube.patch_status(API_VERSION, kind, meta["name"], meta["namespace"], changes)
    except KubeError as err:
        raise kopf.TemporaryError(
            f"could not write the {plural_kind} status: {err}", delay=5
        ) from err
    if latest is not None:
        latest.answered(kind, answer)
    if "conditions" in changes:
        post_transitions(body, old.get("conditions") or [], changes["conditions"])
    return True


def post_transitions(
    body: dict[str, Any], before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> None:
    """One Event per condition that changed status (or appeared in its unusual state), named by
    the condition's reason; a Warning when the new state is a problem."""
    previous = {c.get("type"): c.get("status") for c in before}
    for cond in after:
        type_, status = cond["type"], cond["status"]
        usual = "True" if type_ in NORMALLY_TRUE else "False"
        if previous.get(type_, usual) == status:
            continue
        bad = (type_ in ALARMING_WHEN_TRUE and status == "True") or (
            type_ in NORMALLY_TRUE and status == "False"
        )
        message = cond.get("message") or f"{type_} is {status}"
        post_event(body, bad, str(cond["reason"]), f"{type_}={status}: {message}")


def reconcile_fresh(
    ctx: Context,
    kind: str,
    body: dict[str, Any],
    reconcile: Callable[[Context, dict[str, Any]], None],
    read: bool = False,
) -> None:
    """Run `reconcile` on the object as the server has it now, under its lock, and count it.
    An object deleted (or recreated) meanwhile is left alone: the garbage collector takes the
    children of the old one. `body` may be just the metadata (name, namespace, and the uid when
    known): it is read here anyway, from `ctx.latest` when its watch feeds it (newer than any
    event that started this, and than the answer to this object's last write, which was made
    under the same lock), else (or with `read`: a look that no event started, whose watch may
    be what fell silent) from the server."""
    meta = body["metadata"]
    key = f"{meta['namespace']}/{meta['name']}"
    with ctx.lock(kind, meta["namespace"], meta["name"]):
        fresh = None if read else ctx.latest.recall(kind, meta["namespace"], meta["name"])
        if fresh is None:
            fresh = ctx.kube.get(API_VERSION, kind, meta["name"], meta["namespace"])
        if fresh is None or meta.get("uid") not in (None, fresh["metadata"]["uid"]):
            metrics.record_phase(kind, key, None)
            return
        with metrics.reconciling(kind):
            reconcile(ctx, fresh)


def apply_children(
    kube: Kube,
    children: list[dict[str, Any]],
    dry_run: bool,
    rejected: Callable[[str], Exception],
    fresh: bool = False,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Server-side apply, in order, every child whose live object differs from it (see
    `builders.drift`); the ones that already match are not written. A refusal by the server
    (validation, admission) becomes `rejected(message)`; anything else is passing and retried.
    Returns the children as the server now has them (what it answered to each apply, or the live
    object that already matched), by (kind, name); a dry run returns nothing.

    `fresh`: the owner is new, so none of its children can exist yet: they are applied without
    being read first. When the server refuses a child, the ones this call created are deleted
    again, so bad input leaves no half-built set (an owner whose spec changed gets a dry run of
    every child first, so that it keeps its working children).

    In the dry run that precedes a spec change nothing is persisted, so a child that refers to an
    earlier one (a RoleBinding to its Role, which RBAC looks up) finds it missing: that NotFound
    says nothing about the spec and is let pass; the real apply creates them in order.
    """
    result: dict[tuple[str, str], dict[str, Any]] = {}
    created: list[dict[str, Any]] = []
    for child in children:
        meta = child["metadata"]
        what = f"{child['kind']} {meta['name']}"
        try:
            live = None
            if not dry_run and not fresh:
                live = kube.get(child["apiVersion"], child["kind"], meta["name"], meta["namespace"])
                if live is not None and not differs(child, live):
                    result[(child["kind"], meta["name"])] = live
                    continue
            if live is None and not dry_run and child["kind"] in CREATED_BY_POST:
                applied = _create_or_apply(kube, child)
            else:
                applied = _apply_settling(kube, child, dry_run)
            if not dry_run:
                result[(child["kind"], meta["name"])] = applied
            if live is None and not dry_run:
                created.append(child)
        except NotFound:
            if not dry_run:
                raise kopf.TemporaryError(f"applying {what}: not found", delay=10) from None
        except (Invalid, Forbidden) as err:
            _delete_all(kube, created)
            raise rejected(f"the API server refused {what}: {err}") from err
        except KubeError as err:
            raise kopf.TemporaryError(f"applying {what} failed: {err}", delay=10) from err
    return result


def _delete_all(kube: Kube, children: list[dict[str, Any]]) -> None:
    for child in reversed(children):
        meta = child["metadata"]
        try:
            kube.delete(child["apiVersion"], child["kind"], meta["name"], meta["namespace"])
        except KubeError:
            log.warning("could not remove %s %s after a refusal", child["kind"], meta["name"])


def refused(body: dict[str, Any]) -> bool:
    """The current spec was refused (Stalled InvalidSpec or ChildRejected): the children's
    events (the removal of a refused set among them) must not build it again; a spec change,
    an operator restart or, for ChildRejected, the retry (`Context.retry_refusal`) does, each
    starting with a dry run."""
    generation = body["metadata"].get("generation")
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == T.STALLED and cond.get("status") == "True":
            return bool(
                cond.get("reason") in ("InvalidSpec", "ChildRejected")
                and cond.get("observedGeneration") == generation
            )
    return False


def is_new(body: dict[str, Any]) -> bool:
    """Never reconciled: no status yet, so no children either."""
    return (body.get("status") or {}).get("observedGeneration") is None


def _create_or_apply(kube: Kube, child: dict[str, Any]) -> dict[str, Any]:
    """Create a child known to be missing; one that exists after all (an earlier attempt made
    it and then failed) is applied as usual."""
    try:
        return kube.create(child)
    except Conflict:
        return kube.apply(child)


def _apply_settling(kube: Kube, child: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """Apply; a NotFound for what was just created (the API server's RBAC cache has not yet seen
    the Role a RoleBinding names) is retried briefly before it counts."""
    for pause in (0.2, 0.5, 1.0):
        try:
            return kube.apply(child, dry_run=dry_run)
        except NotFound:
            if dry_run:
                raise
            time.sleep(pause)
    return kube.apply(child, dry_run=dry_run)


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
def later(ctx: Context | None = None, again: Callable[[], None] | None = None) -> Iterator[None]:
    """In event handlers (which kopf does not retry) a passing failure is logged, not raised as
    a crash, and `again` runs after the error's delay: with no timer, nothing else would."""
    try:
        yield
    except kopf.TemporaryError as err:
        log.info("will retry later: %s", err)
        if ctx is not None and again is not None:
            ctx.schedule(float(err.delay or 10), again)


def post_event(body: dict[str, Any], warning: bool, reason: str, message: str) -> None:
    """An Event on the resource; never fails the reconcile (events are best-effort). Posted with
    kopf.event, which is not subject to the posting level that keeps kopf's own per-handler
    "succeeded" messages from becoming Events (handlers/lifecycle.py)."""
    try:
        kopf.event(
            cast(kopf.Body, body),
            type="Warning" if warning else "Normal",
            reason=reason,
            message=message,
        )
    except Exception:
        log.debug("could not post event %s", reason, exc_info=True)
