"""The ModelServer's NetworkPolicy, enforced: kube-router's network-policy controller
(github.com/cloudnativelabs/kube-router, `--run-firewall` only, built from its Go module) on the
real node, where pods have addresses of their own on the cluster's bridge.

What kube-router changes on the machine, and how this module keeps it to the cluster: it adds its
chains (KUBE-ROUTER-*, KUBE-POD-FW-*, KUBE-NWPLCY-*) and ipsets (KUBE-*) to the host's filter
table and jumps to them from INPUT, FORWARD and OUTPUT; its per-pod rules match only the addresses
of this node's pods (10.K.0.0/24, the cluster's own block), so other traffic passes through
untouched. Those names are kube-router's own and fixed, so one run at a time holds a lock on the
machine, refuses to start when another kube-router's chains are there, and removes every chain,
jump and ipset that was not there before when it ends (compared with what iptables-save and ipset
listed at the start). Nothing else: no sysctl, no other table, no routing (--run-router=false), no
service proxy (--run-service-proxy=false), no CNI (--enable-cni=false).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from kubetune.api.v1alpha1 import ModelServer
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import build_network_policy
from kubetune.cache import cache_root
from kubetune.devcluster import node
from kubetune.devcluster.cluster import LocalCluster, running_cluster
from kubetune.devcluster.gotools import KUBE_ROUTER, ensure_tool
from kubetune.devcluster.images import base_image
from tests.integration.test_real_node import finished, pod
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
PORT = 8000  # the ModelServer's HTTP port (spec.service.httpPort's default)
PREFIXES = ("KUBE-ROUTER-", "KUBE-POD-FW-", "KUBE-NWPLCY-", "KUBE-SRC-", "KUBE-DST-")


def _filter_chains() -> set[str]:
    out = subprocess.run(
        ["iptables-save", "-t", "filter"], check=True, capture_output=True, text=True
    ).stdout
    return {line[1:].split()[0] for line in out.splitlines() if line.startswith(":")}


def _ipsets() -> set[str]:
    out = subprocess.run(["ipset", "list", "-n"], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def _remove_new(chains_before: set[str], sets_before: set[str]) -> None:
    """Every jump, chain and ipset kube-router added (none that was there before it)."""
    new = {c for c in _filter_chains() - chains_before if c.startswith(PREFIXES)}
    for parent in ("INPUT", "FORWARD", "OUTPUT"):
        rules = subprocess.run(
            ["iptables", "-w", "-S", parent], check=True, capture_output=True, text=True
        ).stdout.splitlines()
        for rule in rules:
            parts = shlex.split(rule)  # its comments are quoted and hold spaces
            if "-j" in parts and parts[parts.index("-j") + 1] in new:
                subprocess.run(["iptables", "-w", "-D", *parts[1:]], check=False)
    for chain in new:
        subprocess.run(["iptables", "-w", "-F", chain], check=False)
    for chain in new:
        subprocess.run(["iptables", "-w", "-X", chain], check=False)
    for name in _ipsets() - sets_before:
        if name.upper().startswith("KUBE-"):
            subprocess.run(["ipset", "destroy", name], check=False)


@pytest.fixture(scope="module")
def enforcing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real-node cluster with kube-router's network-policy controller running on its node."""
    binary = ensure_tool(KUBE_ROUTER)
    lock_path = cache_root() / "kube-router.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock, running_cluster(f"np-{os.getpid()}", real_node=True) as rc:
        fcntl.flock(lock, fcntl.LOCK_EX)  # kube-router's chain names are machine-wide
        rc.load_images(base_image())
        chains, sets = _filter_chains(), _ipsets()
        foreign = sorted(c for c in chains if c.startswith(PREFIXES))
        assert foreign == [], f"another kube-router's chains are on this machine: {foreign}"
        net = node.load_state(rc.dir / "node" / "network.json")
        assert net is not None
        api = client.CoreV1Api(config.new_client_from_config(str(rc.kubeconfig)))
        if not api.read_node(node.NODE_NAME).spec.pod_cidr:  # kube-router reads it
            api.patch_node(node.NODE_NAME, {"spec": {"podCIDR": net.pod_cidr}})
        log = tmp_path_factory.mktemp("kube-router") / "kube-router.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(binary),
                    f"--kubeconfig={rc.kubeconfig}",
                    f"--hostname-override={node.NODE_NAME}",
                    "--run-firewall=true",
                    "--run-router=false",
                    "--run-service-proxy=false",
                    "--enable-cni=false",
                    "--enable-ipv6=false",
                    "--health-port=0",
                    "--metrics-port=0",
                    f"--service-cluster-ip-range={net.service_cidr}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda: (
                    (proc.poll() is None or _fail(log))
                    and "KUBE-ROUTER-FORWARD" in _filter_chains()
                ),
                60,
                "kube-router's chains",
            )
            yield rc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _remove_new(chains, sets)
        left = {c for c in _filter_chains() - chains if c.startswith(PREFIXES)}
        assert left == set(), f"kube-router's chains were left behind: {left}"


def _fail(log: Path) -> bool:
    raise AssertionError(f"kube-router exited:\n{log.read_text(errors='replace')[-3000:]}")


def _server(name: str) -> dict[str, Any]:
    """A pod with the labels of a ModelServer's pods, answering HTTP on its port."""
    server = pod(
        name,
        f"""
        import http.server
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"served")
        http.server.ThreadingHTTPServer(("", {PORT}), Handler).serve_forever()
        """,
    )
    server["metadata"]["labels"] = {
        "app.kubernetes.io/managed-by": "kubetune",
        "kubetune.io/modelserver": name,
    }
    return server


def _client(name: str, ip: str, labels: dict[str, str], tries: int) -> dict[str, Any]:
    """Prints "served" once the server answers, else every refusal (tries of 2 s each)."""
    script = f"""
        import time, urllib.request
        for attempt in range({tries}):
            try:
                print(urllib.request.urlopen("http://{ip}:{PORT}/", timeout=2).read().decode())
                break
            except OSError as err:
                print("blocked", type(err).__name__)
                time.sleep(0.5)
    """
    body = pod(name, textwrap.dedent(script))
    body["metadata"]["labels"] = labels
    return body


def _namespace(core: client.CoreV1Api, name: str) -> str:
    core.create_namespace(
        {"metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    return name


def _log(core: client.CoreV1Api, ns: str, name: str) -> list[str]:
    finished(core, ns, name)
    return [line for line in core.read_namespaced_pod_log(name, ns).splitlines() if line]


def test_the_generated_policy_admits_the_named_sources_and_no_other(
    enforcing: LocalCluster,
) -> None:
    core = client.CoreV1Api(config.new_client_from_config(str(enforcing.kubeconfig)))
    ns, other, stranger_ns = (
        _namespace(core, f"np-{suffix}-{os.getpid()}") for suffix in ("serve", "apps", "else")
    )
    try:
        core.create_namespaced_pod(ns, _server("chat"))
        try:
            ip = wait_for(
                lambda: (
                    (p := core.read_namespaced_pod("chat", ns)).status.phase == "Running"
                    and p.status.pod_ip
                ),
                180,
                "the server pod to run",
            )
        except AssertionError as err:
            events = [(e.reason, e.message) for e in core.list_namespaced_event(ns).items]
            status = core.read_namespaced_pod("chat", ns).status
            raise AssertionError(f"{err}\n{status}\n{events}") from err
        # Before any policy every pod reaches it: what follows is the policy's doing.
        core.create_namespaced_pod(ns, _client("before", ip, {}, 50))
        assert _log(core, ns, "before")[-1] == "served"

        body = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": "chat", "namespace": ns, "uid": "u"},
            "spec": {
                "model": {"source": "pvc://models/chat"},
                "networkPolicy": {
                    "sources": [{"podLabels": {"role": "gateway"}}, {"namespace": other}]
                },
            },
        }
        policy = build_network_policy(
            ModelServer.model_validate(body), Owner.from_body(body), Settings()
        )
        assert policy is not None
        policy["metadata"].pop("ownerReferences")  # no ModelServer object here
        client.NetworkingV1Api(
            config.new_client_from_config(str(enforcing.kubeconfig))
        ).create_namespaced_network_policy(ns, policy)
        # kube-router acts on the policy's watch event: its chain for the policy appears.
        wait_for(
            lambda: any(c.startswith("KUBE-NWPLCY-") for c in _filter_chains()),
            60,
            "kube-router to program the policy",
        )

        core.create_namespaced_pod(ns, _client("gateway", ip, {"role": "gateway"}, 50))
        core.create_namespaced_pod(other, _client("visitor", ip, {}, 50))
        core.create_namespaced_pod(ns, _client("stranger", ip, {"role": "web"}, 5))
        core.create_namespaced_pod(stranger_ns, _client("outsider", ip, {"role": "gateway"}, 5))
        assert _log(core, ns, "gateway")[-1] == "served"
        assert _log(core, other, "visitor")[-1] == "served"
        for where, name in ((ns, "stranger"), (stranger_ns, "outsider")):
            lines = _log(core, where, name)
            assert len(lines) == 5 and all(line.startswith("blocked") for line in lines), lines
        print("network policy enforced: 2 named sources served, 2 others blocked (5 tries each)")
    finally:
        for name in (ns, other, stranger_ns):
            core.delete_namespace(name)
