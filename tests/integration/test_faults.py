"""Faults: the operator killed with SIGKILL again and again while it reconciles 200 FineTuneJobs,
and the API server restarted and frozen under it. On a cluster of their own: the faults would
hit every other test of the session, and the session's operator would be a second one acting.

What "converged" means is checked from the outside (`_problems`): every FineTuneJob has exactly
the children the builders make for its spec (no more, none missing, none drifted, each owned by
it), the namespace's trainer identity as built, no object labelled for a FineTuneJob that is
gone or owned by another uid, the training pods its spec asks for, and the status says what the
spec and the Job say.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from kubetune.api.v1alpha1.finetunejob import FineTuneJob
from kubetune.builders import training
from kubetune.builders.common import FTJ_LABEL, MANAGED_BY, Owner, Settings
from kubetune.builders.drift import differs
from kubetune.devcluster.cluster import LocalCluster, running_cluster
from kubetune.devcluster.volumes import ensure_claim
from tests.cluster_fixtures import OperatorProcess, install_crds
from tests.integration.test_finetunejob import finetunejob
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
FTJ = "finetunejobs"
SEED = 1212
RESOURCES = 200
KILLS = 20
RUNNING = 8  # FineTuneJobs with pods (2 GPUs each, of the cluster's 32); the rest suspended
CHILD_KINDS = "serviceaccounts,roles,rolebindings,configmaps,services,jobs"
# Bounds, not timings: a broken operator never converges, a working one does well within these.
CONVERGE_LIMIT_SECONDS = 300
WATCH_TIMEOUT_SECONDS = 10  # each watch ends after this: a live server answers at least as often
WATCH_STALE_SECONDS = 25  # the liveness probe fails after this much silence


@pytest.fixture(scope="module")
def fault_cluster() -> Iterator[LocalCluster]:
    with running_cluster(f"pytest-faults-{os.getpid()}") as cluster:
        install_crds(config.new_client_from_config(str(cluster.kubeconfig)))
        yield cluster


def _namespace(cluster: LocalCluster, name: str) -> client.CustomObjectsApi:
    api = config.new_client_from_config(str(cluster.kubeconfig))
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    for claim in ("models", "datasets"):
        ensure_claim(api, name, claim, cluster.dir / "volumes" / name / claim)
    return client.CustomObjectsApi(api)


def _job(name: str, running: bool) -> dict[str, Any]:
    return finetunejob(
        name,
        resources={"nodes": 1, "gpusPerNode": 2},
        runPolicy={"backoffLimit": 0, "suspend": not running},
    )


def _list(cluster: LocalCluster, kinds: str, namespace: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        cluster.kubectl("get", kinds, "-n", namespace, "-l", selector, "-o", "json")
    )["items"]
    return items


def _problems(cluster: LocalCluster, namespace: str, wanted: set[str]) -> list[str]:
    """What is not yet as it should be; empty once the namespace has converged."""
    parents = {p["metadata"]["name"]: p for p in _list(cluster, FTJ, namespace, "")}
    problems = []
    if set(parents) != wanted:
        problems.append(
            f"FineTuneJobs: missing {sorted(wanted - set(parents))[:3]}, "
            f"extra {sorted(set(parents) - wanted)[:3]}"
        )
    children: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for child in _list(cluster, CHILD_KINDS, namespace, f"{MANAGED_BY}=kubetune,{FTJ_LABEL}"):
        meta = child["metadata"]
        children.setdefault(meta["labels"][FTJ_LABEL], {})[(child["kind"], meta["name"])] = child
    pods: dict[str, list[dict[str, Any]]] = {}
    for pod in _list(cluster, "pods", namespace, FTJ_LABEL):
        if not pod["metadata"].get("deletionTimestamp"):
            pods.setdefault(pod["metadata"]["labels"][FTJ_LABEL], []).append(pod)
    for orphan in sorted(set(children) - set(parents)):
        problems.append(f"{orphan}: children left of a FineTuneJob that is gone")
    identity = {
        (c["kind"], c["metadata"]["name"]): c
        for c in _list(cluster, CHILD_KINDS, namespace, training.IDENTITY_SELECTOR)
    }
    for wanted_child in training.build_trainer_identity(namespace):
        key = (wanted_child["kind"], wanted_child["metadata"]["name"])
        if key not in identity or differs(wanted_child, identity[key]):
            problems.append(f"the trainer identity's {key[0]} is missing or not as built")
    for name, parent in sorted(parents.items()):
        ftj = FineTuneJob.model_validate(parent)
        desired = {
            (c["kind"], c["metadata"]["name"]): c
            for c in training.build_children(ftj, Owner.from_body(parent), Settings())
        }
        live = children.get(name, {})
        if set(live) != set(desired):
            problems.append(f"{name}: children {sorted(set(live) ^ set(desired))}")
            continue
        for key, child in live.items():
            owners = {r["uid"] for r in child["metadata"].get("ownerReferences") or []}
            if owners != {parent["metadata"]["uid"]} or differs(desired[key], child):
                problems.append(f"{name}: {key[0]} {key[1]} is not what the spec makes")
        running = not ftj.spec.run_policy.suspend
        mine = pods.get(name, [])
        active = [p for p in mine if p["status"].get("phase") == "Running"]
        if len(mine) != (1 if running else 0) or len(active) != len(mine):
            problems.append(f"{name}: {len(mine)} pods ({len(active)} running)")
        status = parent.get("status") or {}
        phase = "Running" if running else "Suspended"
        if status.get("phase") != phase or status.get("observedGeneration") != parent[
            "metadata"
        ].get("generation"):
            problems.append(
                f"{name}: status {status.get('phase')} of generation "
                f"{status.get('observedGeneration')}, want {phase} of "
                f"{parent['metadata'].get('generation')}"
            )
    return problems


def _converge(cluster: LocalCluster, namespace: str, wanted: set[str]) -> float:
    """Seconds until the namespace is as it should be (fails with what is not, at the bound)."""
    started = time.monotonic()
    last: list[str] = []

    def done() -> bool:
        nonlocal last
        last = _problems(cluster, namespace, wanted)
        return not last

    try:
        wait_for(done, CONVERGE_LIMIT_SECONDS, "convergence")
    except AssertionError:
        raise AssertionError(f"{len(last)} problems left, e.g. {last[:10]}") from None
    return time.monotonic() - started


class Chaos:
    """The changes made between and during the kills, from one seeded generator."""

    def __init__(self, custom: client.CustomObjectsApi, cluster: LocalCluster, ns: str) -> None:
        self.custom, self.cluster, self.ns = custom, cluster, ns
        self.rng = random.Random(SEED)
        self.running: set[str] = set()
        self.suspended: set[str] = set()
        self.created = 0

    @property
    def wanted(self) -> set[str]:
        return self.running | self.suspended

    def create(self, running: bool) -> None:
        name = f"ftj-{self.created:03d}"
        self.created += 1
        self.custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", self.ns, FTJ, _job(name, running)
        )
        (self.running if running else self.suspended).add(name)

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            "kubetune.io", "v1alpha1", self.ns, FTJ, name, {"spec": spec}
        )

    def round(self) -> None:
        """Edits (of the Job's spec; of its pod template, which makes a new Job), a suspend
        flipped, a deletion, a creation, and a child deleted by hand."""
        rng = self.rng
        for name in rng.sample(sorted(self.wanted), 4):  # the Job edited in place
            self.patch(name, {"runPolicy": {"backoffLimit": rng.randint(0, 6)}})
        for name in rng.sample(sorted(self.wanted), 2):  # a new pod template: a new Job
            self.patch(name, {"resources": {"memory": f"{rng.randint(1, 16)}Gi"}})
        if len(self.running) < RUNNING:
            flip = rng.choice(sorted(self.suspended))
            self.patch(flip, {"runPolicy": {"suspend": False}})
            self.suspended.remove(flip)
            self.running.add(flip)
        else:
            flip = rng.choice(sorted(self.running))
            self.patch(flip, {"runPolicy": {"suspend": True}})
            self.running.remove(flip)
            self.suspended.add(flip)
        gone = rng.choice(sorted(self.wanted))
        self.custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", self.ns, FTJ, gone)
        self.running.discard(gone)
        self.suspended.discard(gone)
        self.create(running=False)
        victim = rng.choice(sorted(self.wanted))
        self.cluster.kubectl(
            "delete", "configmap", "-n", self.ns, "-l", f"{FTJ_LABEL}={victim}", "--wait=false"
        )


def test_kill_9_at_random_moments_while_200_resources_reconcile(
    fault_cluster: LocalCluster, tmp_path: Path
) -> None:
    ns = "chaos"
    chaos = Chaos(_namespace(fault_cluster, ns), fault_cluster, ns)
    operator = OperatorProcess(fault_cluster, tmp_path / "operator.log")
    rng = random.Random(SEED + 1)
    operator.start()
    started = time.monotonic()
    for i in range(RESOURCES):
        chaos.create(running=i < RUNNING - 1)
    kills: list[float] = []
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.0, 2.0))
            chaos.round()  # while it runs
            time.sleep(rng.uniform(0.0, 3.0))
            assert operator.alive(), operator.log.read_text(errors="replace")[-3000:]
            operator.kill()
            kills.append(time.monotonic() - started)
            chaos.round()  # while it is down
            operator.start()
        seconds = _converge(fault_cluster, ns, chaos.wanted)
        assert operator.alive()
    finally:
        operator.stop()
    print(
        f"\nkill -9 x{len(kills)} over {kills[-1]:.0f}s of reconciling {RESOURCES} FineTuneJobs "
        f"(seed {SEED}); converged {seconds:.1f}s after the last restart"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def test_api_server_restarted_and_frozen_the_operator_recovers_and_misses_nothing(
    fault_cluster: LocalCluster, tmp_path: Path
) -> None:
    """Changes made at once after the API server is back (while the operator's watches are still
    broken or reconnecting) are all acted on; while the server is frozen the watches are dead
    and the liveness probe says so; the operator is never restarted."""
    ns = "apiserver"
    chaos = Chaos(_namespace(fault_cluster, ns), fault_cluster, ns)
    port = _free_port()
    operator = OperatorProcess(
        fault_cluster,
        tmp_path / "operator.log",
        args=(f"--liveness=http://127.0.0.1:{port}/healthz",),
        env={
            "KUBETUNE_WATCH_TIMEOUT_SECONDS": str(WATCH_TIMEOUT_SECONDS),
            "KUBETUNE_WATCH_STALE_SECONDS": str(WATCH_STALE_SECONDS),
        },
    )
    operator.start()
    try:
        pid = operator.proc.pid if operator.proc else None
        for i in range(12):
            chaos.create(running=i < 3)
        first = _converge(fault_cluster, ns, chaos.wanted)
        wait_for(lambda: _healthz(port) == 200, 30, "the liveness probe to pass")

        fault_cluster.restart_component("kube-apiserver")
        chaos.round()
        after_restart = _converge(fault_cluster, ns, chaos.wanted)
        assert _healthz(port) == 200

        # The operator paused (a stopped VM, a starved CPU) across a restart: when it runs
        # again its watches cannot resume (the new API server's watch cache starts after the
        # changes) and kopf lists everything again; the deleted child is in no event.
        assert operator.proc is not None
        os.kill(operator.proc.pid, signal.SIGSTOP)
        try:
            fault_cluster.restart_component("kube-apiserver")
            chaos.round()
        finally:
            os.kill(operator.proc.pid, signal.SIGCONT)
        after_pause = _converge(fault_cluster, ns, chaos.wanted)

        fault_cluster.freeze_component("kube-apiserver")
        frozen = time.monotonic()
        try:
            wait_for(lambda: _healthz(port) == 500, WATCH_STALE_SECONDS + 60, "liveness to fail")
            detected = time.monotonic() - frozen
        finally:
            fault_cluster.thaw_component("kube-apiserver")
        chaos.round()
        after_freeze = _converge(fault_cluster, ns, chaos.wanted)
        wait_for(lambda: _healthz(port) == 200, WATCH_STALE_SECONDS + 30, "liveness to pass")
        assert operator.alive() and operator.proc is not None and operator.proc.pid == pid
    finally:
        operator.stop()
    print(
        f"\nfirst convergence {first:.1f}s; after an API server restart {after_restart:.1f}s; "
        f"after one the operator slept through {after_pause:.1f}s; "
        f"frozen: liveness failed after {detected:.0f}s (threshold {WATCH_STALE_SECONDS}s), "
        f"converged {after_freeze:.1f}s after the thaw"
    )
