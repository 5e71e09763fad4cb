"""The newest copy of each watched object, so that a reconcile reads its resource from memory.

Every look at a FineTuneJob (its own event, each batch of its children's events) read the job
from the API server first, and every pod event read the job's training Job: about seven GETs per
job in a burst, a fifth of the operator's samples in session 6's profile (they did not bound the
burst's time, `docs/benchmarks-control-plane.md`, session 7). What those reads returned is what
the watches had already delivered, or what the server answered to the operator's own last write.
So this store keeps that, as controller-runtime's informer cache does for a Go operator, with
two rules that keep it from ever answering older than a read would have in the same place:

- an object enters only from its watch (an event, the initial listing) and leaves with its
  DELETED event: a kind no watch feeds is never answered from here, and a miss means "read it",
  never "it does not exist";
- a copy replaces the held one only when its resourceVersion is not older (the API server's
  resourceVersions are comparable integers, KEP-5504, stable in 1.35; one that is not an integer
  always replaces), so an event that was on its way while the operator wrote does not undo the
  answer to that write (java-operator-sdk's PrimaryUpdateAndCacheUtils keeps its own writes'
  answers the same way).

Bodies are kept pickled without `managedFields`, deflated (zlib at its fastest level; at
N = 1,000 jemalloc's `stats.allocated` after the burst was 2.3 MiB lower with it, about 2.3 KiB
per job of live memory), and unpickled again for each reader, who may change what it gets. Only
this process's own copies of what the API server sent are pickled here, and only it reads them.
Pickle, not JSON: a Job's body (4.6 KB) took 53 us to encode and 37 us to parse as JSON, 13 and
21 us pickled (protocol 5), and these run on every event and write of every job.
"""

from __future__ import annotations

import pickle
import threading
import zlib
from typing import Any

Key = tuple[str, str, str]  # (kind, namespace, name)


def _version(body: dict[str, Any]) -> int | None:
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


def _older(version: int | None, than: int | None) -> bool:
    return version is not None and than is not None and version < than


class Latest:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bodies: dict[Key, tuple[int | None, bytes]] = {}

    @staticmethod
    def _key(kind: str, body: dict[str, Any]) -> Key | None:
        meta = body.get("metadata") or {}
        if not meta.get("name"):
            return None
        return (kind, str(meta.get("namespace") or ""), str(meta["name"]))

    def _keep(self, key: Key, body: dict[str, Any], only_held: bool) -> None:
        version = _version(body)
        meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
        packed = zlib.compress(pickle.dumps({**body, "metadata": meta}, protocol=5), 1)
        with self._lock:
            held = self._bodies.get(key)
            if held is None and only_held:
                return
            if held is not None and _older(version, held[0]):
                return
            self._bodies[key] = (version, packed)

    def seen(self, kind: str, event_type: str | None, body: dict[str, Any]) -> None:
        """A watch event of `body` (type None: the listing)."""
        key = self._key(kind, body)
        if key is None:
            return
        if event_type == "DELETED":
            with self._lock:
                self._bodies.pop(key, None)
            return
        self._keep(key, body, only_held=False)

    def answered(self, kind: str, body: dict[str, Any]) -> None:
        """The server's answer to a write of an object its watch has shown."""
        key = self._key(kind, body)
        if key is not None:
            self._keep(key, body, only_held=True)

    def recall(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of the newest body held, or None: not held (read it from the server)."""
        with self._lock:
            held = self._bodies.get((kind, namespace, name))
        if held is None:
            return None
        body: dict[str, Any] = pickle.loads(zlib.decompress(held[1]))
        return body

    def __len__(self) -> int:
        return len(self._bodies)
