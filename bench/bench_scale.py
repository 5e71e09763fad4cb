"""The operator at scale, on the real local control plane: N FineTuneJobs applied in one burst.

Prints, for N = 100 and 1,000 (or the counts given):

- apply -> Job p50/p99, and the time until every training pod exists, against the floor: the
  same number of plain batch/v1 Jobs applied directly in the same run (the Job controller's own
  speed, which kubetune cannot beat since it creates such Jobs);
- API writes per idle minute, and in the minute after a restart with nothing changed, read from
  the API server's own `apiserver_request_total` (writes = POST, PUT, PATCH, APPLY, DELETE) to
  the kinds kubetune manages; the rest (kwok's node heartbeats, the control plane's own leases)
  is counted apart;
- the operator's resident memory per resource (RSS with N resources minus RSS with none).

    PYTHONPATH=operator python bench/bench_scale.py [N ...]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families

from kubetune.crdgen import all_crds
from kubetune.devcluster.cluster import running_cluster
from kubetune.devcluster.volumes import ensure_claim

sys.path.insert(0, str(Path(__file__).parent))
from bench_reconcile import _ftj  # the same one-GPU FineTuneJob as the reconcile benchmark

REPO = Path(__file__).resolve().parents[1]
WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION", "CREATE", "UPDATE"}
# What kubetune writes (its resources, their children, Events). Everything else (kwok's node
# heartbeats, the control plane's own leader-election leases and endpoints) is counted apart.
KUBETUNE_RESOURCES = {
    "finetunejobs", "modelservers", "jobs", "configmaps", "services", "serviceaccounts", "roles",
    "rolebindings", "pods", "deployments", "horizontalpodautoscalers",
    "poddisruptionbudgets", "networkpolicies",
}  # fmt: skip
IDLE_SECONDS = 60.0


def _writes(api: client.ApiClient) -> dict[str, float]:
    """Write requests the API server has served so far, by resource."""
    response = api.call_api("GET", f"{api.configuration.host}/metrics")
    response.read()
    text = response.data.decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            labels = sample.labels
            if not sample.name.endswith("_total") or labels.get("verb") not in WRITE_VERBS:
                continue
            if labels.get("dry_run"):
                continue
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            counts[resource] = counts.get(resource, 0.0) + sample.value
    return counts


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def _split(delta: dict[str, float]) -> tuple[float, float]:
    """(writes to what kubetune manages, all other writes)."""
    ours = sum(v for k, v in delta.items() if k.split("/")[0] in KUBETUNE_RESOURCES)
    return ours, sum(delta.values()) - ours


def _our_events(core: client.CoreV1Api, namespace: str, since: datetime) -> int:
    """Events kubetune posted since `since` (events are counted apart from the metric: the
    scheduler posts FailedScheduling events for every waiting pod, and they are not ours)."""
    count = 0
    for kind in ("FineTuneJob", "ModelServer"):
        for event in core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind={kind}"
        ).items:
            when = event.last_timestamp or event.event_time or event.first_timestamp
            if when is not None and when >= since:
                count += int(event.count or 1)
    return count


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Watcher:
    """Records when objects first appear, keyed by a name derived from each."""

    def __init__(
        self, lister: Callable[..., Any], namespace: str, key: Callable[[Any], str | None]
    ):
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self._lister, self._ns, self._key = lister, namespace, key
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(self._lister, self._ns, timeout_seconds=60):
                    name = self._key(event["object"])
                    if name and name not in self.seen:
                        self.seen[name] = time.monotonic()
                    if self.stop.is_set():
                        w.stop()
            except Exception:
                if self.stop.is_set():
                    return
                time.sleep(0.5)

    def wait(self, names: list[str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while any(n not in self.seen for n in names) and time.monotonic() < deadline:
            time.sleep(0.1)
        return max((self.seen[n] for n in names if n in self.seen), default=float("nan"))


def _plain_job(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"bench": "floor"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"bench": "floor"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "trainer",
                            "resources": {
                                "requests": {"nvidia.com/gpu": "1"},
                                "limits": {"nvidia.com/gpu": "1"},
                            },
                        }
                    ],
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                },
            },
        },
    }


def _burst(create: Callable[[str], Any], names: list[str]) -> dict[str, float]:
    started: dict[str, float] = {}

    def one(name: str) -> None:
        started[name] = time.monotonic()
        create(name)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, names))
    return started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _start_operator(cluster: Any, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "MALLOC_ARENA_MAX": "2"}
    env["PYTHONPATH"] = str(REPO / "operator")  # the chart sets MALLOC_ARENA_MAX too
    out = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune", "run"], env=env, stdout=out, stderr=out
    )
    deadline = time.monotonic() + 60
    while b"Initial authentication has finished" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the operator did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _quiet(api: client.ApiClient, settle: float = 10.0, limit: float = 900.0) -> None:
    """Wait until kubetune-side writes stop for `settle` seconds."""
    deadline = time.monotonic() + limit
    last = _split(_writes(api))[0]
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(2)
        now = _split(_writes(api))[0]
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            return


def run(count: int) -> dict[str, float]:
    ns = f"scale-{count}"
    with running_cluster(f"bench-scale-{count}") as cluster:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        ext, custom = client.ApiextensionsV1Api(api), client.CustomObjectsApi(api)
        for crd in all_crds().values():
            ext.create_custom_resource_definition(crd)
        core.create_namespace({"metadata": {"name": ns}})
        for claim in ("models", "datasets"):
            ensure_claim(api, ns, claim, cluster.dir / "volumes" / claim)

        # The floor: plain Jobs, same burst, same cluster, no operator running.
        floor_jobs = Watcher(batch.list_namespaced_job, ns, lambda o: o.metadata.name)
        floor_pods = Watcher(
            core.list_namespaced_pod, ns, lambda o: (o.metadata.labels or {}).get("job-name")
        )
        names = [f"floor-{i}" for i in range(count)]
        t0 = time.monotonic()
        started = _burst(lambda n: batch.create_namespaced_job(ns, _plain_job(n)), names)
        floor_all = floor_pods.wait(names, 900) - t0
        floor_job_lat = [floor_jobs.seen[n] - started[n] for n in names if n in floor_jobs.seen]
        floor_jobs.stop.set()
        floor_pods.stop.set()
        batch.delete_collection_namespaced_job(
            ns, label_selector="bench=floor", propagation_policy="Background"
        )
        while core.list_namespaced_pod(ns, label_selector="bench=floor").items:
            time.sleep(1)

        log = cluster.dir / "operator.log"
        operator = _start_operator(cluster, log)
        # Warm up (the first reconcile loads the API discovery cache, models, builders) before
        # the baseline, so that RSS per resource is what each resource adds.
        core.create_namespace({"metadata": {"name": "warm-up"}})
        for claim in ("models", "datasets"):
            ensure_claim(api, "warm-up", claim, cluster.dir / "volumes" / "warm-up" / claim)
        warm = Watcher(batch.list_namespaced_job, "warm-up", lambda o: o.metadata.name)
        custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", "warm-up", "finetunejobs", _ftj("warm")
        )
        warm.wait(["warm-train"], 120)
        warm.stop.set()
        _quiet(api)
        rss_empty = _rss_kib(operator.pid)
        jobs = Watcher(
            batch.list_namespaced_job,
            ns,
            lambda o: (o.metadata.labels or {}).get("kubetune.io/finetunejob"),
        )
        pods = Watcher(
            core.list_namespaced_pod,
            ns,
            lambda o: (o.metadata.labels or {}).get("kubetune.io/finetunejob"),
        )
        names = [f"ftj-{i}" for i in range(count)]
        t0 = time.monotonic()
        started = _burst(
            lambda n: custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", _ftj(n)
            ),
            names,
        )
        ours_all = pods.wait(names, 1800) - t0
        job_lat = [jobs.seen[n] - started[n] for n in names if n in jobs.seen]
        jobs.stop.set()
        pods.stop.set()

        _quiet(api)
        before = _writes(api)
        since = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        time.sleep(IDLE_SECONDS)
        idle_delta = _delta(_writes(api), before)
        idle, idle_nodes = _split(idle_delta)
        idle += _our_events(core, ns, since)
        rss_full = _rss_kib(operator.pid)

        operator.terminate()
        operator.wait(30)
        before = _writes(api)
        since = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        operator = _start_operator(cluster, log)
        time.sleep(IDLE_SECONDS)
        restart_delta = _delta(_writes(api), before)
        restart, _ = _split(restart_delta)
        restart += _our_events(core, ns, since)
        operator.terminate()
        operator.wait(30)
    return {
        "n": count,
        "job_p50": statistics.median(job_lat),
        "job_p99": _pct(job_lat, 0.99),
        "floor_job_p50": statistics.median(floor_job_lat),
        "floor_job_p99": _pct(floor_job_lat, 0.99),
        "all_pods": ours_all,
        "floor_all_pods": floor_all,
        "idle_writes_per_min": idle * 60 / IDLE_SECONDS,
        "node_writes_per_min": idle_nodes * 60 / IDLE_SECONDS,
        "restart_writes": restart,
        "restart_detail": restart_delta,  # type: ignore[dict-item]
        "idle_detail": idle_delta,  # type: ignore[dict-item]
        "kib_per_resource": (rss_full - rss_empty) / count,
    }


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [100, 1000]
    rows = [run(n) for n in counts]
    print("\nFineTuneJobs applied in one burst (16 clients), local control plane, 2 cores")
    print("floor: the same number of plain Jobs applied directly, same cluster, same run\n")
    header = (
        f"{'N':>6} {'apply->Job p50':>15} {'p99':>8} {'floor p99':>10} {'all pods':>9} "
        f"{'floor':>7} {'ratio':>6} {'idle writes/min':>16} {'restart writes':>15} "
        f"{'KiB/resource':>13}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['n']:>6} {r['job_p50']:>14.2f}s {r['job_p99']:>7.2f}s {r['floor_job_p99']:>9.2f}s "
            f"{r['all_pods']:>8.1f}s {r['floor_all_pods']:>6.1f}s "
            f"{r['all_pods'] / r['floor_all_pods']:>6.2f} {r['idle_writes_per_min']:>16.0f} "
            f"{r['restart_writes']:>15.0f} {r['kib_per_resource']:>13.1f}"
        )
    for r in rows:
        print(
            f"N={r['n']}: other writes (kwok's nodes, control-plane leases) "
            f"{r['node_writes_per_min']:.0f}/min; "
            f"idle writes by resource: {r['idle_detail'] or 'none'}; "
            f"restart writes by resource: {r['restart_detail'] or 'none'}"
        )


if __name__ == "__main__":
    main()
