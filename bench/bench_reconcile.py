"""How fast the operator turns FineTuneJobs into their children, on the real local control plane.

Creates N FineTuneJobs one after another and records, for each, the time from the create call to
the moment its Job exists (watched, not polled). The peer, measured in the same run on the same
cluster: N plain batch/v1 Jobs, from create to their first Pod (the Job controller's own latency).

    PYTHONPATH=operator python bench/bench_reconcile.py [N]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from kubetune.crdgen import all_crds
from kubetune.devcluster.cluster import running_cluster
from kubetune.devcluster.volumes import ensure_claim
from results import record  # bench/results.py: run as a script, this folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
NS = "bench"


def _watch_created(kind_list: Any, stop: threading.Event, seen: dict[str, float], key: Any) -> None:
    w = watch.Watch()
    try:
        for event in w.stream(kind_list, NS, timeout_seconds=600):
            if event["type"] == "ADDED":
                name = key(event["object"])
                if name and name not in seen:
                    seen[name] = time.monotonic()
            if stop.is_set():
                w.stop()
    except Exception:  # the cluster stops under the watch at the end
        if not stop.is_set():
            raise


def _peer_name(pod: Any) -> str | None:
    name = (pod.metadata.labels or {}).get("job-name", "")
    return name.removeprefix("peer-") if name.startswith("peer-") else None


def _ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/base"},
            "dataset": {"source": "pvc://datasets/train.jsonl"},
            "resources": {"nodes": 1, "gpusPerNode": 1},
            "output": {"uri": f"pvc://models/out/{name}"},
        },
    }


def _measure(create: Any, names: list[str], seen: dict[str, float]) -> list[float]:
    started = {}
    for name in names:
        started[name] = time.monotonic()
        create(name)
    deadline = time.monotonic() + 300
    while len([n for n in names if n in seen]) < len(names) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [seen[n] - started[n] for n in names if n in seen]


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    with running_cluster("bench") as cluster:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        ext, custom = client.ApiextensionsV1Api(api), client.CustomObjectsApi(api)
        for crd in all_crds().values():
            ext.create_custom_resource_definition(crd)
        core.create_namespace({"metadata": {"name": NS}})
        for claim in ("models", "datasets"):
            ensure_claim(api, NS, claim, cluster.dir / "volumes" / claim)
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        env["PYTHONPATH"] = str(REPO / "operator")
        log = (cluster.dir / "operator.log").open("wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "run"], env=env, stdout=log, stderr=log
        )
        time.sleep(5)
        stop = threading.Event()
        jobs_seen: dict[str, float] = {}
        pods_seen: dict[str, float] = {}
        threading.Thread(
            target=_watch_created,
            args=(
                batch.list_namespaced_job,
                stop,
                jobs_seen,
                lambda o: (o.metadata.labels or {}).get("kubetune.io/finetunejob"),
            ),
            daemon=True,
        ).start()
        threading.Thread(
            target=_watch_created,
            args=(core.list_namespaced_pod, stop, pods_seen, _peer_name),
            daemon=True,
        ).start()
        time.sleep(1)
        try:
            ours = _measure(
                lambda n: custom.create_namespaced_custom_object(
                    "kubetune.io", "v1alpha1", NS, "finetunejobs", _ftj(n)
                ),
                [f"ftj-{i}" for i in range(count)],
                jobs_seen,
            )
            pause = {
                "metadata": {"name": ""},
                "spec": {
                    "backoffLimit": 0,
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "c", "image": "pause"}],
                        }
                    },
                },
            }

            def create_job(name: str) -> None:
                body = {**pause, "metadata": {"name": f"peer-{name}"}}
                batch.create_namespaced_job(NS, body)

            peer = _measure(create_job, [f"job-{i}" for i in range(count)], pods_seen)
        finally:
            stop.set()
            operator.terminate()
            operator.wait(30)
    print(f"\n{count} resources, created one after another (2 cores, local control plane)\n")
    print(f"{'':44} {'median':>8} {'p90':>8} {'max':>8}")
    for label, values in (
        ("kubetune: FineTuneJob created -> Job exists", ours),
        ("peer: Job created -> first Pod exists", peer),
    ):
        ordered = sorted(values)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        median = statistics.median(ordered)
        print(
            f"{label:44} {median * 1000:7.0f}ms {p90 * 1000:7.0f}ms {ordered[-1] * 1000:7.0f}ms"
            f"  (n={len(ordered)})"
        )
    ratio = statistics.median(ours) / statistics.median(peer)
    print(f"\nratio of medians (kubetune / Job controller): {ratio:.2f}")
    record(
        "reconcile",
        f"created -> child exists, median of {count}",
        statistics.median(ours),
        statistics.median(peer),
        "s",
        "Job controller: Job -> Pod",
    )


if __name__ == "__main__":
    main()
