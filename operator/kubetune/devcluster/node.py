"""A real node for the local cluster: the real kubelet, containerd and runc, CNI bridge networking.

What it changes on the machine, all of it named after the cluster and undone by `teardown`:

- **network**: a block `10.K.0.0/16` of the cluster's own (K picked free, claimed by adding its
  blackhole route, which fails when another cluster holds it), a bridge `kt-<name>` whose address
  `10.K.0.1` is the node's InternalIP and the pods' gateway; pods get `10.K.0.0/24` from CNI's
  host-local IPAM and a route to that range only; Services get `10.K.128.0/20`. The blackhole route
  drops anything sent into the block that no pod answers: no packet leaves the machine. No
  masquerading, no host-wide sysctl (IP forwarding stays off).
- **cgroups**: `/kubetune-<name>` in every cgroup v1 hierarchy. containerd, its shims and the
  kubelet run in `/kubetune-<name>/node`, pods under `/kubetune-<name>` (the kubelet's
  cgroupRoot), so killing what is in that tree leaves no process behind.
- **mounts**: containerd and the kubelet share one private mount namespace (held by a small
  `unshare` process). Every mount they make (container root file systems, secret volumes,
  network namespaces, which containerd keeps under its state folder) lives and dies with it.
  Inside it, tmpfs on /var/lib and /var/log catch the paths the kubelet and CNI hard-code
  (/var/lib/kubelet/device-plugins, /var/lib/cni, /var/log/containers), and the six kernel
  tunables the kubelet insists on (vm.overcommit_memory and friends) are bind-mounted files with
  the values it expects, so it neither changes the machine's nor refuses to start
  (`protectKernelDefaults: true`).

Everything else lives in the cluster's folder: containerd's root and state, runc's state, the
kubelet's root, pod logs, CNI configuration and IPAM state.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

NODE_NAME = "local-node-0"
NODE_LABEL = "kubetune.io/local-node"
LOCAL_NODE_TAINT = {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}
GPU_RESOURCE = "nvidia.com/gpu"
NODE_GPUS = 1
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The values the kubelet requires (pkg/kubelet/cm setupKernelTunables) for these tunables.
KERNEL_TUNABLES = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}


class NodeError(RuntimeError):
    """The real node could not be set up; the message says which step and why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NodeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def bridge_name(cluster: str) -> str:
    """`kt-<name>`, shortened with a hash to the kernel's 15 characters when needed."""
    name = f"kt-{cluster}"
    if len(name) <= 15:
        return name
    digest = hashlib.sha256(cluster.encode()).hexdigest()[:5]
    return f"kt-{cluster[:6]}-{digest}"


def cgroup_name(cluster: str) -> str:
    return f"kubetune-{cluster}"


@dataclass(frozen=True)
class NodeNetwork:
    """The cluster's own addresses (see the module's docstring)."""

    index: int
    bridge: str

    @property
    def block(self) -> str:
        return f"10.{self.index}.0.0/16"

    @property
    def pod_cidr(self) -> str:
        return f"10.{self.index}.0.0/24"

    @property
    def node_ip(self) -> str:
        return f"10.{self.index}.0.1"

    @property
    def service_cidr(self) -> str:
        return f"10.{self.index}.128.0/20"

    @property
    def kubernetes_service_ip(self) -> str:
        return f"10.{self.index}.128.1"


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for args in (("-j", "route", "show", "table", "all"), ("-j", "addr")):
        for entry in json.loads(_ip(*args).stdout or "[]"):
            candidates = [entry.get("dst")] + [
                f"{a['local']}/{a['prefixlen']}"
                for a in entry.get("addr_info", [])
                if a.get("family") == "inet"
            ]
            for value in candidates:
                with contextlib.suppress(ValueError, TypeError):
                    net = ipaddress.ip_network(value, strict=False)
                    if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
                        used.append(net)
    return used


def claim_network(cluster: str) -> NodeNetwork:
    """A free 10.K.0.0/16 for the cluster, claimed by its blackhole route."""
    start = int(hashlib.sha256(cluster.encode()).hexdigest(), 16) % 100
    for offset in range(100):
        net = NodeNetwork(100 + (start + offset) % 100, bridge_name(cluster))
        block = ipaddress.ip_network(net.block)
        if any(block.overlaps(used) for used in _used_networks()):
            continue
        # Adding the route is the claim: it fails when another cluster added it first.
        if _ip("route", "add", "blackhole", net.block, check=False).returncode == 0:
            return net
    raise NodeError("no free 10.K.0.0/16 block for the node's pods and Services (K in 100-199)")


def create_bridge(net: NodeNetwork) -> None:
    _ip("link", "add", net.bridge, "type", "bridge")
    _ip("addr", "add", f"{net.node_ip}/24", "dev", net.bridge)
    _ip("link", "set", net.bridge, "up")


def release_network(net: NodeNetwork) -> None:
    _ip("link", "del", net.bridge, check=False)
    _ip("route", "del", "blackhole", net.block, check=False)


def nat_chain(cluster: str) -> str:
    """The cluster's own iptables chain (names are at most 28 characters)."""
    name = f"KT-{cluster}"
    return (
        name
        if len(name) <= 28
        else f"KT-{cluster[:16]}-{hashlib.sha256(cluster.encode()).hexdigest()[:8]}"
    )


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["iptables", "-w", "-t", "nat", *args]
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NodeError(f"iptables -t nat {' '.join(args)}: {done.stderr.strip()}")
    return done


def _jump(cluster: str, net: NodeNetwork) -> list[str]:
    return [
        "PREROUTING",
        "-i",
        net.bridge,
        "-m",
        "comment",
        "--comment",
        f"kubetune {cluster}",
        "-j",
        nat_chain(cluster),
    ]


def add_kubernetes_service(cluster: str, net: NodeNetwork, api_port: int) -> None:
    """The `kubernetes` Service for pods: one DNAT rule, in the cluster's own chain, from the
    Service's address to the API server on the node's address. Only packets that came in on
    the cluster's bridge are touched, and they are delivered locally: nothing is forwarded."""
    chain = nat_chain(cluster)
    _iptables("-N", chain)
    _iptables(
        "-A",
        chain,
        "-d",
        f"{net.kubernetes_service_ip}/32",
        "-p",
        "tcp",
        "--dport",
        "443",
        "-j",
        "DNAT",
        "--to-destination",
        f"{net.node_ip}:{api_port}",
    )
    _iptables("-A", *_jump(cluster, net))


def remove_kubernetes_service(cluster: str, net: NodeNetwork) -> None:
    chain = nat_chain(cluster)
    while _iptables("-D", *_jump(cluster, net), check=False).returncode == 0:
        pass
    _iptables("-F", chain, check=False)
    _iptables("-X", chain, check=False)


def _hierarchies() -> list[Path]:
    """Every cgroup v1 (and the hybrid unified) hierarchy mounted under /sys/fs/cgroup."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, *_ = line.split()
        if fstype in {"cgroup", "cgroup2"} and target.startswith(str(CGROUP_ROOT) + "/"):
            found.append(Path(target))
    return found


def create_cgroups(cluster: str) -> None:
    for hierarchy in _hierarchies():
        for sub in (cgroup_name(cluster), f"{cgroup_name(cluster)}/node"):
            path = hierarchy / sub
            path.mkdir(exist_ok=True)
            if (path / "cpuset.cpus").exists():
                # A new cpuset has no CPUs or memory nodes: a task cannot join it before they
                # are copied from its parent.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (path / knob).write_text((path.parent / knob).read_text())


def cgroup_pids(cluster: str) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _hierarchies():
        root = hierarchy / cgroup_name(cluster)
        if root.exists():
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in procs.read_text().split())
    return pids


def kill_cgroups(cluster: str, timeout: float = 15.0) -> None:
    """SIGKILL everything in the cluster's cgroups until they are empty, then remove them."""
    deadline = time.monotonic() + timeout
    while (pids := cgroup_pids(cluster)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for hierarchy in _hierarchies():
        root = hierarchy / cgroup_name(cluster)
        if not root.exists():
            continue
        # Deepest first: a cgroup can only be removed once its children are.
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for path in [*dirs, root]:
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # the kernel frees a cgroup a moment after its last task


def join_cgroups_argv(cluster: str, argv: list[str]) -> list[str]:
    """`argv` run in `/kubetune-<name>/node` of every hierarchy (so `down` finds it)."""
    files = " ".join(
        str(h / cgroup_name(cluster) / "node" / "cgroup.procs") for h in _hierarchies()
    )
    script = f'for f in {files}; do echo $$ > "$f" || exit 1; done; exec "$@"'
    return ["sh", "-c", script, "sh", *argv]


@dataclass
class NodePaths:
    root: Path

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def runc_root(self) -> Path:
        return self.root / "runc"

    @property
    def cni_conf(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def ipam(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def tunables(self) -> Path:
        return self.root / "kernel-tunables"


CONTAINERD_CONFIG = """\
# containerd 1.6 (configuration version 2) for one local node: every path under its folder.
version = 2
root = {root}
state = {state}
# Plugins that would write outside the folder, or are of no use here.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {sandbox_image}
  # Without CAP_SYS_RESOURCE the kubelet's oom_score_adj of -998 for sandboxes is refused and
  # runc fails with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Network namespaces under the state folder, not /var/run/netns.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  tolerate_missing_hugetlb_controller = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin}
    conf_dir = {cni_conf}
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = {runc_root}
"""


def containerd_config(paths: NodePaths, sandbox_image: str) -> str:
    # JSON strings are TOML basic strings for the paths and names used here.
    return CONTAINERD_CONFIG.format(
        root=json.dumps(str(paths.containerd_root)),
        state=json.dumps(str(paths.containerd_state)),
        socket=json.dumps(str(paths.containerd_socket)),
        ttrpc=json.dumps(f"{paths.containerd_socket}.ttrpc"),
        sandbox_image=json.dumps(sandbox_image),
        cni_bin=json.dumps(str(CNI_BIN)),
        cni_conf=json.dumps(str(paths.cni_conf)),
        runc_root=json.dumps(str(paths.runc_root)),
    )


def cni_config(net: NodeNetwork, paths: NodePaths, cluster: str) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": f"kubetune-{cluster}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.ipam),
                    "ranges": [[{"subnet": net.pod_cidr, "gateway": net.node_ip}]],
                    # The cluster's block only (pods and Services): no default route, so
                    # nothing outside the block is reachable from a pod.
                    "routes": [{"dst": net.block, "gw": net.node_ip}],
                },
            },
        ],
    }


def kubelet_config(
    net: NodeNetwork,
    paths: NodePaths,
    cluster: str,
    ca: Path,
    serving: tuple[Path, Path],
    port: int,
    cluster_dns: list[str],
) -> dict[str, Any]:
    resolv = paths.root / "resolv.conf"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This machine: cgroup v1 (refused by default since 1.35, KEP-5573), no systemd.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": True,
        "cgroupRoot": f"/{cgroup_name(cluster)}",
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "protectKernelDefaults": True,
        "makeIPTablesUtilChains": False,
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "address": net.node_ip,
        "port": port,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "tlsCertFile": str(serving[0]),
        "tlsPrivateKeyFile": str(serving[1]),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "clusterDNS": cluster_dns,
        "resolvConf": str(resolv),
        "podLogsDir": str(paths.pod_logs),
        "registerWithTaints": [LOCAL_NODE_TAINT],
        # Images are imported, never pulled: the kubelet must not collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A busy shared disk must not evict the node's pods.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1Mi"},
        "serializeImagePulls": False,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "fileCheckFrequency": "60s",
        "staticPodPath": "",
        "maxPods": 110,
    }


def holder_marker(cluster: str) -> str:
    return f"kubetune-node-namespace-{cluster}"


COREDNS_USER = "kubetune:coredns"
# What CoreDNS's kubernetes plugin reads (upstream's system:coredns ClusterRole).
COREDNS_RBAC: list[dict[str, Any]] = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": COREDNS_USER},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["endpoints", "services", "pods", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": COREDNS_USER},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": COREDNS_USER,
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_USER}
        ],
    },
]


def corefile(net: NodeNetwork, kubeconfig: Path, ready_port: int) -> str:
    """Cluster DNS on the node's address: Services, headless Services' pods and pod names of
    cluster.local. Nothing is forwarded: other names do not resolve (no packet leaves)."""
    return f"""\
.:53 {{
    bind {net.node_ip}
    errors
    ready {net.node_ip}:{ready_port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loadbalance
}}
"""


def namespace_holder_argv(paths: NodePaths, marker: str) -> list[str]:
    """The process that holds the node's private mount namespace (see the module docstring);
    its command line is `marker` once the namespace is set up."""
    mounts = [
        "mount -t tmpfs -o mode=755 kubetune-node /var/lib",
        "mount -t tmpfs -o mode=755 kubetune-node /var/log",
    ]
    for name in KERNEL_TUNABLES:
        mounts.append(f"mount --bind {paths.tunables / name.replace('/', '.')} /proc/sys/{name}")
    script = " && ".join(mounts) + f" && exec -a {marker} sleep infinity"
    return ["unshare", "--mount", "--propagation", "slave", "bash", "-c", script]


def write_tunables(paths: NodePaths) -> None:
    paths.tunables.mkdir(parents=True, exist_ok=True)
    for name, value in KERNEL_TUNABLES.items():
        (paths.tunables / name.replace("/", ".")).write_text(value + "\n")


def namespace_ready(holder_pid: int, marker: str) -> bool:
    """True once the holder is set up: it runs as `marker` (its argv[0] after the last exec) in
    a mount namespace that is not this process's. (The marker is in the wrapper's command line
    too: entering the wrapper's namespace would have put the node's mounts on the host.)"""
    try:
        argv0 = Path(f"/proc/{holder_pid}/cmdline").read_bytes().split(b"\0")[0]
        theirs = os.readlink(f"/proc/{holder_pid}/ns/mnt")
    except OSError:
        return False
    return argv0 == marker.encode() and theirs != os.readlink("/proc/self/ns/mnt")


def unmount_under(folder: Path) -> None:
    """Detach any mount under `folder` that reached this mount namespace (deepest first)."""
    prefix = str(folder).rstrip("/") + "/"
    points = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(prefix)
    ]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def in_namespace(holder_pid: int, argv: list[str]) -> list[str]:
    return ["nsenter", f"--mount=/proc/{holder_pid}/ns/mnt", "--", *argv]


def ctr(paths: NodePaths, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", f"--address={paths.containerd_socket}", "--namespace=k8s.io", *args],
        check=False,
        capture_output=True,
        text=True,
    )


def tag_image(paths: NodePaths, ref: str, alias: str) -> None:
    done = ctr(paths, "images", "tag", "--force", ref, alias)
    if done.returncode != 0:
        raise NodeError(f"tagging {ref} as {alias}: {done.stderr.strip()}")


def import_image(paths: NodePaths, holder_pid: int, archive: Path) -> None:
    """Loads an OCI archive into the node's containerd (inside its mount namespace: the
    snapshotter's mounts must land there). ctr reads it from our open file, under a shared lock:
    a build of another version on this machine (another test run) does not remove an archive
    that is being loaded (images._prune skips locked archives)."""
    try:
        handle = archive.open("rb")
    except FileNotFoundError as err:
        raise NodeError(f"loading {archive.name} into containerd: it is gone ({err})") from err
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        done = subprocess.run(
            in_namespace(
                holder_pid,
                [
                    "ctr",
                    f"--address={paths.containerd_socket}",
                    "--namespace=k8s.io",
                    "images",
                    "import",
                    "-",
                ],
            ),
            stdin=handle,
            check=False,
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise NodeError(f"loading {archive.name} into containerd: {done.stderr.strip()}")


def save_state(path: Path, net: NodeNetwork) -> None:
    path.write_text(json.dumps(asdict(net)))


def load_state(path: Path) -> NodeNetwork | None:
    try:
        return NodeNetwork(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def teardown(cluster: str, folder: Path) -> None:
    """Undo everything the node set up; safe when parts were never made."""
    kill_cgroups(cluster)
    unmount_under(folder)
    net = load_state(folder / "network.json")
    if net is not None:
        remove_kubernetes_service(cluster, net)
        release_network(net)


def write_files(
    net: NodeNetwork, paths: NodePaths, cluster: str, sandbox_image: str, kubelet: dict[str, Any]
) -> Path:
    for folder in (paths.containerd_root, paths.containerd_state, paths.runc_root, paths.ipam):
        folder.mkdir(parents=True, exist_ok=True)
    paths.cni_conf.mkdir(parents=True, exist_ok=True)
    paths.kubelet_root.mkdir(parents=True, exist_ok=True)
    paths.pod_logs.mkdir(parents=True, exist_ok=True)
    paths.containerd_config.write_text(containerd_config(paths, sandbox_image))
    (paths.cni_conf / "10-kubetune.conflist").write_text(
        json.dumps(cni_config(net, paths, cluster), indent=2)
    )
    (paths.root / "resolv.conf").write_text("")
    write_tunables(paths)
    config = paths.root / "kubelet.yaml"
    config.write_text(yaml.safe_dump(kubelet))
    return config
