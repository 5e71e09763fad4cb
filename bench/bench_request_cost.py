"""What each request a FineTuneJob costs the API server, beside a plain Job's create.

In a 1,000-job burst on two cores the API server is the busiest process (about one core of the
two, `docs/benchmarks-control-plane.md`, session 7), so the time until every training pod exists
follows the API-server CPU each job costs. This measures it per request, on the real local
control plane: COUNT of each request kubetune makes for a one-GPU FineTuneJob, the children
from the real builders, sent by 16 clients, and the API server's own CPU time (/proc) over
them. The peer, in the same run: the same number of plain batch/v1 Jobs created directly (the
floor `bench_scale.py` compares with).

    PYTHONPATH=operator python bench/bench_request_cost.py [COUNT]

No watches are open but the control plane's own, so what the operator's watches cost (each
write's event sent to it) is not in these figures.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config

from kubetune.api.v1alpha1.finetunejob import FineTuneJob
from kubetune.builders.common import Owner, Settings
from kubetune.builders.training import build_children
from kubetune.crdgen import all_crds
from kubetune.devcluster.cluster import running_cluster
from kubetune.kube import Kube
from results import record  # bench/results.py: run as a script, this folder is on sys.path

sys.path.insert(0, str(Path(__file__).parent))
from bench_reconcile import _ftj
from bench_scale import _plain_job

NAMESPACE = "cost"
# (request, how many of it one FineTuneJob costs in a burst: bench_scale.py's burst_detail). The
# trainer's ServiceAccount, Role and RoleBinding are the namespace's, applied once (session 13).
PER_JOB = {
    "POST FineTuneJob": 1,
    "APPLY ConfigMap": 1,
    "POST Job (same body)": 1,  # a Job known to be missing is created (session 10)
    "PATCH FineTuneJob status": 2,
    "POST Event": 2,
}
KINDS = ("ConfigMap", "Job")


def _apiserver_seconds() -> float:
    """CPU time (user + system) of the kube-apiserver processes, in seconds."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "kube-apiserver":
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _cost(send: Callable[[str], Any], names: list[str]) -> float:
    """API-server CPU milliseconds per request of `send`, over `names`, 16 at a time."""
    before = _apiserver_seconds()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(send, names))
    return 1000 * (_apiserver_seconds() - before) / len(names)


def _renamed(child: dict[str, Any]) -> dict[str, Any]:
    """The same child under another name."""
    body = copy.deepcopy(child)
    body["metadata"]["name"] = f"post-{body['metadata']['name']}"
    return body


def run(count: int) -> dict[str, float]:
    with running_cluster(f"bench-cost-{os.getpid()}") as cluster:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        for crd in all_crds().values():
            client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        time.sleep(5)  # the CRDs served
        kube = Kube(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        names = [f"c{i}" for i in range(count)]
        bodies: dict[str, dict[str, Any]] = {}

        def create(name: str) -> None:
            bodies[name] = custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", _ftj(name)
            )

        costs = {"POST FineTuneJob": _cost(create, names)}
        children = {}
        for name, body in bodies.items():
            built = build_children(
                FineTuneJob.model_validate(body), Owner.from_body(body), Settings()
            )
            children[name] = {child["kind"]: child for child in built}
            # Suspended: the Job controller's pods for the first set of Jobs would otherwise
            # load the API server while the next set is measured.
            children[name]["Job"]["spec"]["suspend"] = True
        for kind in KINDS:
            costs[f"APPLY {kind}"] = _cost(lambda n, k=kind: kube.apply(children[n][k]), names)
        for kind in KINDS:
            costs[f"POST {kind} (same body)"] = _cost(
                lambda n, k=kind: kube.create(_renamed(children[n][k])), names
            )
        status = {"phase": "Pending", "active": 0}
        costs["PATCH FineTuneJob status"] = _cost(
            lambda n: kube.patch_status(
                "kubetune.io/v1alpha1", "FineTuneJob", n, NAMESPACE, status
            ),
            names,
        )
        event = {
            "involvedObject": {"kind": "FineTuneJob", "namespace": NAMESPACE},
            "reason": "Starting",
            "message": "Reconciling=True: training pods are starting",
            "type": "Normal",
            "source": {"component": "kubetune"},
        }

        def post_event(name: str) -> None:
            body = copy.deepcopy(event) | {"metadata": {"generateName": f"{name}."}}
            body["involvedObject"]["name"] = name
            core.create_namespaced_event(NAMESPACE, body)

        costs["POST Event"] = _cost(post_event, names)

        def plain(name: str) -> None:
            client.BatchV1Api(api).create_namespaced_job(NAMESPACE, _plain_job(f"plain-{name}"))

        costs["plain Job POST (the floor's write)"] = _cost(plain, names)
    return costs


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    costs = run(count)
    print(f"\nAPI-server CPU per request, {count} of each, 16 clients, local control plane\n")
    print(f"| {'request':36} | {'ms each':>7} | {'per job':>7} | {'ms per job':>10} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 9}|{'-' * 12}|")
    total = 0.0
    for what, each in costs.items():
        times = PER_JOB.get(what, 1)
        total += each * times if what in PER_JOB else 0.0
        print(f"| {what:36} | {each:7.2f} | {times:7d} | {each * times:10.2f} |")
    floor = costs["plain Job POST (the floor's write)"]
    print(f"\nkubetune's requests per FineTuneJob: {total:.1f} ms of API-server CPU, "
          f"{total / floor:.1f}x a plain Job's create ({floor:.2f} ms)")  # fmt: skip
    record(
        "request_cost", "API-server CPU per job's requests", total, floor, "ms", "plain Job create"
    )


if __name__ == "__main__":
    main()
