"""The real node: the real kubelet, containerd and runc run pods from images built with buildah,
each pod in its own network namespace with its own address on the cluster's bridge.

A cluster of this module's own (`LocalCluster(real_node=True)`); the last test starts and stops
another one and checks that `down` leaves nothing on the machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, utils
from kubernetes.client.exceptions import ApiException

from kubetune.api.v1alpha1.finetunejob import FineTuneJob
from kubetune.builders.common import Owner, Settings
from kubetune.builders.training import build_children, build_trainer_identity
from kubetune.devcluster import node
from kubetune.devcluster.cluster import LocalCluster, running_cluster
from kubetune.devcluster.demo import PLACEMENT
from kubetune.devcluster.images import base_image
from tests.real_node import wait_pod_and_container_gone
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]

RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[LocalCluster]:
    with running_cluster(f"rn-{os.getpid()}", real_node=True) as cluster:
        cluster.load_images(base_image())
        yield cluster


@pytest.fixture(scope="module")
def core(real_cluster: LocalCluster) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(str(real_cluster.kubeconfig)))


@pytest.fixture
def ns(core: client.CoreV1Api, request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.node.name[:50].lower().replace("_", "-").strip("-")
    core.create_namespace(
        {"metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    yield name
    core.delete_namespace(name)


def network(cluster: LocalCluster) -> node.NodeNetwork:
    net = node.load_state(cluster.dir / "node" / "network.json")
    assert net is not None
    return net


def pod(name: str, script: str, **extra: Any) -> dict[str, Any]:
    """A pod of the local Debian base image running a Python `script` on the real node, under
    Pod Security "restricted"."""
    return {
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node.NODE_NAME,
            "tolerations": [{**node.LOCAL_NODE_TAINT, "operator": "Equal"}],
            "restartPolicy": "Never",
            "securityContext": RESTRICTED_POD,
            "containers": [
                {
                    "name": "main",
                    "image": base_image().ref,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", textwrap.dedent(script)],
                    "securityContext": RESTRICTED_CONTAINER,
                    **extra,
                }
            ],
        },
    }


def finished(core: client.CoreV1Api, ns: str, name: str) -> Any:
    def done() -> Any:
        item = core.read_namespaced_pod(name, ns)
        return item if item.status.phase in {"Succeeded", "Failed"} else None

    return wait_for(done, timeout=120, what=f"pod {name} to finish")


def test_pod_runs_as_its_user_with_a_read_only_root_and_its_own_address(
    real_cluster: LocalCluster, core: client.CoreV1Api, ns: str
) -> None:
    script = """
        import os, socket
        print(os.getuid())
        try:
            open("/probe", "w")
            print("root-writable")
        except OSError as err:
            print("root-read-only" if err.errno == 30 else err)
        open("/scratch/probe", "w").write("x")
        print("scratch-writable")
        print(socket.gethostbyname(socket.gethostname()))
        for row in open("/proc/net/route").read().splitlines()[1:]:
            iface, dest, gateway, _, _, _, _, mask = row.split()[:8]
            ip = lambda h: socket.inet_ntoa(bytes.fromhex(h)[::-1])
            print(f"{ip(dest)}/{ip(mask)} via {ip(gateway)} dev {iface}")
    """
    manifest = pod("whoami", script, volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}])
    manifest["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    core.create_namespaced_pod(ns, manifest)
    done = finished(core, ns, "whoami")
    logs = real_cluster.kubectl("-n", ns, "logs", "whoami")
    assert done.status.phase == "Succeeded", logs
    lines = logs.splitlines()
    assert lines[:3] == ["1000", "root-read-only", "scratch-writable"]
    net = network(real_cluster)
    pod_ip = ipaddress.ip_address(done.status.pod_ip)
    assert pod_ip in ipaddress.ip_network(net.pod_cidr)
    assert pod_ip != ipaddress.ip_address(net.node_ip)
    assert lines[3] == str(pod_ip)
    # Routes to the cluster's block only (its pods directly, the rest through the node): no
    # default route out of the pod.
    block = ipaddress.ip_network(net.block)
    assert set(lines[4:]) == {
        f"{net.pod_cidr.split('/')[0]}/255.255.255.0 via 0.0.0.0 dev eth0",
        f"{block.network_address}/255.255.0.0 via {net.node_ip} dev eth0",
    }


def test_two_pods_have_their_own_addresses_and_reach_each_other(
    core: client.CoreV1Api, ns: str
) -> None:
    server = pod(
        "server",
        """
        import http.server, os
        os.chdir("/www")
        open("index.html", "w").write("hello-from-server")
        handler = http.server.SimpleHTTPRequestHandler
        http.server.ThreadingHTTPServer(("", 8080), handler).serve_forever()
        """,
        volumeMounts=[{"name": "www", "mountPath": "/www"}],
    )
    server["spec"]["volumes"] = [{"name": "www", "emptyDir": {}}]
    core.create_namespaced_pod(ns, server)
    running = wait_for(
        lambda: (p := core.read_namespaced_pod("server", ns)).status.phase == "Running" and p,
        timeout=120,
        what="the server pod to run",
    )
    server_ip = running.status.pod_ip
    client_script = f"""
        import time, urllib.request
        for attempt in range(50):  # the server may still be starting
            try:
                print(urllib.request.urlopen("http://{server_ip}:8080/", timeout=5).read().decode())
                break
            except OSError:
                time.sleep(0.2)
    """
    core.create_namespaced_pod(ns, pod("client", client_script))
    done = finished(core, ns, "client")
    assert done.status.pod_ip != server_ip
    log = core.read_namespaced_pod_log("client", ns)
    assert done.status.phase == "Succeeded", log
    assert log.strip() == "hello-from-server"


def test_pods_reach_the_api_server_through_the_kubernetes_service(
    real_cluster: LocalCluster, core: client.CoreV1Api, ns: str
) -> None:
    script = """
        import json, os, ssl, urllib.request
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        print(f"{host}:{port}")
        ca = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
        context = ssl.create_default_context(cafile=ca)  # the API server's certificate verifies
        body = urllib.request.urlopen(f"https://{host}:{port}/version", context=context).read()
        print(json.loads(body)["gitVersion"])
    """
    core.create_namespaced_pod(ns, pod("api", script))
    done = finished(core, ns, "api")
    log = core.read_namespaced_pod_log("api", ns)
    assert done.status.phase == "Succeeded", log
    assert log.splitlines() == [f"{network(real_cluster).kubernetes_service_ip}:443", "v1.36.3"]


def test_nothing_answers_outside_the_cluster_block(
    real_cluster: LocalCluster, core: client.CoreV1Api, ns: str
) -> None:
    """A pod has no route out: a connection to an address outside the block fails at once in
    the pod, and one to an unused address inside the block goes no further than the host
    (which forwards nothing)."""
    net = network(real_cluster)
    unused = str(ipaddress.ip_network(net.block)[200 * 256 + 7])
    script = f"""
        import errno, socket
        for address in ("192.0.2.1", "{unused}"):
            try:
                socket.create_connection((address, 80), timeout=3)
                print("connected")
            except TimeoutError:
                print("timeout")
            except OSError as err:
                print(errno.errorcode[err.errno])
    """
    core.create_namespaced_pod(ns, pod("outside", script))
    finished(core, ns, "outside")
    lines = core.read_namespaced_pod_log("outside", ns).splitlines()
    assert lines[0] == "ENETUNREACH", lines
    assert lines[1] in {"EHOSTUNREACH", "timeout"}, lines


def test_cluster_dns_resolves_services_and_headless_services_pods(
    real_cluster: LocalCluster, core: client.CoreV1Api, ns: str
) -> None:
    """`<service>.<namespace>.svc` is the Service's address; `<pod>.<headless>.<namespace>.svc`
    is the pod's own (how a FineTuneJob's workers find rank 0); names outside the cluster do not
    resolve (no DNS query leaves the machine)."""
    headless = {"clusterIP": "None", "selector": {"app": "worker-0"}, "ports": [{"port": 80}]}
    core.create_namespaced_service(ns, {"metadata": {"name": "workers"}, "spec": headless})
    web = {"selector": {"app": "x"}, "ports": [{"port": 80}]}
    core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": web})
    worker = pod("worker-0", "import time; time.sleep(3600)")
    worker["spec"].update(hostname="worker-0", subdomain="workers")
    core.create_namespaced_pod(ns, worker)
    running = wait_for(
        lambda: (p := core.read_namespaced_pod("worker-0", ns)).status.phase == "Running" and p,
        timeout=120,
        what="the worker to run",
    )
    script = f"""
        import socket, time
        def resolve(name):
            try:
                return socket.gethostbyname(name)
            except socket.gaierror as err:
                return f"error {{err.errno}}"
        for attempt in range(100):  # the headless record appears once the pod is Ready
            if not resolve("worker-0.workers.{ns}.svc").startswith("error"):
                break
            time.sleep(0.2)
        names = ["worker-0.workers.{ns}.svc", "web.{ns}.svc", "web", "kubernetes.default.svc"]
        for name in names + ["pypi.org"]:
            print(resolve(name))
    """
    core.create_namespaced_pod(ns, pod("resolver", script))
    done = finished(core, ns, "resolver")
    lines = core.read_namespaced_pod_log("resolver", ns).splitlines()
    assert done.status.phase == "Succeeded", lines
    web_ip = core.read_namespaced_service("web", ns).spec.cluster_ip
    service_ip = network(real_cluster).kubernetes_service_ip
    assert lines[:4] == [running.status.pod_ip, web_ip, web_ip, service_ip]
    assert lines[4].startswith("error"), lines


def test_a_deleted_pods_container_is_gone(
    real_cluster: LocalCluster, core: client.CoreV1Api, ns: str
) -> None:
    core.create_namespaced_pod(ns, pod("sleeper", "import time; time.sleep(3600)"))
    running = wait_for(
        lambda: (p := core.read_namespaced_pod("sleeper", ns)).status.phase == "Running" and p,
        timeout=120,
        what="the sleeper to run",
    )
    container_id = running.status.container_statuses[0].container_id.removeprefix("containerd://")
    paths = node.NodePaths(real_cluster.dir / "node")
    assert container_id in node.ctr(paths, "containers", "list", "-q").stdout.split()
    core.delete_namespaced_pod("sleeper", ns, grace_period_seconds=1)
    wait_pod_and_container_gone(real_cluster, core, ns, "sleeper", container_id)


def test_examples_claims_bind_to_the_default_storage_class_and_pods_write_to_them(
    real_cluster: LocalCluster, core: client.CoreV1Api, ns: str
) -> None:
    real_cluster.kubectl("-n", ns, "apply", "-f", str(REPO / "examples" / "pvcs.yaml"))
    for claim in ("models", "datasets"):
        bound = wait_for(
            lambda c=claim: (
                (pvc := core.read_namespaced_persistent_volume_claim(c, ns)).status.phase == "Bound"
                and pvc
            ),
            timeout=60,
            what=f"claim {claim} to be bound",
        )
        assert bound.spec.storage_class_name == "local"
    writer = pod("writer", 'open("/data/hello.txt", "w").write("from a pod")')
    writer["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    writer["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "models"}}]
    core.create_namespaced_pod(ns, writer)
    assert finished(core, ns, "writer").status.phase == "Succeeded"
    pv_name = core.read_namespaced_persistent_volume_claim("models", ns).spec.volume_name
    folder = Path(core.read_persistent_volume(pv_name).spec.host_path.path)
    assert (folder / "hello.txt").read_text() == "from a pod"

    core.delete_namespaced_pod("writer", ns, grace_period_seconds=0)
    wait_for(lambda: not core.list_namespaced_pod(ns).items, timeout=60, what="the pod to go")
    core.delete_namespaced_persistent_volume_claim("models", ns)

    def volume_gone() -> bool:
        try:
            core.read_persistent_volume(pv_name)
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(volume_gone, timeout=60, what="the released volume to be deleted")
    assert not folder.exists()


TRAINER_NEEDS = """
    import json, os, tempfile
    seen = {"uid": os.getuid()}
    try:
        open("/probe", "w")
        seen["root"] = "writable"
    except OSError:
        seen["root"] = "read-only"
    # What torchrun and the trainer do first: a temporary folder (torch.distributed.elastic's
    # log folder), the Hugging Face cache, the termination message.
    seen["tmp"] = tempfile.mkdtemp(prefix="torchelastic_")
    os.makedirs(os.path.join(os.environ["HF_HOME"], "hub"), exist_ok=True)
    open(os.environ["KUBETUNE_TERMINATION_LOG"], "w").write("ok")
    print(json.dumps(seen))
"""


def test_the_generated_training_pod_gives_the_trainer_what_it_needs_under_its_security_context(
    real_cluster: LocalCluster, core: client.CoreV1Api, ns: str
) -> None:
    """The Job the operator generates (builders.training), applied as it is, on the real
    runtime: read-only root, uid 1000, its volumes and env. The container's process is a probe
    of what torchrun and the trainer need from the pod (a temporary folder under TMPDIR, HF_HOME,
    the termination log) run in the Debian base image, a quick check of the pod alone; the
    trainer itself runs in the trainer image (7 GB: minutes to load into a cluster) in
    tests/e2e/test_real_node_training.py."""
    api = config.new_client_from_config(str(real_cluster.kubeconfig))
    real_cluster.kubectl("-n", ns, "apply", "-f", str(REPO / "examples" / "pvcs.yaml"))
    ftj = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "probe", "namespace": ns},
            "spec": {
                "model": {"source": "pvc://models/base"},
                "dataset": {"source": "pvc://datasets/train.jsonl"},
                "resources": {"nodes": 1, "gpusPerNode": 1, **PLACEMENT},
                "output": {"uri": "pvc://models/out"},
                "runPolicy": {"backoffLimit": 0},
            },
        }
    )
    owner = Owner("kubetune.io/v1alpha1", "FineTuneJob", "probe", ns, "0" * 8)
    children = [
        *build_trainer_identity(ns),  # the namespace's, which the operator makes once
        *build_children(ftj, owner, Settings(trainer_image=base_image().ref)),
    ]
    job = children[-1]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["command"] == ["torchrun"]
    container.update(command=["python3", "-c", textwrap.dedent(TRAINER_NEEDS)], args=[])
    for child in children:
        # No FineTuneJob exists here: the garbage collector would delete children it owned.
        child["metadata"].pop("ownerReferences", None)
        utils.create_from_dict(api, child, namespace=ns)
    pods = wait_for(
        lambda: core.list_namespaced_pod(ns, label_selector="job-name").items,
        timeout=60,
        what="the Job's pod",
    )
    done = finished(core, ns, pods[0].metadata.name)
    log = core.read_namespaced_pod_log(pods[0].metadata.name, ns)
    assert done.status.phase == "Succeeded", log[-3000:]
    seen = json.loads(log.strip().splitlines()[-1])
    assert seen["uid"] == 1000
    assert seen["root"] == "read-only"
    assert seen["tmp"].startswith(
        next(e["value"] for e in container["env"] if e["name"] == "TMPDIR")
    )


def _mounts_under(folder: Path) -> list[str]:
    found = []
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            text = mountinfo.read_text()
        except OSError:
            continue
        found.extend(line for line in text.splitlines() if str(folder) in line)
    return found


def test_down_leaves_no_process_mount_netns_link_route_rule_or_cgroup() -> None:
    name = f"rn-down-{os.getpid()}"
    cluster = LocalCluster(name, real_node=True)
    cluster.down()
    cluster.up()
    try:
        cluster.load_images(base_image())
        core = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
        core.create_namespaced_pod("default", pod("sleeper", "import time; time.sleep(3600)"))
        wait_for(
            lambda: core.read_namespaced_pod("sleeper", "default").status.phase == "Running",
            timeout=120,
            what="a pod to run",
        )
        net = network(cluster)
        veths = json.loads(
            subprocess.run(
                ["ip", "-j", "link", "show", "master", net.bridge],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        assert veths, "the pod's veth is on the cluster's bridge"
        pids = node.cgroup_pids(name)
        assert pids
        netns = {
            os.readlink(f"/proc/{pid}/ns/net") for pid in pids if Path(f"/proc/{pid}").exists()
        }
        assert len(netns) >= 2  # the host's (containerd, kubelet) and the pod's
        folder = cluster.dir
    finally:
        cluster.down()

    assert not folder.exists()
    assert node.cgroup_pids(name) == set()
    leftover_procs = [
        p.parent.name
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if str(folder).encode() in (p.read_bytes() if p.exists() else b"")
    ]
    assert leftover_procs == []
    assert _mounts_under(folder) == []
    links = subprocess.run(["ip", "-j", "link"], check=True, capture_output=True, text=True).stdout
    names = {link["ifname"] for link in json.loads(links)}
    assert net.bridge not in names
    assert not names & {v["ifname"] for v in veths}
    routes = subprocess.run(
        ["ip", "route", "show", "table", "all"], check=True, capture_output=True, text=True
    ).stdout
    assert f"10.{net.index}." not in routes
    rules = subprocess.run(["iptables-save"], check=True, capture_output=True, text=True).stdout
    assert node.nat_chain(name) not in rules
    assert f"kubetune {name}" not in rules
    hierarchies = [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir()]
    assert [h for h in hierarchies if (h / node.cgroup_name(name)).exists()] == []
    # Every network namespace of the pod is gone with its processes: no process is left in one
    # that is not the host's.
    still = set()
    for link in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            still.add(os.readlink(link))
        except OSError:
            continue
    host = os.readlink("/proc/self/ns/net")
    assert not (netns - {host}) & still
