"""Progress to stdout (always) and to the FineTuneJob's status (when configured).

The status write goes through the official `kubernetes` client with the pod's service-account
token, as a JSON merge patch on the `finetunejobs/status` subresource that touches only
`status.progress`, `status.lastCheckpoint` and `status.output`: the operator owns phase and
conditions, and a merge patch leaves every field it does not name alone.

Writes happen on a background thread, latest-wins and at most one per
`reporting.minIntervalSeconds`, so a slow or unreachable API server never stalls a training step.
When no API server can be reached the trainer logs a warning event and keeps training.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from kubetune.api.v1alpha1.base import GROUP, VERSION
from kubetune.api.v1alpha1.finetunejob import PLURAL, Checkpoint, OutputStatus, Progress
from kubetune.api.v1alpha1.trainerconfig import JobRef, TrainerConfig
from kubetune.trainer import events

FIELD_MANAGER = "kubetune-trainer"
REQUEST_TIMEOUT_S = 10.0
HEARTBEAT_SECONDS = 60.0  # well inside runPolicy.heartbeatTimeoutSeconds (at least 30, default 900)
WARN_EVERY = 20  # after the first failed write, warn again only every this many failures


class StatusWriter:
    """Patches the FineTuneJob's status from a background thread, rate-limited."""

    def __init__(self, job: JobRef, min_interval: float) -> None:
        self.job = job
        self.min_interval = min_interval
        self._api = _connect()
        self._pending: dict[str, Any] = {}
        self._closing = False
        self._last_sent = 0.0
        self._failures = 0
        self._enabled = self._api is not None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kubetune-status", daemon=True)
        if self._enabled:
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def due(self) -> bool:
        """Whether a write would go out now; lets the loop read the loss only when it is needed."""
        return self._enabled and time.monotonic() - self._last_sent >= self.min_interval

    def submit(self, status: dict[str, Any]) -> None:
        """Queues status fields; a later value of the same field replaces an unsent one (objects
        merge, so a heartbeat does not drop an unsent progress report)."""
        if not self._enabled:
            return
        with self._cond:
            for key, value in status.items():
                before = self._pending.get(key)
                merge = isinstance(before, dict) and isinstance(value, dict)
                self._pending[key] = {**before, **value} if merge else value  # type: ignore[dict-item]
            self._cond.notify()

    def close(self, timeout: float = REQUEST_TIMEOUT_S * 2) -> None:
        """Sends what is pending now, ignoring the interval (the final status must land)."""
        if not self._enabled:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                delay = self._last_sent + self.min_interval - time.monotonic()
                if delay > 0 and not self._closing:
                    self._cond.wait(delay)
                    continue
                body, self._pending = self._pending, {}
            self._send(body)
            self._last_sent = time.monotonic()

    def _send(self, status: dict[str, Any]) -> None:
        api: Any = self._api
        where = (GROUP, VERSION, self.job.namespace, PLURAL, self.job.name)
        try:
            if self.job.uid and not self._same_object(api, where):
                self._stop(f"was deleted and created again (its UID is no longer {self.job.uid})")
                return
            api.patch_namespaced_custom_object_status(
                *where,
                {"status": status},
                field_manager=FIELD_MANAGER,
                _content_type="application/merge-patch+json",
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except Exception as exc:
            self._failed(exc)
        else:
            if self._failures:
                events.emit("warning", message="status writes to the API server work again")
            self._failures = 0

    def _same_object(self, api: Any, where: tuple[str, ...]) -> bool:
        """Whether the FineTuneJob is still the one this run was started for.

        The API server ignores metadata (a UID precondition included) in a patch of the status
        subresource, so the UID is compared on a read first; a recreated namesake in the short
        window between read and patch is the accepted risk. Reading the status subresource
        needs no more RBAC than writing it.
        """
        current = api.get_namespaced_custom_object_status(
            *where, _request_timeout=REQUEST_TIMEOUT_S
        )
        return bool(current.get("metadata", {}).get("uid") == self.job.uid)

    def _stop(self, why: str) -> None:
        self._enabled = False
        events.emit(
            "warning",
            message=f"FineTuneJob {self.job.namespace}/{self.job.name} {why}; status reporting "
            "stops, training goes on",
        )

    def _failed(self, exc: Exception) -> None:
        if getattr(exc, "status", None) == 404:
            self._stop("is gone (HTTP 404)")
            return
        if self._failures % WARN_EVERY == 0:
            events.emit(
                "warning",
                message=f"cannot write the FineTuneJob status ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); training goes on",
            )
        self._failures += 1


def _connect() -> Any | None:
    """A client with the pod's service account, or $KUBECONFIG's credentials (local runs).

    The configuration is private to this client: loading it never changes the kubernetes
    package's global default, which other code in the process may rely on.
    """
    try:
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            kubeconfig = os.environ.get("KUBECONFIG")
            if not kubeconfig:
                raise
            config.load_kube_config(kubeconfig, client_configuration=configuration)
        return client.CustomObjectsApi(client.ApiClient(configuration))
    except Exception as exc:
        events.emit(
            "warning",
            message=f"no API server to report to ({type(exc).__name__}: {exc}); progress goes "
            "to stdout only",
        )
        return None


class Reporter:
    """The one place progress leaves the process: stdout lines and (rank 0) status patches."""

    def __init__(self, config: TrainerConfig, is_main: bool) -> None:
        self.is_main = is_main
        self.status: StatusWriter | None = None
        if is_main and config.reporting.to_api_server and config.job is not None:
            self.status = StatusWriter(config.job, config.reporting.min_interval_seconds)

    def status_due(self) -> bool:
        """Whether a status write would go out now (so the loop only then reads the loss)."""
        return self.status is not None and self.status.due()

    def progress(self, progress: Progress, to_stdout: bool = True) -> None:
        if not self.is_main:
            return
        wire = progress.to_wire()
        if to_stdout:
            events.emit("progress", **wire)
        if self.status:
            self.status.submit({"progress": wire})

    def checkpoint(self, step: int, path: str) -> None:
        if not self.is_main:
            return
        record = Checkpoint(step=step, path=path, time=datetime.now(UTC).replace(microsecond=0))
        events.emit("checkpoint", step=step, path=path)
        if self.status:
            self.status.submit({"lastCheckpoint": record.to_wire()})

    @contextmanager
    def beating(self, what: str) -> Iterator[None]:
        """While the trainer downloads, evaluates or exports (no steps, so no progress reports),
        a heartbeat every HEARTBEAT_SECONDS tells the operator it is alive. Training itself beats
        with its progress reports, so a hung step is not hidden by a background thread."""
        if not (self.is_main and self.status):
            yield
            return
        done = threading.Event()

        def beat() -> None:
            while True:
                stamp = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
                assert self.status is not None
                self.status.submit({"progress": {"lastHeartbeat": stamp}})
                if done.wait(HEARTBEAT_SECONDS):
                    return

        events.emit("phase", what=what)
        thread = threading.Thread(target=beat, name="kubetune-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(REQUEST_TIMEOUT_S)

    def output(self, output: OutputStatus, progress: Progress) -> None:
        if self.is_main and self.status:
            self.status.submit({"output": output.to_wire(), "progress": progress.to_wire()})

    def close(self) -> None:
        if self.status:
            self.status.close()
