"""The operator at scale, on the real local control plane: N FineTuneJobs applied in one burst.

Prints, for N = 100, 500 and 1,000 (or the counts given):

- apply -> Job p50/p99, and the time until every training pod exists, against the floor: the
  same number of plain batch/v1 Jobs applied directly in the same run (the Job controller's own
  speed, which kubetune cannot beat since it creates such Jobs);
- API writes per idle minute, and in the minute after a restart with nothing changed, read from
  the API server's own `apiserver_request_total` (writes = POST, PUT, PATCH, APPLY, DELETE) to
  the kinds kubetune manages; the rest (kwok's node heartbeats, the control plane's own leases)
  is counted apart;
- the operator's resident memory per resource (RSS with N resources minus RSS with none), and
  its peak RSS;
- the same for the peer, Kubeflow's training operator (TRAINING_OPERATOR in devcluster/gotools.py,
  built from its Go module, its defaults: one controller thread), given N equivalent PyTorchJobs
  (one Master replica, one GPU) in the same cluster after kubetune's namespace is gone; its CRDs
  are the module's manifests/base/crds. Its validating webhook is registered (the operator waits
  for the CA to be injected into it before it starts its controllers) for a kind this benchmark
  never creates: the API server here cannot reach a Service, so the peer's creates skip the
  webhook call a real install makes (in the peer's favour).

    PYTHONPATH=operator python bench/bench_scale.py [N ...] [--no-peer] [--controller-qps=N]
        [--allocator=jemalloc,pymalloc] [--baseline=WORKTREE]

Also printed: each process's CPU seconds from the burst's start until every pod existed.
BENCH_LOGS=DIR keeps the operators' logs; BENCH_PYSPY=DIR samples the operator with py-spy.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families

from kubetune.crdgen import all_crds
from kubetune.devcluster.cluster import CONTROLLER_QPS, running_cluster
from kubetune.devcluster.gotools import TRAINING_OPERATOR, ensure_tool, module_dir
from kubetune.devcluster.volumes import ensure_claim
from results import record  # bench/results.py: run as a script, this folder is on sys.path

sys.path.insert(0, str(Path(__file__).parent))
from bench_reconcile import _ftj  # the same one-GPU FineTuneJob as the reconcile benchmark

REPO = Path(__file__).resolve().parents[1]
WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION", "CREATE", "UPDATE"}
READ_VERBS = {"GET", "LIST"}  # watches are counted apart by the API server (WATCH)
# What kubetune writes (its resources, their children, Events). Everything else (kwok's node
# heartbeats, the control plane's own leader-election leases and endpoints) is counted apart.
KUBETUNE_RESOURCES = {
    "finetunejobs", "modelservers", "jobs", "configmaps", "services", "serviceaccounts", "roles",
    "rolebindings", "pods", "deployments", "horizontalpodautoscalers",
    "poddisruptionbudgets", "networkpolicies",
}  # fmt: skip
# What the training operator writes: its jobs and their status, pods, services, and its webhook
# certificate and configuration; its Events are counted apart, as kubetune's are.
PEER_RESOURCES = {
    "pytorchjobs", "pods", "services", "podgroups", "secrets", "validatingwebhookconfigurations",
}  # fmt: skip
IDLE_SECONDS = 60.0


def _requests(api: client.ApiClient, verbs: set[str] = WRITE_VERBS) -> dict[str, float]:
    """Requests of `verbs` (by default the writes) the API server has served so far, by
    "resource[/subresource] VERB"."""
    response = api.call_api("GET", f"{api.configuration.host}/metrics")
    response.read()
    text = response.data.decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            labels = sample.labels
            if not sample.name.endswith("_total") or labels.get("verb") not in verbs:
                continue
            if labels.get("dry_run"):
                continue
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            key = f"{resource} {labels['verb']}"
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def _split(
    delta: dict[str, float], resources: set[str] = KUBETUNE_RESOURCES
) -> tuple[float, float]:
    """(requests to what the operator manages, all other requests)."""
    ours = sum(v for k, v in delta.items() if k.split()[0].split("/")[0] in resources)
    return ours, sum(delta.values()) - ours


def _our_events(
    core: client.CoreV1Api,
    namespace: str,
    since: datetime,
    kinds: tuple[str, ...] = ("FineTuneJob", "ModelServer"),
) -> int:
    """Events the operator posted on its `kinds` since `since` (events are counted apart from
    the metric: the scheduler posts FailedScheduling events for every waiting pod, and they are
    not the operator's)."""
    count = 0
    for kind in kinds:
        for event in core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind={kind}"
        ).items:
            when = event.last_timestamp or event.event_time or event.first_timestamp
            if when is not None and when >= since:
                count += int(event.count or 1)
    return count


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory now (VmRSS) or at its highest so far (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) each process has used so far, by name; the benchmark itself
    (its 16 clients and watches) is "bench"."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {"bench": sum(os.times()[:2])}
    for name, pid in pids.items():
        try:
            # after the command (which may hold spaces, in parentheses): utime, stime at 12, 13
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[name] = (int(fields[11]) + int(fields[12])) / tick
    return used


def _cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 1) for k, v in after.items()}


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


def _custom_burst(
    custom: client.CustomObjectsApi,
    api_version: str,
    namespace: str,
    plural: str,
    build: Callable[[str], dict[str, Any]],
    names: list[str],
) -> tuple[float, dict[str, float]]:
    """(when the burst began, when each object's create was sent)."""
    group, version = api_version.split("/")
    t0 = time.monotonic()
    started = _burst(
        lambda n: custom.create_namespaced_custom_object(
            group, version, namespace, plural, build(n)
        ),
        names,
    )
    return t0, started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --allocator=NAME[,NAME...]: kubetune once per memory allocator, in the same run. "jemalloc"
# (the default) is what the operator image runs: every allocation (PYTHONMALLOC=malloc) in
# Debian's libjemalloc2, preloaded (hack/node-prereqs.sh installs it); "pymalloc" is CPython's
# default, its small-object arenas over glibc's malloc, which the chart limits to two arenas.
ALLOCATORS: dict[str, dict[str, str]] = {
    "jemalloc": {
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": "libjemalloc.so.2",  # found on the loader's path, as in the image
        "MALLOC_CONF": "background_thread:true",
    },
    "pymalloc": {"MALLOC_ARENA_MAX": "2"},
}
# jemalloc tunings to weigh against the shipped one (same library, other MALLOC_CONF): one arena
# for every thread instead of four per core; and that without the per-thread caches, which an
# idle handler thread keeps full (its cache is flushed only by its own allocations).
TUNINGS = {"jemalloc-1arena": "narenas:1", "jemalloc-lean": "narenas:1,tcache:false"}
for _name, _conf in TUNINGS.items():
    ALLOCATORS[_name] = {**ALLOCATORS["jemalloc"], "MALLOC_CONF": f"background_thread:true,{_conf}"}
SHIPPED = "jemalloc"


def _start_operator(
    cluster: Any, log: Path, allocator: str = SHIPPED, root: Path = REPO
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), **ALLOCATORS[allocator]}
    env["PYTHONPATH"] = str(root / "operator")
    out = log.open("ab")
    command = [sys.executable, "-m", "kubetune", "run"]
    if os.environ.get("BENCH_TRACEMALLOC"):  # a memory profile (trace_operator.py), not timings
        command = [sys.executable, str(Path(__file__).parent / "trace_operator.py")]
        env["BENCH_TRACEMALLOC_OUT"] = str(log.with_name("tracemalloc.txt"))
    proc = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + (600 if os.environ.get("BENCH_TRACEMALLOC") else 60)
    while b"Initial authentication has finished" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the operator did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _quiet(
    api: client.ApiClient,
    settle: float = 10.0,
    limit: float = 900.0,
    resources: set[str] = KUBETUNE_RESOURCES,
) -> None:
    """Wait until the operator's writes stop for `settle` seconds."""
    deadline = time.monotonic() + limit
    last = _split(_requests(api), resources)[0]
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(2)
        now = _split(_requests(api), resources)[0]
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            return


def _lat(watcher: Watcher, started: dict[str, float], names: list[str]) -> list[float]:
    return [watcher.seen[n] - started[n] for n in names if n in watcher.seen]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _idle_and_restart(
    api: client.ApiClient,
    core: client.CoreV1Api,
    ns: str,
    pid: int,
    restart: Callable[[], int],
    resources: set[str],
) -> dict[str, Any]:
    """Writes in an idle minute, RSS then, and writes in the minute after a restart. The idle
    minute starts after 30 s without a write: at N = 1,000 on a loaded machine a 10 s lull came
    while the operator still worked through the burst's last pod events."""
    _quiet(api, settle=30.0, resources=resources)
    before, reads_before = _requests(api), _requests(api, READ_VERBS)
    settled = before
    since = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    time.sleep(IDLE_SECONDS)
    idle_delta = _delta(_requests(api), before)
    idle_reads = _split(_delta(_requests(api, READ_VERBS), reads_before), resources)[0]
    idle, idle_nodes = _split(idle_delta, resources)
    kinds = ("FineTuneJob", "ModelServer") if resources is KUBETUNE_RESOURCES else ("PyTorchJob",)
    idle += _our_events(core, ns, since, kinds)
    rss_full, peak = _rss_kib(pid), _rss_kib(pid, "VmHWM")
    before = _requests(api)
    since = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    restart()
    time.sleep(IDLE_SECONDS)
    restart_delta = _delta(_requests(api), before)
    restarted, _ = _split(restart_delta, resources)
    restarted += _our_events(core, ns, since, kinds)
    return {
        "idle_writes_per_min": idle * 60 / IDLE_SECONDS,
        "idle_reads_per_min": idle_reads * 60 / IDLE_SECONDS,
        "node_writes_per_min": idle_nodes * 60 / IDLE_SECONDS,
        "restart_writes": restarted,
        "restart_detail": restart_delta,
        "idle_detail": idle_delta,
        "settled": settled,
        "rss_full": rss_full,
        "peak_rss": peak,
    }


def _floor(
    api: client.ApiClient, ns: str, count: int, components: dict[str, int]
) -> dict[str, Any]:
    """Plain Jobs, same burst, same cluster, no operator running."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    floor_jobs = Watcher(batch.list_namespaced_job, ns, lambda o: o.metadata.name)
    floor_pods = Watcher(
        core.list_namespaced_pod, ns, lambda o: (o.metadata.labels or {}).get("job-name")
    )
    names = [f"floor-{i}" for i in range(count)]
    cpu_before = _cpu_seconds(components)
    t0 = time.monotonic()
    started = _burst(lambda n: batch.create_namespaced_job(ns, _plain_job(n)), names)
    all_pods = floor_pods.wait(names, 900) - t0
    row = {
        "who": "plain Jobs (floor)",
        "first": _lat(floor_jobs, started, names),
        "pod": _lat(floor_pods, started, names),
        "all_pods": all_pods,
        "burst_cpu": _cpu_delta(_cpu_seconds(components), cpu_before),
    }
    floor_jobs.stop.set()
    floor_pods.stop.set()
    batch.delete_collection_namespaced_job(
        ns, label_selector="bench=floor", propagation_policy="Background"
    )
    while core.list_namespaced_pod(ns, label_selector="bench=floor").items:
        time.sleep(1)
    return row


def _kubetune(
    cluster: Any,
    api: client.ApiClient,
    ns: str,
    count: int,
    allocator: str = SHIPPED,
    root: Path = REPO,
    variant: str = "",
) -> dict[str, Any]:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    custom = client.CustomObjectsApi(api)
    tag = (variant or allocator).replace(" ", "-")
    log = cluster.dir / f"operator-{tag}.log"
    operator = _start_operator(cluster, log, allocator, root)
    # Warm up (the first reconcile loads the API discovery cache, models, builders) before
    # the baseline, so that RSS per resource is what each resource adds.
    warm_ns = f"warm-up-{tag}"
    core.create_namespace({"metadata": {"name": warm_ns}})
    for claim in ("models", "datasets"):
        ensure_claim(api, warm_ns, claim, cluster.dir / "volumes" / warm_ns / claim)
    warm = Watcher(batch.list_namespaced_job, warm_ns, lambda o: o.metadata.name)
    custom.create_namespaced_custom_object(
        "kubetune.io", "v1alpha1", warm_ns, "finetunejobs", _ftj("warm")
    )
    warm.wait(["warm-train"], 120)
    warm.stop.set()
    _quiet(api)
    rss_empty = _rss_kib(operator.pid)
    if os.environ.get("BENCH_TRACEMALLOC"):  # BENCH_TRACEMALLOC=<file>: the growth goes there
        os.kill(operator.pid, signal.SIGUSR1)
    label = "kubetune.io/finetunejob"
    jobs = Watcher(batch.list_namespaced_job, ns, lambda o: (o.metadata.labels or {}).get(label))
    pods = Watcher(core.list_namespaced_pod, ns, lambda o: (o.metadata.labels or {}).get(label))
    names = [f"ftj-{i}" for i in range(count)]
    before_burst = _requests(api)
    pids = {**_components(cluster), "operator": operator.pid}
    profiler = _profile(operator.pid, tag)
    cpu_before = _cpu_seconds(pids)
    t0, started = _custom_burst(custom, "kubetune.io/v1alpha1", ns, "finetunejobs", _ftj, names)
    all_pods = pods.wait(names, 1800) - t0
    burst_cpu = _cpu_delta(_cpu_seconds(pids), cpu_before)
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its samples when stopped
        profiler.wait(120)
    who = "kubetune" if allocator == SHIPPED else f"kubetune ({allocator})"
    row: dict[str, Any] = {
        "who": f"{who} {variant}" if variant else who,
        "first": _lat(jobs, started, names),
        "pod": _lat(pods, started, names),
        "all_pods": all_pods,
        "burst_cpu": burst_cpu,
    }
    jobs.stop.set()
    pods.stop.set()

    def restart() -> int:
        nonlocal operator
        if os.environ.get("BENCH_TRACEMALLOC"):
            growth = log.with_name("tracemalloc.txt")
            os.kill(operator.pid, signal.SIGUSR1)  # the growth over the burst, before the restart
            deadline = time.monotonic() + 600  # a snapshot of a traced heap takes a while
            while not growth.exists() and time.monotonic() < deadline:
                time.sleep(2)
            time.sleep(2)  # written at once, but let it finish
            shutil.copy(growth, Path(os.environ["BENCH_TRACEMALLOC"]))
        operator.terminate()
        operator.wait(30)
        operator = _start_operator(cluster, log, allocator, root)
        return operator.pid

    row |= _idle_and_restart(api, core, ns, operator.pid, restart, KUBETUNE_RESOURCES)
    row["burst_detail"] = _delta(row.pop("settled"), before_burst)
    row["kib_per_resource"] = (row["rss_full"] - rss_empty) / count
    operator.terminate()
    operator.wait(30)
    if keep := os.environ.get("BENCH_LOGS"):  # BENCH_LOGS=<folder>: the operator's log, kept
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(log, Path(keep) / f"{count}-{log.name}")
    return row


# -- the peer: Kubeflow's training operator ------------------------------------------------------

PEER_NAMESPACE = "kubeflow"  # where it keeps its webhook certificate (MY_POD_NAMESPACE)
PEER_SECRET = "training-operator-webhook-cert"
PEER_WEBHOOK = "validator.training-operator.kubeflow.org"
# Its cert rotator waits for the certificate in this folder (a constant of the peer's code),
# where a pod would mount the Secret; the bench copies it there.
PEER_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
PEER_LABEL = "training.kubeflow.org/job-name"


def _pytorchjob(name: str) -> dict[str, Any]:
    """The peer's equivalent of the benchmark's FineTuneJob: one Master pod with one GPU."""
    container = _plain_job(name)["spec"]["template"]["spec"]["containers"][0]
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": {"bench": "peer"}},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {
                        "spec": {
                            "containers": [{**container, "name": "pytorch"}],
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                        }
                    },
                }
            }
        },
    }


def _install_peer(api: client.ApiClient) -> None:
    ext, core = client.ApiextensionsV1Api(api), client.CoreV1Api(api)
    crds = module_dir(TRAINING_OPERATOR) / "manifests" / "base" / "crds"
    for path in sorted(crds.glob("kubeflow.org_*.yaml")):
        ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + 60
    while True:
        try:
            custom.list_cluster_custom_object("kubeflow.org", "v1", "pytorchjobs")
            break
        except client.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    core.create_namespace({"metadata": {"name": PEER_NAMESPACE}})
    core.create_namespaced_secret(PEER_NAMESPACE, {"metadata": {"name": PEER_SECRET}})
    client.AdmissionregistrationV1Api(api).create_validating_webhook_configuration(
        {
            "metadata": {"name": PEER_WEBHOOK},
            "webhooks": [
                {
                    "name": "validator.mxjob.training-operator.kubeflow.org",
                    "admissionReviewVersions": ["v1"],
                    "clientConfig": {
                        "service": {
                            "name": "training-operator",
                            "namespace": PEER_NAMESPACE,
                            "path": "/validate-kubeflow-org-v1-mxjob",
                        }
                    },
                    "failurePolicy": "Ignore",
                    "sideEffects": "None",
                    "rules": [
                        {
                            "apiGroups": ["kubeflow.org"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["mxjobs"],
                        }
                    ],
                }
            ],
        }
    )


def _start_peer(cluster: Any, api: client.ApiClient, log: Path) -> subprocess.Popen[bytes]:
    binary = ensure_tool(TRAINING_OPERATOR)
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "MY_POD_NAMESPACE": "kubeflow"}
    out = log.open("ab")
    started = len(log.read_bytes()) if log.exists() else 0
    proc = subprocess.Popen(
        [
            str(binary),
            f"--metrics-bind-address=127.0.0.1:{_free_port()}",
            f"--health-probe-bind-address=127.0.0.1:{_free_port()}",
            f"--webhook-server-port={_free_port()}",
        ],
        env=env,
        stdout=out,
        stderr=out,
    )
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + 120
    while b"pytorchjob-controller" not in log.read_bytes()[started:] or (
        b"Starting workers" not in log.read_bytes()[started:]
    ):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the training operator did not start: {log.read_text()[-3000:]}")
        data = core.read_namespaced_secret(PEER_SECRET, PEER_NAMESPACE).data or {}
        if "tls.crt" in data and not (PEER_CERT_DIR / "tls.crt").exists():
            PEER_CERT_DIR.mkdir(parents=True, exist_ok=True)
            for key in ("tls.key", "tls.crt"):  # the certificate last: its presence is the signal
                (PEER_CERT_DIR / key).write_bytes(base64.b64decode(data[key]))
        time.sleep(0.5)
    return proc


def _peer(cluster: Any, api: client.ApiClient, count: int) -> dict[str, Any]:
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    ns = f"peer-{count}"
    shutil.rmtree(PEER_CERT_DIR, ignore_errors=True)
    _install_peer(api)
    log = cluster.dir / "training-operator.log"
    peer = _start_peer(cluster, api, log)
    try:
        core.create_namespace({"metadata": {"name": "warm-up-peer"}})
        warm = Watcher(
            core.list_namespaced_pod,
            "warm-up-peer",
            lambda o: (o.metadata.labels or {}).get(PEER_LABEL),
        )
        custom.create_namespaced_custom_object(
            "kubeflow.org", "v1", "warm-up-peer", "pytorchjobs", _pytorchjob("warm")
        )
        warm.wait(["warm"], 120)
        warm.stop.set()
        _quiet(api, resources=PEER_RESOURCES)
        rss_empty = _rss_kib(peer.pid)
        core.create_namespace({"metadata": {"name": ns}})
        pods = Watcher(
            core.list_namespaced_pod, ns, lambda o: (o.metadata.labels or {}).get(PEER_LABEL)
        )
        names = [f"ptj-{i}" for i in range(count)]
        before_burst = _requests(api)
        t0, started = _custom_burst(
            custom, "kubeflow.org/v1", ns, "pytorchjobs", _pytorchjob, names
        )
        all_pods = pods.wait(names, 1800) - t0
        pod_lat = _lat(pods, started, names)
        pods.stop.set()
        row: dict[str, Any] = {
            "who": f"training-operator {TRAINING_OPERATOR.version}",
            "first": pod_lat,
            "pod": pod_lat,
            "all_pods": all_pods,
        }

        def restart() -> int:
            nonlocal peer
            peer.terminate()
            peer.wait(30)
            peer = _start_peer(cluster, api, log)
            return peer.pid

        row |= _idle_and_restart(api, core, ns, peer.pid, restart, PEER_RESOURCES)
        row["burst_detail"] = _delta(row.pop("settled"), before_burst)
        row["kib_per_resource"] = (row["rss_full"] - rss_empty) / count
    finally:
        peer.terminate()
        peer.wait(30)
        shutil.rmtree(PEER_CERT_DIR, ignore_errors=True)
    return row


def _gone(api: client.ApiClient, namespace: str, limit: float = 600.0) -> None:
    """Delete a namespace and wait until the server has removed it and all it held. kwok deletes
    a pod only once it has no finalizers, and the Job controller leaves its job-tracking one on
    running pods whose Job the namespace's deletion took: the bench removes it, as a kubelet's
    ending the containers would let the Job controller do."""
    core = client.CoreV1Api(api)
    core.delete_namespace(namespace)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except client.ApiException as err:
            if err.status == 404:
                return
            raise
        for pod in core.list_namespaced_pod(namespace).items:
            if pod.metadata.deletion_timestamp and pod.metadata.finalizers:
                try:
                    core.patch_namespaced_pod(
                        pod.metadata.name, namespace, {"metadata": {"finalizers": None}}
                    )
                except client.ApiException as err:
                    if err.status != 404:
                        raise
        time.sleep(2)


def run(
    count: int,
    peer: bool = True,
    qps: int = CONTROLLER_QPS,
    allocators: tuple[str, ...] = (SHIPPED,),
    baseline: Path | None = None,
) -> list[dict[str, Any]]:
    """`baseline`: another checkout (a `git worktree` of an earlier commit), whose operator runs
    after this one's, on the same cluster, so that a change is measured against what it
    changed in one run (its row is labelled with that checkout's commit)."""
    variants: list[tuple[str, Path, str]] = [(a, REPO, "") for a in allocators]
    if baseline is not None:
        commit = subprocess.run(
            ["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        variants.append((allocators[0], baseline, f"at {commit}"))
    ns = f"scale-{count}"
    with running_cluster(f"bench-scale-{count}-{os.getpid()}", controller_qps=qps) as cluster:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        core = client.CoreV1Api(api)
        ext = client.ApiextensionsV1Api(api)
        for crd in all_crds().values():
            ext.create_custom_resource_definition(crd)
        core.create_namespace({"metadata": {"name": ns}})
        for claim in ("models", "datasets"):
            ensure_claim(api, ns, claim, cluster.dir / "volumes" / claim)
        rows = [_floor(api, ns, count, _components(cluster))]
        _progress(rows[-1])
        for i, (allocator, root, variant) in enumerate(variants):
            if i:  # each variant starts on a cluster as empty as the first one's was
                previous = variants[i - 1]
                _gone(api, ns)
                _gone(api, "warm-up-" + (previous[2] or previous[0]).replace(" ", "-"))
                core.create_namespace({"metadata": {"name": ns}})
                for claim in ("models", "datasets"):
                    ensure_claim(api, ns, claim, cluster.dir / "volumes" / str(i) / claim)
            rows.append(_kubetune(cluster, api, ns, count, allocator, root, variant))
            _progress(rows[-1])
        if peer:
            _gone(api, ns)  # the peer starts on a cluster as empty as kubetune's was
            rows.append(_peer(cluster, api, count))
            _progress(rows[-1])
    for row in rows:
        row["n"], row["qps"] = count, qps
        row["floor_all_pods"] = rows[0]["all_pods"]
    return rows


def _profile(pid: int, tag: str) -> subprocess.Popen[bytes] | None:
    """BENCH_PYSPY=<folder>: py-spy (on PATH, or BENCH_PYSPY_BIN) samples the operator through
    the burst, 100 times a second without pausing it, into <folder>/<tag>.txt (collapsed stacks,
    one line per stack with its sample count). It takes a core's share of CPU itself: a profile
    run's timings are not the benchmark's."""
    folder = os.environ.get("BENCH_PYSPY")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    spy = os.environ.get("BENCH_PYSPY_BIN") or shutil.which("py-spy") or "py-spy"
    out = Path(folder) / f"{tag}.txt"
    command = [spy, "record", "--pid", str(pid), "--rate", "100", "--nonblocking"]
    return subprocess.Popen([*command, "--format", "raw", "--output", str(out)])


def _components(cluster: Any) -> dict[str, int]:
    """The local cluster's processes (kube-apiserver, etcd, ...), by name."""
    return {c.name: c.pid for c in cluster.components()}


def _progress(row: dict[str, Any]) -> None:
    """One measured row at once, before the table (a long run shows what it has so far)."""
    brief = {k: v for k, v in row.items() if k not in ("first", "pod")}
    for key in ("first", "pod"):
        if row.get(key):
            brief[f"{key} p50/p99"] = (_pct(row[key], 0.5), _pct(row[key], 0.99))
    print(f"measured: {brief}", flush=True)


def _cpu() -> str:
    for line in subprocess.run(
        ["lscpu"], check=False, capture_output=True, text=True
    ).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _ms(values: list[float], q: float) -> str:
    return f"{_pct(values, q):.1f}s" if values else "-"


def _table(rows: list[dict[str, Any]]) -> None:
    print(f"\nJobs applied in one burst (16 clients), local control plane, {os.cpu_count()} cores")
    print(f"({_cpu()}); floor: the same number of plain Jobs applied directly, same run;")
    print(f"kube-controller-manager's client at {rows[0]['qps']} requests/s\n")
    header = (
        f"| {'N':>5} | {'operator':<24} | {'apply->Job p50':>14} | {'p99':>7} | "
        f"{'apply->pod p50':>14} | {'p99':>7} | {'all pods':>8} | {'x floor':>7} | "
        f"{'idle writes/min':>15} | {'restart writes':>14} | {'KiB/resource':>12} | "
        f"{'peak RSS':>9} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        operator = r["who"] != "plain Jobs (floor)"
        first = r["first"] if r["first"] is not r["pod"] else []
        print(
            f"| {r['n']:>5} | {r['who']:<24} | {_ms(first, 0.5):>14} | {_ms(first, 0.99):>7} | "
            f"{_ms(r['pod'], 0.5):>14} | {_ms(r['pod'], 0.99):>7} | {r['all_pods']:>7.1f}s | "
            f"{r['all_pods'] / r['floor_all_pods']:>7.2f} | "
            + (
                f"{r['idle_writes_per_min']:>15.0f} | {r['restart_writes']:>14.0f} | "
                f"{r['kib_per_resource']:>12.1f} | {r['peak_rss'] / 1024:>6.0f}MiB |"
                if operator
                else f"{'':>15} | {'':>14} | {'':>12} | {'':>9} |"
            )
        )
    print("\nCPU seconds used from the burst's start until every pod existed, by process:")
    for r in rows:
        cpu = r.get("burst_cpu") or {}
        print(f"N={r['n']} {r['who']}: total {sum(cpu.values()):.1f}; {cpu}")
    for r in rows:
        if r["who"] == "plain Jobs (floor)":
            continue
        print(
            f"N={r['n']} {r['who']}: other writes (kwok's nodes, control-plane leases) "
            f"{r['node_writes_per_min']:.0f}/min; "
            f"burst writes per resource created, by resource: "
            f"{ {k: round(v / r['n'], 2) for k, v in sorted(r['burst_detail'].items())} }; "
            f"idle writes by resource: {r['idle_detail'] or 'none'}; "
            f"idle reads of its kinds: {r['idle_reads_per_min']:.0f}/min; "
            f"restart writes by resource: {r['restart_detail'] or 'none'}"
        )


def main() -> None:
    """The table is printed again after each N, so a long run shows what it has so far."""
    args = sys.argv[1:]
    peer = "--no-peer" not in args
    counts = [int(a) for a in args if a.isdigit()] or [100, 500, 1000]
    # --controller-qps=20: kube-controller-manager's own default (the local cluster runs 100)
    qps = next(
        (int(a.split("=", 1)[1]) for a in args if a.startswith("--controller-qps=")),
        CONTROLLER_QPS,
    )
    allocators = next(
        (tuple(a.split("=", 1)[1].split(",")) for a in args if a.startswith("--allocator=")),
        (SHIPPED,),
    )
    if unknown := set(allocators) - set(ALLOCATORS):
        sys.exit(f"--allocator: {sorted(unknown)} not among {sorted(ALLOCATORS)}")
    # --baseline=DIR: a checkout of an earlier commit, run after this one in the same run
    baseline = next(
        (Path(a.split("=", 1)[1]).resolve() for a in args if a.startswith("--baseline=")), None
    )
    rows: list[dict[str, Any]] = []
    for n in counts:
        rows += run(n, peer, qps, allocators, baseline)
        _table(rows)
        sys.stdout.flush()
    _record(rows)


def _record(rows: list[dict[str, Any]]) -> None:
    """make bench's table: kubetune beside the training operator at each N."""
    for ours in (r for r in rows if r["who"] == "kubetune"):
        peers = [r for r in rows if r["n"] == ours["n"] and r["who"].startswith("training-")]
        for theirs in peers:
            for what, key, unit in (
                ("time until every pod exists", "all_pods", "s"),
                ("operator memory per resource", "kib_per_resource", "KiB"),
                ("API writes on a restart with nothing changed", "restart_writes", "writes"),
            ):
                record(
                    "control plane",
                    f"{what}, N={ours['n']}",
                    float(ours[key]),
                    float(theirs[key]),
                    unit,
                    theirs["who"],
                )


if __name__ == "__main__":
    main()
