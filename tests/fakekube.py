"""An in-memory stand-in for `kubetune.kube.Kube`, for fast unit tests of handler orchestration.

It is a fake on purpose, and only for these tests: it stores what is applied (merging like a
server-side apply of the fields sent), counts every write, and knows nothing of defaults,
admission or controllers. Everything those need is tested against the real API server in
tests/integration.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

from kubetune.kube import FIELD_MANAGER, Conflict

_uids = itertools.count(1)
_versions = itertools.count(1)  # one resourceVersion sequence for every object, as etcd's


def _written(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"]["resourceVersion"] = str(next(_versions))
    return obj


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = copy.deepcopy(value)
    return out


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str | None, str], dict[str, Any]] = {}
        self.writes: Counter[str] = Counter()

    @staticmethod
    def _key(api_version: str, kind: str, name: str, namespace: str | None) -> Any:
        return (api_version, kind, namespace, name)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object directly (what a user or a controller would have made)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{next(_uids)}")
        meta.setdefault("generation", 1)
        key = self._key(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        self.objects[key] = _written(obj)
        return copy.deepcopy(obj)

    def apply(
        self, manifest: dict[str, Any], dry_run: bool = False, field_manager: str = FIELD_MANAGER
    ) -> dict[str, Any]:
        self.writes[f"apply {manifest['kind']}{' (dry run)' if dry_run else ''}"] += 1
        meta = manifest["metadata"]
        key = self._key(
            manifest["apiVersion"], manifest["kind"], meta["name"], meta.get("namespace")
        )
        merged = _merge(self.objects.get(key, {}), manifest)
        if dry_run:
            return merged
        merged["metadata"].setdefault("uid", f"uid-{next(_uids)}")
        self.objects[key] = _written(merged)
        return copy.deepcopy(merged)

    def create(
        self, manifest: dict[str, Any], field_manager: str = FIELD_MANAGER
    ) -> dict[str, Any]:
        meta = manifest["metadata"]
        key = self._key(
            manifest["apiVersion"], manifest["kind"], meta["name"], meta.get("namespace")
        )
        if key in self.objects:
            raise Conflict(f"{manifest['kind']} {meta['name']} already exists", 409)
        self.writes[f"create {manifest['kind']}"] += 1
        obj = copy.deepcopy(manifest)
        obj["metadata"].setdefault("uid", f"uid-{next(_uids)}")
        self.objects[key] = _written(obj)
        return copy.deepcopy(obj)

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None
    ) -> dict[str, Any] | None:
        obj = self.objects.get(self._key(api_version, kind, name, namespace))
        return copy.deepcopy(obj) if obj is not None else None

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        label_selector: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        wanted = dict(part.split("=", 1) for part in (label_selector or "").split(",") if part)
        found = [
            copy.deepcopy(obj)
            for (av, k, ns, _), obj in self.objects.items()
            if av == api_version
            and k == kind
            and namespace in (None, ns)
            and all((obj["metadata"].get("labels") or {}).get(a) == b for a, b in wanted.items())
        ]
        return found[:limit] if limit is not None else found

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None) -> bool:
        self.writes[f"delete {kind}"] += 1
        return self.objects.pop(self._key(api_version, kind, name, namespace), None) is not None

    def patch_status(
        self, api_version: str, kind: str, name: str, namespace: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        self.writes[f"patch {kind}/status"] += 1
        key = self._key(api_version, kind, name, namespace)
        obj = self.objects[key]
        obj["status"] = _merge(obj.get("status") or {}, status)
        return copy.deepcopy(_written(obj))

    def patch_pod_conditions(
        self, name: str, namespace: str, conditions: list[dict[str, Any]]
    ) -> dict[str, Any]:
        self.writes["patch Pod/status"] += 1
        obj = self.objects[self._key("v1", "Pod", name, namespace)]
        status = obj.setdefault("status", {})
        merged = {c["type"]: c for c in status.get("conditions") or []}
        merged.update({c["type"]: c for c in conditions})
        status["conditions"] = list(merged.values())
        return copy.deepcopy(obj)

    def exists_kind(self, api_version: str, kind: str) -> bool:
        return True

    def total_writes(self) -> int:
        return sum(self.writes.values())
