"""A real Kubernetes control plane as local processes on loopback: etcd, kube-apiserver (TLS, RBAC,
Pod Security admission), kube-controller-manager, kube-scheduler, and kwok simulating nodes (some
with `nvidia.com/gpu` capacity) so that the real scheduler places or refuses pods by their GPUs.

One cluster lives in one state folder (`<cache>/clusters/<name>`): its certificates, etcd data,
component logs, a `state.json` with the processes and ports, and an admin kubeconfig. The
processes outlive the command that started them (`kubetune dev cluster up` returns); `down` stops
them and removes the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune.cache import cache_root
from kubetune.devcluster import node
from kubetune.devcluster.binaries import Binaries, ensure_binaries
from kubetune.devcluster.images import Image, pause_image
from kubetune.devcluster.pki import CertPair, Pki

SERVICE_CIDR = "10.96.0.0/16"
# Simulated pods get loopback addresses: whatever connects to a pod IP (the operator's smoke
# test) stays on this machine, and finds nothing listening.
POD_CIDR = "127.244.0.0/16"
STAGES_FILE = Path(__file__).with_name("stages") / "kwok-stages.yaml"

# Pod outcomes on demand: annotate a pod and kwok finishes it (see stages/kwok-stages.yaml).
OUTCOME_ANNOTATION = "devcluster.kubetune.io/outcome"
EXIT_CODE_ANNOTATION = "devcluster.kubetune.io/exit-code"
TERMINATION_MESSAGE_ANNOTATION = "devcluster.kubetune.io/termination-message"


@dataclass(frozen=True)
class NodeSpec:
    """A simulated node."""

    name: str
    gpus: int = 0
    cpu: str = "32"
    memory: str = "256Gi"
    labels: dict[str, str] = field(default_factory=dict)


H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
DEFAULT_NODES = (
    *(NodeSpec(f"gpu-node-{i}", gpus=8, labels=H100) for i in range(4)),
    NodeSpec("cpu-node-0"),
)


# Requests per second of kube-controller-manager's client (burst twice that). Its default, 20
# (burst 30), is what large clusters raise: each Job takes a pod POST and a status PUT from the
# Job controller (20 Jobs synced at once here), so at 20/s 100 plain Jobs applied at once got
# their last pod after 10.5 s, at 100/s after 1.0 s (bench/bench_scale.py 100, the floor row),
# whoever created the Jobs.
CONTROLLER_QPS = 100


class ClusterError(RuntimeError):
    """The local cluster could not start or a component died; the message carries its log tail."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), None when there is no such process. With
    pid_max at 32768 a long test run reuses pids: a pid with another start time is someone else."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, binary: str, started: int | None = None) -> bool:
    """True when `pid` is this component. Its start time, when known, tells it from a recycled
    pid (such as another cluster's kube-apiserver); only states written without one fall back to
    the command line. Not the command line first: for a moment after Popen returns, the kernel
    has not yet filled in the new program's /proc/<pid>/cmdline (the vfork parent resumes in
    the middle of exec), and on a loaded machine reading it then gives b"" nearly every time,
    which made a just-started kube-apiserver look dead ("exited", with an empty log)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if stat[0] == "Z":
            return False
        if started is not None:
            return int(stat[19]) == started
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return binary.encode() in cmdline


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ComponentState:
    name: str
    pid: int
    binary: str
    log: str
    started: int | None = None  # _start_ticks at spawn (states written before it have none)

    def alive(self) -> bool:
        return _alive(self.pid, self.binary, self.started)


class LocalCluster:
    """One local cluster, addressed by name. All methods are safe to call repeatedly."""

    def __init__(
        self,
        name: str = "kubetune",
        nodes: tuple[NodeSpec, ...] = DEFAULT_NODES,
        real_node: bool = False,
        controller_qps: int = CONTROLLER_QPS,
    ) -> None:
        self.name = name
        self.nodes = nodes
        self.real_node = real_node
        self.controller_qps = controller_qps
        self.dir = cache_root() / "clusters" / name
        self.state_file = self.dir / "state.json"
        self.kubeconfig = self.dir / "kubeconfig"
        self.logs = self.dir / "logs"
        # The processes this object started (how one that died ended: exit code or signal).
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- state ------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state

    def components(self) -> list[ComponentState]:
        state = self._state() or {}
        return [ComponentState(**c) for c in state.get("components", [])]

    def dead_components(self) -> list[ComponentState]:
        return [c for c in self.components() if not c.alive()]

    def is_running(self) -> bool:
        comps = self.components()
        return bool(comps) and not self.dead_components() and self._ready()

    @property
    def server(self) -> str | None:
        state = self._state()
        return None if state is None else str(state["server"])

    def status(self) -> dict[str, Any]:
        comps = self.components()
        return {
            "name": self.name,
            "server": self.server,
            "kubeconfig": str(self.kubeconfig) if self.kubeconfig.exists() else None,
            "ready": bool(comps) and self._ready(),
            "components": {
                c.name: {
                    "pid": c.pid,
                    "alive": c.alive(),
                    "log": c.log,
                    **({} if c.alive() else {"logTail": _tail(Path(c.log))}),
                }
                for c in comps
            },
        }

    # -- lifecycle --------------------------------------------------------------------------

    def up(self, timeout: float = 120.0) -> bool:
        """Start the cluster, or detect the one already running; True when it started one."""
        if self.components():
            if self.is_running():
                return False
            dead = self.dead_components()
            detail = "; ".join(f"{c.name} died:\n{_tail(Path(c.log))}" for c in dead)
            # A half-dead cluster from an earlier run is cleaned and started again.
            self.down()
            if detail:
                import sys

                print(f"kubetune: restarting a broken cluster ({detail})", file=sys.stderr)
        bins = ensure_binaries()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        try:
            self._start(bins, timeout)
        except BaseException:
            self.down()
            raise
        return True

    def down(self) -> None:
        """Stop every component and remove the cluster's folder. Leaves no process or port."""
        # One at a time, the last started first: each stops while what it talks to still
        # answers. Signalled all at once, etcd was gone in a moment and kube-apiserver, its
        # store gone, was still there 20 s later (SIGKILLed at 15 s: every test module's own
        # cluster took 15 s to stop); in this order the five stop in about 1.2 s.
        for comp in reversed(self.components()):
            if comp.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(comp.pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while comp.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if comp.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(comp.pid, signal.SIGKILL)
            # Reap our own children (when this process started them) so no zombie is left.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(comp.pid, 0)
        # The real node's processes, cgroups, bridge and routes (named after the cluster, so
        # this also cleans up after a run that died before it wrote its state).
        node.teardown(self.name, self.dir / "node")
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- internals --------------------------------------------------------------------------

    def _start(self, bins: Binaries, timeout: float) -> None:
        pki = Pki(self.dir / "pki")
        pki.ensure([])
        # With a real node the API server listens on the node's address (pods reach it there);
        # a control plane alone stays on loopback.
        host, service_cidr, service_ip = "127.0.0.1", SERVICE_CIDR, "10.96.0.1"
        net: node.NodeNetwork | None = None
        if self.real_node:
            net = self._claim_node_network()
            host, service_cidr, service_ip = (
                net.node_ip,
                net.service_cidr,
                net.kubernetes_service_ip,
            )
        serving = pki.issue(
            "apiserver",
            "kube-apiserver",
            sans=[
                "127.0.0.1",
                "localhost",
                host,
                service_ip,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            server=True,
        )
        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        server = f"https://{host}:{api_port}"
        self.state_file.write_text(json.dumps({"server": server, "components": []}))

        def kubeconfig(user: str, pair: CertPair, path: Path) -> Path:
            path.write_text(yaml.safe_dump(_kubeconfig(self.name, server, pki.ca.cert, user, pair)))
            path.chmod(0o600)
            return path

        admin = pki.issue("admin", "kubetune-admin", organization="system:masters")
        kubelet_client = pki.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"
        )
        kubeconfig("admin", admin, self.kubeconfig)
        # The aggregation layer (custom.metrics.k8s.io from prometheus-adapter, metrics-server):
        # the API server proxies to an extension API server with this client certificate and
        # the user in X-Remote-* headers, which the extension trusts from this CN and CA alone.
        front_proxy = pki.issue("front-proxy-client", "front-proxy-client")
        cm_kc = kubeconfig(
            "kube-controller-manager",
            pki.issue("controller-manager", "system:kube-controller-manager"),
            self.dir / "controller-manager.kubeconfig",
        )
        sched_kc = kubeconfig(
            "kube-scheduler",
            pki.issue("scheduler", "system:kube-scheduler"),
            self.dir / "scheduler.kubeconfig",
        )
        kwok_kc = kubeconfig(
            "kwok",
            pki.issue("kwok", "kwok-controller", organization="system:masters"),
            self.dir / "kwok.kubeconfig",
        )

        def spawn(name: str, args: list[str]) -> None:
            binary = str(bins.path(name))
            self.add_component(name, [binary, *args], marker=binary)

        spawn(
            "etcd",
            [
                "--name=kubetune",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=kubetune=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={host}",
                f"--advertise-address={host}",
                f"--secure-port={api_port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={service_cidr}",
                # The API server reaches kubelets (logs, exec, port-forward) by address: the
                # node's name resolves nowhere.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                "--authorization-mode=Node,RBAC",
                f"--requestheader-client-ca-file={pki.ca.cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}",
                f"--proxy-client-key-file={front_proxy.key}",
                "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait_ready(server, pki, admin, timeout)
        spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={cm_kc}",
                f"--authentication-kubeconfig={cm_kc}",
                f"--authorization-kubeconfig={cm_kc}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca.cert}",
                f"--cluster-signing-cert-file={pki.ca.cert}",
                f"--cluster-signing-key-file={pki.ca.key}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={_free_port()}",
                "--horizontal-pod-autoscaler-sync-period=5s",
                f"--kube-api-qps={self.controller_qps}",
                f"--kube-api-burst={self.controller_qps * 2}",
                "--concurrent-job-syncs=20",
                "--profiling=false",
                "--v=1",
            ],
        )
        spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={sched_kc}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={_free_port()}",
                "--profiling=false",
                "--v=1",
            ],
        )
        spawn(
            "kwok",
            [
                f"--kubeconfig={kwok_kc}",
                f"--config={STAGES_FILE}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-lease-duration-seconds=40",
                f"--cidr={POD_CIDR}",
                "--node-ip=127.0.0.1",
                f"--server-address=127.0.0.1:{_free_port()}",
                "--v=INFO",
            ],
        )
        if net is not None:
            node.add_kubernetes_service(self.name, net, api_port)
        self._create_nodes(timeout)
        if net is not None:
            self._start_real_node(bins, pki, net, server, timeout)

    def add_component(
        self, name: str, argv: list[str], marker: str, env: dict[str, str] | None = None
    ) -> None:
        """Start a process that belongs to this cluster: `down` stops it, `status` reports it.
        `marker` is a string of its command line that tells it from a recycled pid."""
        log = self.logs / f"{name}.log"
        pid = self._spawn(argv, log, env)
        state = self._state() or {}
        state.setdefault("components", []).append(
            {
                "name": name,
                "pid": pid,
                "binary": marker,
                "log": str(log),
                "started": _start_ticks(pid),
            }
        )
        # How to start it again (restart_component); the environment is only named when it
        # is not this process's, and then it is not kept (it may hold anything).
        state.setdefault("argv", {})[name] = argv if env is None else None
        self.state_file.write_text(json.dumps(state, indent=2))

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str] | None) -> int:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.dir,
                env=env,
            )
        self._procs[proc.pid] = proc
        return proc.pid

    # -- faults on demand (the tests' chaos) -------------------------------------------------

    def _component(self, name: str) -> ComponentState:
        for comp in self.components():
            if comp.name == name:
                return comp
        raise ClusterError(f"cluster {self.name!r} has no component {name!r}")

    def freeze_component(self, name: str) -> None:
        """SIGSTOP the component's process group: its sockets stay open and say nothing, as a
        hung server's do (clients' watches go silent rather than closed)."""
        os.killpg(self._component(name).pid, signal.SIGSTOP)

    def thaw_component(self, name: str) -> None:
        os.killpg(self._component(name).pid, signal.SIGCONT)

    def restart_component(self, name: str, timeout: float = 60.0) -> int:
        """Stop a control-plane component (SIGKILL: a crash, not a graceful drain; a frozen one
        is killed too) and start it again with the same arguments, ports and data; returns the
        new pid once it is up (for the API server: ready)."""
        comp = self._component(name)
        argv = ((self._state() or {}).get("argv") or {}).get(name)
        if not argv:
            raise ClusterError(f"{name} cannot be restarted: its command line was not kept")
        if comp.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(comp.pid, signal.SIGKILL)
                os.killpg(comp.pid, signal.SIGCONT)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(comp.pid, 0)
        deadline = time.monotonic() + timeout
        while comp.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = self._spawn(argv, Path(comp.log), None)
        state = self._state() or {}
        for item in state.get("components", []):
            if item["name"] == name:
                item["pid"], item["started"] = pid, _start_ticks(pid)
        self.state_file.write_text(json.dumps(state, indent=2))
        if name == "kube-apiserver":
            self._wait_until(self._ready, "kube-apiserver to be ready again", timeout)
        return pid

    def python_env(self) -> dict[str, str]:
        """The environment for kubetune's own processes: this package first on PYTHONPATH."""
        source_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path, "KUBECONFIG": str(self.kubeconfig)}

    def _claim_node_network(self) -> node.NodeNetwork:
        folder = self.dir / "node"
        folder.mkdir(parents=True, exist_ok=True)
        node.create_cgroups(self.name)
        net = node.claim_network(self.name)
        node.save_state(folder / "network.json", net)
        node.create_bridge(net)
        return net

    def _start_real_node(
        self, bins: Binaries, pki: Pki, net: node.NodeNetwork, server: str, timeout: float
    ) -> None:
        """containerd and the kubelet in the node's mount namespace and cgroups (node.py)."""
        paths = node.NodePaths(self.dir / "node")
        pause = pause_image()
        client_pair = pki.issue("kubelet", f"system:node:{node.NODE_NAME}", "system:nodes")
        kubelet_kc = self.dir / "kubelet.kubeconfig"
        kubelet_kc.write_text(
            yaml.safe_dump(_kubeconfig(self.name, server, pki.ca.cert, "kubelet", client_pair))
        )
        kubelet_kc.chmod(0o600)
        serving = pki.issue(
            "kubelet-serving", node.NODE_NAME, sans=[net.node_ip, node.NODE_NAME], server=True
        )
        self._start_coredns(bins, pki, net, server, timeout)
        settings = node.kubelet_config(
            net,
            paths,
            self.name,
            pki.ca.cert,
            (serving.cert, serving.key),
            _free_port(),
            [net.node_ip],
        )
        config = node.write_files(net, paths, self.name, pause.ref, settings)

        holder = node.holder_marker(self.name)
        self.add_component(
            "node-namespace",
            node.join_cgroups_argv(self.name, node.namespace_holder_argv(paths, holder)),
            marker=holder,
        )
        holder_pid = next(c.pid for c in self.components() if c.name == "node-namespace")
        self._wait_until(
            lambda: node.namespace_ready(holder_pid, holder), "the node's mount namespace", timeout
        )

        def in_node(name: str, argv: list[str], marker: str) -> None:
            wrapped = node.join_cgroups_argv(self.name, node.in_namespace(holder_pid, argv))
            self.add_component(name, wrapped, marker=marker)

        in_node(
            "containerd",
            ["containerd", f"--config={paths.containerd_config}"],
            str(paths.containerd_config),
        )
        self._wait_until(paths.containerd_socket.exists, "containerd's socket", timeout)
        node.import_image(paths, holder_pid, pause.archive)
        kubelet = str(bins.path("kubelet"))
        in_node(
            "kubelet",
            [
                kubelet,
                f"--config={config}",
                f"--kubeconfig={kubelet_kc}",
                f"--root-dir={paths.kubelet_root}",
                f"--cert-dir={paths.kubelet_root / 'pki'}",
                f"--hostname-override={node.NODE_NAME}",
                f"--node-ip={net.node_ip}",
                f"--node-labels={node.NODE_LABEL}=true",
                "--v=1",
            ],
            kubelet,
        )
        from kubernetes import client
        from kubernetes import config as kube_config

        api: Any = client.CoreV1Api(kube_config.new_client_from_config(str(self.kubeconfig)))

        def ready() -> bool:
            try:
                item = api.read_node(node.NODE_NAME)
            except Exception:
                return False
            return any(
                c.type == "Ready" and c.status == "True" for c in item.status.conditions or []
            )

        self._wait_until(ready, f"the real node {node.NODE_NAME} to be Ready", timeout)
        self._start_provisioner()
        # One nvidia.com/gpu advertised for scheduling, as an extended resource is advertised by
        # hand (a status patch the kubelet keeps): GPU pods land here and run on the CPU.
        api.patch_node_status(
            node.NODE_NAME, {"status": {"capacity": {node.GPU_RESOURCE: str(node.NODE_GPUS)}}}
        )
        self._wait_until(
            lambda: (
                api.read_node(node.NODE_NAME).status.allocatable.get(node.GPU_RESOURCE)
                == str(node.NODE_GPUS)
            ),
            "the node to advertise its GPU",
            timeout,
        )

    def _start_provisioner(self) -> None:
        """The default StorageClass `local` and its provisioner (devcluster/provisioner.py)."""
        import sys

        marker = "kubetune.devcluster.provisioner"
        argv = [sys.executable, "-m", marker, f"--kubeconfig={self.kubeconfig}"]
        argv.append(f"--root={self.dir / 'volumes' / 'provisioned'}")
        self.add_component("provisioner", argv, marker=marker, env=self.python_env())

    def _start_coredns(
        self, bins: Binaries, pki: Pki, net: node.NodeNetwork, server: str, timeout: float
    ) -> None:
        """CoreDNS (built from its Go module) on the node's address, as the pods' DNS server."""
        from kubernetes import config as kube_config
        from kubernetes import utils

        admin = kube_config.new_client_from_config(str(self.kubeconfig))
        utils.create_from_yaml(admin, yaml_objects=node.COREDNS_RBAC)
        pair = pki.issue("coredns", node.COREDNS_USER)
        kc = self.dir / "coredns.kubeconfig"
        kc.write_text(yaml.safe_dump(_kubeconfig(self.name, server, pki.ca.cert, "coredns", pair)))
        kc.chmod(0o600)
        ready_port = _free_port()
        corefile = self.dir / "node" / "Corefile"
        corefile.write_text(node.corefile(net, kc, ready_port))
        binary = str(bins.path("coredns"))
        self.add_component(
            "coredns",
            node.join_cgroups_argv(self.name, [binary, "-conf", str(corefile)]),
            marker=binary,
        )

        def ready() -> bool:
            try:
                url = f"http://{net.node_ip}:{ready_port}/ready"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        self._wait_until(ready, "CoreDNS to be ready", timeout)

    def kubectl(self, *args: str) -> str:
        """`kubectl ARGS` against this cluster; its output (an error names the command)."""
        from kubetune.devcluster.binaries import kubectl_path

        done = subprocess.run(
            [str(kubectl_path()), f"--kubeconfig={self.kubeconfig}", *args],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    @contextlib.contextmanager
    def port_forward(self, target: str, port: int, namespace: str = "default") -> Iterator[int]:
        """`kubectl port-forward TARGET LOCAL:PORT` (the real node's kubelet serves it) for the
        block; yields LOCAL, a free port of this machine's loopback, once kubectl listens."""
        from kubetune.devcluster.binaries import kubectl_path

        local = _free_port()
        forward = subprocess.Popen(
            [
                str(kubectl_path()),
                f"--kubeconfig={self.kubeconfig}",
                f"--namespace={namespace}",
                "port-forward",
                target,
                f"{local}:{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert forward.stdout is not None
            line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:LOCAL -> PORT"
            if "Forwarding from" not in line:
                forward.terminate()
                raise ClusterError(f"kubectl port-forward {target}: {line}{forward.stdout.read()}")
            yield local
        finally:
            forward.terminate()
            forward.wait(timeout=30)

    def load_images(self, *images: Image) -> None:
        """Import built images into the real node's containerd (pods use `imagePullPolicy:
        Never` or `IfNotPresent`: no registry is reachable)."""
        holder = next((c for c in self.components() if c.name == "node-namespace"), None)
        if holder is None:
            raise ClusterError(f"cluster {self.name!r} has no real node to load images into")
        paths = node.NodePaths(self.dir / "node")
        for image in images:
            node.import_image(paths, holder.pid, image.archive)
            if image.published_ref:
                node.tag_image(paths, image.ref, image.published_ref)

    def _wait_until(self, predicate: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_components()
            if predicate():
                return
            time.sleep(0.2)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")

    def _check_components(self) -> None:
        dead = self.dead_components()
        if dead:
            free = shutil.disk_usage(self.dir).free / 2**30
            raise ClusterError(
                "\n".join(
                    f"{c.name} {self._ending(c.pid)} ({free:.1f} GiB free on its disk); "
                    f"last lines of {c.log}:\n{_tail(Path(c.log))}"
                    for c in dead
                )
            )

    def _ending(self, pid: int) -> str:
        """How a process this object started ended ("exited with 2", "was killed by SIGKILL")."""
        proc = self._procs.get(pid)
        code = None if proc is None else proc.poll()
        if code is None:
            return "exited"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with {code}"

    def _ssl_context(self, pki: Pki, client: CertPair) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx

    def _ready(self) -> bool:
        server = self.server
        if server is None:
            return False
        pki = Pki(self.dir / "pki")
        admin = CertPair(pki.dir / "admin.crt", pki.dir / "admin.key")
        try:
            with urllib.request.urlopen(
                f"{server}/readyz", context=self._ssl_context(pki, admin), timeout=2
            ) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def _wait_ready(self, server: str, pki: Pki, admin: CertPair, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_components()
            if self._ready():
                return
            time.sleep(0.2)
        raise ClusterError(f"kube-apiserver at {server} not ready after {timeout:.0f}s")

    def _create_nodes(self, timeout: float) -> None:
        from kubernetes import client, config

        api: Any = client.CoreV1Api(config.new_client_from_config(str(self.kubeconfig)))
        for spec in self.nodes:
            api.create_node(_node_manifest(spec))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_components()
            ready = 0
            for item in api.list_node().items:
                conds = {c.type: c.status for c in (item.status.conditions or [])}
                ready += conds.get("Ready") == "True"
            # The default ServiceAccount must exist before pods can be created in `default`.
            sas = api.list_namespaced_service_account("default").items
            if ready == len(self.nodes) and sas:
                return
            time.sleep(0.2)
        raise ClusterError(f"nodes not Ready after {timeout:.0f}s")


def _kubeconfig(cluster: str, server: str, ca: Path, user: str, pair: CertPair) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": cluster, "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)},
            }
        ],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
    }


def _node_manifest(node: NodeSpec) -> dict[str, Any]:
    capacity = {"cpu": node.cpu, "memory": node.memory, "pods": "110"}
    if node.gpus:
        capacity["nvidia.com/gpu"] = str(node.gpus)
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        **({"nvidia.com/gpu.present": "true"} if node.gpus else {}),
        **node.labels,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


@contextlib.contextmanager
def running_cluster(
    name: str, real_node: bool = False, controller_qps: int = CONTROLLER_QPS
) -> Iterator[LocalCluster]:
    """A cluster for the duration of a `with` block (tests): started fresh, always stopped."""
    cluster = LocalCluster(name, real_node=real_node, controller_qps=controller_qps)
    cluster.down()
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()
