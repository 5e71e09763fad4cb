"""The one place that talks to the API server.

Server-side apply under one field manager (forcing conflicts on the objects kubetune owns), reads,
deletes, lists and status patches. `ApiException` never leaves this module: callers get the small
error hierarchy below, so handlers can tell "not there yet" from "will never work".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import (
    ApiException as DynamicApiException,
)
from kubernetes.dynamic.exceptions import (
    ResourceNotFoundError,
)

FIELD_MANAGER = "kubetune"
POOL_SIZE = 32  # at least: one connection per handler thread (lifecycle.py passes their number)


def _plain(_client: Any, data: Any) -> Any:
    """The dynamic client's serializer for plain dicts: its default wraps every field of every
    response in ResourceInstance/ResourceField objects, which `to_dict()` then unwraps again (a
    fifth of the operator's CPU at scale, and garbage the allocator keeps)."""
    return data


PLAIN = {"serializer": _plain}


class KubeError(Exception):
    """An API call failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KubeError):
    """The object (or its kind) does not exist."""


class Invalid(KubeError):
    """The server refused the object (422, 400): retrying the same object cannot help."""


class Forbidden(KubeError):
    """RBAC or admission (e.g. Pod Security) refused the request."""


class Conflict(KubeError):
    """A concurrent change (409): retry with fresh data."""


def _message(err: ApiException | DynamicApiException) -> str:
    import json

    body = getattr(err, "body", None)
    try:
        return str(json.loads(body)["message"]) if body else str(err.reason)
    except (ValueError, KeyError, TypeError):
        return str(err.reason)


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except ResourceNotFoundError as err:
        raise NotFound(str(err), 404) from err
    except (ApiException, DynamicApiException) as err:
        status = getattr(err, "status", None)
        message = _message(err)
        kind: type[KubeError] = KubeError
        if status == 404:
            kind = NotFound
        elif status in (400, 422):
            kind = Invalid
        elif status == 403:
            kind = Forbidden
        elif status == 409:
            kind = Conflict
        raise kind(message, status) from err


class Kube:
    """A thread-safe facade over the dynamic client. Objects go in and come out as plain dicts."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self._dynamic: DynamicClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, threads: int = 0) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig. `threads`: how
        many threads call at once (kopf's handler threads)."""
        settings = client.Configuration()
        # One connection per handler thread, not urllib3's default of a few: a thread that finds
        # the pool empty opens a connection (a TLS handshake) and closes it again after.
        settings.connection_pool_maxsize = max(POOL_SIZE, threads)
        if kubeconfig is None:
            try:
                config.load_incluster_config(client_configuration=settings)
                return cls(client.ApiClient(settings))
            except config.ConfigException:
                pass
        config.load_kube_config(config_file=kubeconfig, client_configuration=settings)
        return cls(client.ApiClient(settings))

    @property
    def dynamic(self) -> DynamicClient:
        with self._lock:
            if self._dynamic is None:
                self._dynamic = DynamicClient(self.api_client)
            return self._dynamic

    def _resource(self, api_version: str, kind: str) -> Any:
        with _translated():
            return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def apply(
        self, manifest: dict[str, Any], dry_run: bool = False, field_manager: str = FIELD_MANAGER
    ) -> dict[str, Any]:
        """Server-side apply `manifest` as kubetune, taking over fields from other managers.

        With `dry_run` the server runs validation and admission but persists nothing: the
        handlers dry-run every child before creating any, so bad input never half-builds a set.
        """
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        with _translated():
            result = resource.server_side_apply(
                body=manifest,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=field_manager,
                force_conflicts=True,
                **({"dry_run": "All"} if dry_run else {}),
                **PLAIN,
            )
        applied: dict[str, Any] = result
        return applied

    def create(
        self, manifest: dict[str, Any], field_manager: str = FIELD_MANAGER
    ) -> dict[str, Any]:
        """Create `manifest` (a POST); an object of its name that already exists is `Conflict`."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        with _translated():
            result = resource.create(
                body=manifest,
                namespace=manifest["metadata"].get("namespace"),
                field_manager=field_manager,
                **PLAIN,
            )
        created: dict[str, Any] = result
        return created

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None
    ) -> dict[str, Any] | None:
        resource = self._resource(api_version, kind)
        try:
            with _translated():
                obj: dict[str, Any] = resource.get(name=name, namespace=namespace, **PLAIN)
                return obj
        except NotFound:
            return None

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        label_selector: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """The objects (`limit`: at most that many, one page, for "is there any")."""
        resource = self._resource(api_version, kind)
        page = {} if limit is None else {"limit": limit}
        with _translated():
            items = resource.get(
                namespace=namespace, label_selector=label_selector, **page, **PLAIN
            )
        result: list[dict[str, Any]] = items.get("items", [])
        return result

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None) -> bool:
        """Delete with background propagation; False when it was already gone."""
        resource = self._resource(api_version, kind)
        try:
            with _translated():
                resource.delete(
                    name=name, namespace=namespace, propagation_policy="Background", **PLAIN
                )
        except NotFound:
            return False
        return True

    def patch_status(
        self, api_version: str, kind: str, name: str, namespace: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """JSON merge patch of the status subresource (lists, like conditions, are replaced)."""
        resource = self._resource(api_version, kind)
        with _translated():
            result = resource.status.patch(
                body={"status": status},
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
                **PLAIN,
            )
        patched: dict[str, Any] = result
        return patched

    def patch_pod_conditions(
        self, name: str, namespace: str, conditions: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        """Strategic-merge patch of a pod's status conditions: they merge by type, so the
        kubelet's own conditions stay (a JSON merge patch would replace the whole list). Used
        for the readiness gate kubetune owns (serving/gate.py)."""
        resource = self._resource("v1", "Pod")
        with _translated():
            result = resource.status.patch(
                body={"status": {"conditions": [dict(c) for c in conditions]}},
                name=name,
                namespace=namespace,
                content_type="application/strategic-merge-patch+json",
                **PLAIN,
            )
        patched: dict[str, Any] = result
        return patched

    def exists_kind(self, api_version: str, kind: str) -> bool:
        """Whether the server serves this kind (e.g. KEDA's ScaledObject)."""
        try:
            self._resource(api_version, kind)
        except NotFound:
            return False
        return True
