"""The local node: a small kubelet that runs the pods scheduled to it as real processes.

kwok's nodes only pretend; this node really runs containers, without Docker. The image is not
pulled: each container's command runs from this machine's Python environment (the same code the
images carry), inside its own mount namespace (see `podexec`) where the pod's volumes, its service
account token and its /etc/hosts sit where the container expects them. Pods share the machine's
network, so a pod's IP is 127.0.0.1 and the Service DNS names of its peers resolve there.

It does what the operator's pods need: configMap, secret, emptyDir, persistentVolumeClaim (a
hostPath PV) and projected service-account volumes; env with fieldRef, secretKeyRef and
configMapKeyRef and `$(VAR)` expansion; init containers; restart policies; httpGet readiness
probes; preStop sleep; graceful deletion; termination messages. It registers a Node with
`nvidia.com/gpu` capacity for scheduling (the work itself runs on the CPU here) and a taint, so only
pods that tolerate `kubetune.io/local-node` land on it. Requires root (mount namespaces).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("kubetune.localnode")

NODE_LABEL = "kubetune.io/local-node"
HOST_IP = "127.0.0.1"
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# How often a container in CreateContainerConfigError is tried again (the kubelet retries on its
# pod sync, every few seconds at first).
CONFIG_RETRY_SECONDS = 2.0


class ContainerConfigError(Exception):
    """A container's environment cannot be made yet: the kubelet's CreateContainerConfigError."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_manifest(name: str, gpus: int) -> dict[str, Any]:
    # Advertised for scheduling like a kwok node's; the processes share this machine's CPUs.
    capacity = {"cpu": "64", "memory": "256Gi", "pods": "32"}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                NODE_LABEL: "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "spec": {"taints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


@dataclass
class Container:
    name: str
    spec: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    last_state: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )


class PodRunner(threading.Thread):
    """Runs one pod to completion (or until deleted), and keeps its status true."""

    def __init__(self, node: LocalNode, pod: Any) -> None:
        super().__init__(daemon=True, name=f"pod-{pod.metadata.name}")
        self.node = node
        self.core = node.core
        self.pod = pod
        self.raw: dict[str, Any] = node.api.sanitize_for_serialization(pod)
        self.ns = pod.metadata.namespace
        self.name = pod.metadata.name
        self.dir = node.workdir / "pods" / f"{self.ns}_{self.name}_{pod.metadata.uid[:8]}"
        self.stopping = threading.Event()
        self.started = _now()
        spec = self.raw["spec"]
        self.init = [Container(c["name"], c) for c in spec.get("initContainers") or []]
        self.main = [Container(c["name"], c) for c in spec.get("containers") or []]
        self.restart_policy = spec.get("restartPolicy", "Always")
        # Pod readiness gates (as the kubelet): Ready needs each of these conditions True. Others
        # set them (kubetune's operator: its smoke-test gate); the node only reads them.
        self.gates = [g["conditionType"] for g in spec.get("readinessGates") or []]
        self.gate_status: dict[str, str] = {}
        self.gates_changed = threading.Event()

    # -- filesystem ---------------------------------------------------------------------------

    def _volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for vol in self.raw["spec"].get("volumes") or []:
            target = self.dir / "volumes" / vol["name"]
            if "persistentVolumeClaim" in vol:
                claim = self.core.read_namespaced_persistent_volume_claim(
                    vol["persistentVolumeClaim"]["claimName"], self.ns
                )
                pv = self.core.read_persistent_volume(claim.spec.volume_name)
                paths[vol["name"]] = Path(pv.spec.host_path.path)
                continue
            target.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                cm = self.core.read_namespaced_config_map(vol["configMap"]["name"], self.ns)
                self._write_items(target, cm.data or {}, vol["configMap"].get("items"))
            elif "secret" in vol:
                secret = self.core.read_namespaced_secret(vol["secret"]["secretName"], self.ns)
                data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
                self._write_items(target, data, vol["secret"].get("items"))
            elif "projected" in vol:
                self._projected(target, vol["projected"])
            paths[vol["name"]] = target
        return paths

    @staticmethod
    def _write_items(
        target: Path, data: dict[str, str], items: list[dict[str, Any]] | None
    ) -> None:
        chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, path in chosen.items():
            if key in data:
                (target / path).parent.mkdir(parents=True, exist_ok=True)
                (target / path).write_text(data[key])

    def _projected(self, target: Path, projected: dict[str, Any]) -> None:
        for source in projected.get("sources") or []:
            if "serviceAccountToken" in source:
                token = self.core.create_namespaced_service_account_token(
                    self.raw["spec"].get("serviceAccountName") or "default",
                    self.ns,
                    {
                        "spec": {
                            "audiences": None,
                            "expirationSeconds": source["serviceAccountToken"].get(
                                "expirationSeconds", 3607
                            ),
                            "boundObjectRef": {
                                "kind": "Pod",
                                "apiVersion": "v1",
                                "name": self.name,
                                "uid": self.pod.metadata.uid,
                            },
                        }
                    },
                )
                (target / source["serviceAccountToken"]["path"]).write_text(token.status.token)
            elif "configMap" in source:
                cm = self.core.read_namespaced_config_map(source["configMap"]["name"], self.ns)
                self._write_items(target, cm.data or {}, source["configMap"].get("items"))
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    value = self._field(item.get("fieldRef", {}).get("fieldPath", ""))
                    (target / item["path"]).write_text(value)

    def _field(self, path: str) -> str:
        meta = self.raw["metadata"]
        if path == "metadata.name":
            return str(meta["name"])
        if path == "metadata.namespace":
            return str(meta["namespace"])
        if path == "metadata.uid":
            return str(meta["uid"])
        if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        if path in ("status.podIP", "status.hostIP"):
            return HOST_IP
        if path == "spec.nodeName":
            return self.node.name
        if path == "spec.serviceAccountName":
            return str(self.raw["spec"].get("serviceAccountName", "default"))
        return ""

    def _hosts_file(self) -> Path:
        spec, meta = self.raw["spec"], self.raw["metadata"]
        hostname = spec.get("hostname") or meta["name"]
        names = [hostname]
        if sub := spec.get("subdomain"):
            names += [
                f"{hostname}.{sub}.{self.ns}.svc",
                f"{hostname}.{sub}.{self.ns}.svc.cluster.local",
            ]
        for svc in self.core.list_namespaced_service(self.ns).items:
            names += [svc.metadata.name, f"{svc.metadata.name}.{self.ns}.svc"]
        hosts = self.dir / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {' '.join(names)}\n::1 localhost\n")
        return hosts

    # -- processes ----------------------------------------------------------------------------

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "HOSTNAME": self.raw["spec"].get("hostname") or self.name,
            "KUBERNETES_SERVICE_HOST": HOST_IP,
            "KUBERNETES_SERVICE_PORT": str(self.node.api_port),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        for key in ("KUBETUNE_CACHE", "XDG_CACHE_HOME", "LD_LIBRARY_PATH"):
            if key in os.environ:
                env[key] = os.environ[key]
        for source in container.get("envFrom") or []:
            env.update(self._env_from(source))
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = VAR_REF.sub(
                    lambda m: env.get(m.group(1), m.group(0)), item["value"]
                )
                continue
            ref = item.get("valueFrom") or {}
            if "secretKeyRef" in ref:
                value = self._secret_key(ref["secretKeyRef"])
                if value is not None:
                    env[item["name"]] = value
                continue
            with contextlib.suppress(ApiException, KeyError, TypeError):
                if "fieldRef" in ref:
                    env[item["name"]] = self._field(ref["fieldRef"]["fieldPath"])
                elif "configMapKeyRef" in ref:
                    cm = self.core.read_namespaced_config_map(
                        ref["configMapKeyRef"]["name"], self.ns
                    )
                    env[item["name"]] = cm.data[ref["configMapKeyRef"]["key"]]
        return env

    def _secret_key(self, ref: dict[str, Any]) -> str | None:
        """One key of a Secret, as the kubelet resolves it: a missing Secret or key is
        CreateContainerConfigError (the kubelet's own messages) unless the ref is optional."""
        optional = bool(ref.get("optional"))
        try:
            secret = self.core.read_namespaced_secret(ref["name"], self.ns)
        except ApiException as err:
            if err.status == 404 and not optional:
                raise ContainerConfigError(f'secret "{ref["name"]}" not found') from err
            if err.status == 404:
                return None
            raise ContainerConfigError(f"reading secret {ref['name']!r}: {err.reason}") from err
        data = secret.data or {}
        if ref["key"] not in data:
            if optional:
                return None
            raise ContainerConfigError(
                f"couldn't find key {ref['key']} in Secret {self.ns}/{ref['name']}"
            )
        return base64.b64decode(data[ref["key"]]).decode()

    def _env_from(self, source: dict[str, Any]) -> dict[str, str]:
        """envFrom as the kubelet does it: every key, under the prefix; a missing Secret or
        ConfigMap that is not optional is the kubelet's CreateContainerConfigError."""
        prefix = source.get("prefix", "")
        kind, ref = ("secret", source["secretRef"]) if "secretRef" in source else ("configmap", {})
        ref = ref or source.get("configMapRef") or {}
        try:
            if kind == "secret":
                obj = self.core.read_namespaced_secret(ref["name"], self.ns)
                data = {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
            else:
                data = dict(self.core.read_namespaced_config_map(ref["name"], self.ns).data or {})
        except ApiException as err:
            if err.status == 404 and ref.get("optional"):
                return {}
            if err.status == 404:
                raise ContainerConfigError(f'{kind} "{ref["name"]}" not found') from err
            raise
        return {f"{prefix}{key}": value for key, value in data.items()}

    def _argv(self, container: dict[str, Any], env: dict[str, str]) -> list[str]:
        def expand(value: str) -> str:
            return VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)

        argv = [expand(a) for a in (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            raise RuntimeError(f"container {container['name']} has no command (images are not run)")
        return self.node.resolve_command(argv)

    def _spawn(self, item: Container, volumes: dict[str, Path], hosts: Path) -> None:
        """Start the container; while its configuration cannot be made (a missing Secret), it
        waits in CreateContainerConfigError, and is tried again as the kubelet does."""
        while True:
            try:
                env = self._env(item.spec)
                break
            except ContainerConfigError as err:
                waiting = {"reason": "CreateContainerConfigError", "message": str(err)}
                if item.state.get("waiting") != waiting:
                    item.state = {"waiting": waiting}
                    self._report("Pending", item in self.main)
                if self.stopping.wait(CONFIG_RETRY_SECONDS):
                    return
        self._start(item, env, volumes, hosts)

    def _start(
        self, item: Container, env: dict[str, str], volumes: dict[str, Path], hosts: Path
    ) -> None:
        spec = item.spec
        term = self.dir / "termination" / item.name
        term.parent.mkdir(parents=True, exist_ok=True)
        term.write_text("")
        mounts = [
            {"source": str(hosts), "target": "/etc/hosts"},
            {
                "source": str(term),
                "target": spec.get("terminationMessagePath", "/dev/termination-log"),
            },
        ]
        for mount in spec.get("volumeMounts") or []:
            source = volumes[mount["name"]]
            if sub := mount.get("subPath"):
                source = source / sub
            mounts.append(
                {
                    "source": str(source),
                    "target": mount["mountPath"],
                    "readOnly": mount.get("readOnly", False),
                }
            )
        exec_spec = {
            "mounts": mounts,
            "env": env,
            "argv": self._argv(spec, env),
            "workingDir": spec.get("workingDir"),
        }
        spec_file = self.dir / "exec" / f"{item.name}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(exec_spec))
        logfile = self.dir / "logs" / f"{item.name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("ab") as out:
            item.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    sys.executable,
                    "-m",
                    "kubetune.devcluster.podexec",
                    str(spec_file),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            )
        with (self.node.workdir / "pids").open("a") as pids:
            started = Path(f"/proc/{item.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
            pids.write(
                f"{item.proc.pid} {started}\n"
            )  # `cluster down` stops these even if this node dies
        if "terminated" in item.state:
            item.last_state = item.state
        item.state = {"running": {"startedAt": _now()}}
        item.ready = "readinessProbe" not in spec

    def _finished(self, item: Container) -> dict[str, Any]:
        assert item.proc is not None
        code = item.proc.returncode
        message = (self.dir / "termination" / item.name).read_text(errors="replace").strip()
        if (
            not message
            and code
            and item.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            lines = (
                (self.dir / "logs" / f"{item.name}.log").read_text(errors="replace").splitlines()
            )
            message = "\n".join(lines[-20:])
        return {
            "terminated": {
                "exitCode": code if code >= 0 else 128 - code,
                "reason": "Completed" if code == 0 else "Error",
                "message": message[-4096:],
                "startedAt": item.state.get("running", {}).get("startedAt", self.started),
                "finishedAt": _now(),
            }
        }

    def _stop(self, item: Container, grace: float) -> None:
        if item.proc is None or item.proc.poll() is not None:
            return
        pre_stop = ((item.spec.get("lifecycle") or {}).get("preStop") or {}).get("sleep")
        if pre_stop:
            time.sleep(min(float(pre_stop.get("seconds", 0)), grace))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(item.proc.pid, signal.SIGTERM)
        try:
            item.proc.wait(max(grace, 1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(item.proc.pid, signal.SIGKILL)
            item.proc.wait()

    # -- status -------------------------------------------------------------------------------

    def observe(self, pod: Any) -> None:
        """A newer version of the pod: note its readiness-gate conditions."""
        found = {c.type: c.status for c in pod.status.conditions or [] if c.type in self.gates}
        if found != self.gate_status:
            self.gate_status = found
            self.gates_changed.set()

    def _status(self, phase: str, initialized: bool) -> dict[str, Any]:
        containers = phase == "Running" and all(c.ready for c in self.main)
        gated = all(self.gate_status.get(g) == "True" for g in self.gates)
        ready = containers and gated

        def cond(type_: str, ok: bool) -> dict[str, Any]:
            return {
                "type": type_,
                "status": "True" if ok else "False",
                "lastTransitionTime": _now(),
            }

        def statuses(items: list[Container]) -> list[dict[str, Any]]:
            return [
                {
                    "name": c.name,
                    "image": c.spec.get("image", ""),
                    "imageID": "",
                    "ready": c.ready,
                    "restartCount": c.restarts,
                    "state": c.state,
                    "lastState": c.last_state,
                    "started": "running" in c.state,
                }
                for c in items
            ]

        return {
            "phase": phase,
            "hostIP": HOST_IP,
            "podIP": HOST_IP,
            "podIPs": [{"ip": HOST_IP}],
            "startTime": self.started,
            "conditions": [
                cond("PodScheduled", True),
                cond("Initialized", initialized),
                cond("ContainersReady", containers),
                cond("Ready", ready),
            ],
            "initContainerStatuses": statuses(self.init),
            "containerStatuses": statuses(self.main),
        }

    def _report(self, phase: str, initialized: bool) -> None:
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(
                self.name, self.ns, {"status": self._status(phase, initialized)}
            )

    def _probe(self, item: Container) -> bool:
        probe = (item.spec.get("readinessProbe") or {}).get("httpGet")
        if not probe:
            return True
        port = probe["port"]
        if isinstance(port, str):
            port = next(
                p["containerPort"] for p in item.spec.get("ports", []) if p.get("name") == port
            )
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}{probe.get('path', '/')}", timeout=2
            ) as r:
                return bool(200 <= r.status < 400)
        except OSError:
            return False

    # -- the pod's life -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:
            log.exception("pod %s/%s failed to run", self.ns, self.name)
            for item in self.main:
                item.state = {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "message": str(err)[-2000:],
                    }
                }
            self._report("Failed", False)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        volumes = self._volumes()
        hosts = self._hosts_file()
        self._report("Pending", not self.init)
        for item in self.init:
            while True:
                self._spawn(item, volumes, hosts)
                if self.stopping.is_set():
                    return  # deleted while it waited for its configuration
                self._report("Pending", False)
                assert item.proc is not None
                while item.proc.poll() is None:
                    if self.stopping.wait(0.5):
                        self._stop(item, 5)
                        return
                item.state = self._finished(item)
                if item.proc.returncode == 0:
                    break
                if self.restart_policy == "Never":
                    self._report("Failed", False)
                    return
                item.restarts += 1
                self._report("Pending", False)
                if self.stopping.wait(min(10 * item.restarts, 60)):
                    return
        for item in self.main:
            self._spawn(item, volumes, hosts)
            if self.stopping.is_set():
                return
        self._report("Running", True)
        self._supervise(volumes, hosts)

    def _supervise(self, volumes: dict[str, Path], hosts: Path) -> None:
        while not self.stopping.wait(1.0):
            changed = False
            for item in self.main:
                assert item.proc is not None
                if item.proc.poll() is None:
                    ready = self._probe(item) if "readinessProbe" in item.spec else True
                    changed |= ready != item.ready
                    item.ready = ready
                    continue
                if "terminated" in item.state:
                    continue
                item.state, item.ready, changed = self._finished(item), False, True
                code = item.proc.returncode
                if self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code):
                    item.restarts += 1
                    self._report("Running", True)
                    time.sleep(min(5 * item.restarts, 30))
                    self._spawn(item, volumes, hosts)
                    if self.stopping.is_set():
                        return
            done = [c for c in self.main if "terminated" in c.state]
            if len(done) == len(self.main) and self.restart_policy != "Always":
                failed = any(c.state["terminated"]["exitCode"] for c in done)
                self._report("Failed" if failed else "Succeeded", True)
                return
            if self.gates_changed.is_set():
                self.gates_changed.clear()
                changed = True
            if changed:
                self._report("Running", True)

    def stop(self, grace: float) -> None:
        self.stopping.set()
        for item in [*self.init, *self.main]:
            self._stop(item, grace)


class LocalNode:
    """Registers the node, keeps it Ready, and runs the pods bound to it."""

    def __init__(
        self, api: client.ApiClient, name: str, workdir: Path, api_port: int, gpus: int = 1
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.name = name
        self.workdir = workdir
        self.api_port = api_port
        self.gpus = gpus
        self.pods: dict[str, PodRunner] = {}
        self.deleting: set[str] = set()
        self._stop = threading.Event()

    def resolve_command(self, argv: list[str]) -> list[str]:
        """Map an image's command to this machine: the venv's tools, Triton's local launcher."""
        if argv[0] == "tritonserver":
            return [sys.executable, "-m", "kubetune.devcluster.tritonexec", *argv[1:]]
        if argv[0] in ("python", "python3"):
            return [sys.executable, *argv[1:]]
        found = shutil.which(argv[0], path=str(Path(sys.executable).parent))
        return [found or argv[0], *argv[1:]]

    def register(self) -> None:
        body = node_manifest(self.name, self.gpus)
        try:
            self.core.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
        self._heartbeat()

    def _heartbeat(self) -> None:
        now = _now()
        conditions = [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubetune local node",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            },
            *[
                {
                    "type": t,
                    "status": "False",
                    "reason": "KubeletHasNo" + t,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
            ],
        ]
        capacity = node_manifest(self.name, self.gpus)["status"]["capacity"]
        self.core.patch_node_status(
            self.name,
            {
                "status": {
                    "conditions": conditions,
                    "capacity": capacity,
                    "allocatable": capacity,
                    "addresses": [
                        {"type": "InternalIP", "address": HOST_IP},
                        {"type": "Hostname", "address": self.name},
                    ],
                    "nodeInfo": {
                        "kubeletVersion": "kubetune-local",
                        "containerRuntimeVersion": "kubetune://local",
                        "osImage": "local",
                        "kernelVersion": os.uname().release,
                        "operatingSystem": "linux",
                        "architecture": "amd64",
                        "machineID": "",
                        "systemUUID": "",
                        "bootID": "",
                        "kubeProxyVersion": "",
                    },
                }
            },
        )
        lease: dict[str, Any] = {
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.name,
                "leaseDurationSeconds": 40,
                "renewTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            self.coord.replace_namespaced_lease(
                self.name,
                "kube-node-lease",
                {
                    **lease,
                    "metadata": {
                        **lease["metadata"],
                        "resourceVersion": self.coord.read_namespaced_lease(
                            self.name, "kube-node-lease"
                        ).metadata.resource_version,
                    },
                },
            )
        except ApiException as err:
            if err.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", lease)

    def _heartbeats(self) -> None:
        while not self._stop.wait(10):
            with contextlib.suppress(Exception):
                self._heartbeat()

    def handle(self, pod: Any) -> None:
        uid = pod.metadata.uid
        if pod.metadata.deletion_timestamp is not None:
            if uid in self.deleting:
                return  # already stopping: later events of the terminating pod change nothing
            self.deleting.add(uid)
            runner = self.pods.pop(uid, None)
            log.info("deleting pod %s/%s", pod.metadata.namespace, pod.metadata.name)
            grace = float(pod.metadata.deletion_grace_period_seconds or 30)
            threading.Thread(target=self._delete, args=(pod, runner, grace), daemon=True).start()
            return
        if uid in self.pods:
            self.pods[uid].observe(pod)
            return
        if pod.status.phase in (None, "Pending"):
            log.info("starting pod %s/%s", pod.metadata.namespace, pod.metadata.name)
            runner = PodRunner(self, pod)
            self.pods[uid] = runner
            runner.start()

    def _delete(self, pod: Any, runner: PodRunner | None, grace: float) -> None:
        if runner is not None:
            runner.stop(grace)
        log.info("pod %s/%s stopped", pod.metadata.namespace, pod.metadata.name)
        try:
            self.core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                # With a body, the API server reads the options from it, not from the query.
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": pod.metadata.uid}},
            )
        except ApiException as err:
            if err.status != 404:
                log.warning("could not delete pod %s: %s", pod.metadata.name, err.reason)

    def run(self) -> None:
        self.register()
        threading.Thread(target=self._heartbeats, daemon=True).start()
        selector = f"spec.nodeName={self.name}"
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    timeout_seconds=60,
                ):
                    self.handle(event["object"])
            except ApiException as err:
                log.warning("watch failed: %s", err)
                time.sleep(1)

    def shutdown(self) -> None:
        self._stop.set()
        for runner in list(self.pods.values()):
            runner.stop(5)


def main() -> None:
    import argparse

    from kubernetes import config

    parser = argparse.ArgumentParser(description="run the kubetune local node")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--name", default="local-node-0")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--gpus", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = config.new_client_from_config(args.kubeconfig)
    port = int(api.configuration.host.rsplit(":", 1)[1])
    node = LocalNode(api, args.name, args.workdir, port, args.gpus)

    def stop(*_: Any) -> None:
        node.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    node.run()


if __name__ == "__main__":
    main()
