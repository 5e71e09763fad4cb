"""Valid but impossible: a spec the API server accepts that cannot run yet. Each gets an
actionable reason (a typed reason of api/v1alpha1/reasons.py, a message naming the field), and
fixing the cause is all it takes: no object is deleted or re-created by hand, the resource goes
on by itself, driven by the event the fix makes.

- a missing Secret: the operator reads no Secret (the chart grants it none); the training pod on
  the real node (the session's real-node cluster) waits in the kubelet's
  CreateContainerConfigError, the status says MissingDependency and names the field; creating the
  Secret lets the kubelet start the pod. Then every status, Event and ConfigMap of the namespace
  and the operator's log are scanned for the Secret's values.
- a missing claim: MissingDependency naming the field; creating the claim (its watch event)
  builds the children.
- a model that does not exist: the pre-flight pod's ModelNotFound; correcting spec.model.source
  checks again and creates the training Job.

And the trainer's token: its own FineTuneJob's status, refused everywhere else.

More GPUs than any node (Unschedulable, then lowered) is in test_finetunejob.py and an unknown
FineTuneJob reference (FineTuneJobNotFound, then created) in test_modelserver.py.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.cluster import LocalCluster
from kubetune.devcluster.demo import PLACEMENT
from kubetune.devcluster.volumes import ensure_claim
from tests.cluster_fixtures import OperatorProcess, RealNode, Resources
from tests.integration.test_chart import _token, _token_client
from tests.integration.test_finetunejob import finetunejob
from tests.integration.test_preflight import job as preflight_job
from tests.integration.test_preflight import stage_sources, validated
from tests.waiting import wait_for

FTJ = "finetunejobs"


def _ready(resources: Resources, name: str) -> dict[str, Any]:
    return wait_for(
        lambda: (c := resources.condition(FTJ, name, "Ready")) and c, what=f"{name}'s Ready"
    )


def _scan(
    api_client: client.ApiClient, namespace: str, log: Path, secrets: list[str]
) -> dict[str, int]:
    """Where any of `secrets` (or its base64 form) appears: statuses, Events, ConfigMaps, the
    operator's log. Returns how many of each were read."""
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    texts: dict[str, str] = {}
    for plural in (FTJ, "modelservers"):
        for obj in custom.list_namespaced_custom_object(
            "kubetune.io", "v1alpha1", namespace, plural
        )["items"]:
            texts[f"{plural}/{obj['metadata']['name']}/status"] = json.dumps(obj.get("status"))
    for event in core.list_namespaced_event(namespace).items:
        texts[f"event/{event.metadata.name}"] = f"{event.reason} {event.message}"
    for cm in core.list_namespaced_config_map(namespace).items:
        texts[f"configmap/{cm.metadata.name}"] = json.dumps(cm.data)
    texts["operator.log"] = log.read_text(errors="replace")
    needles = [*secrets, *(base64.b64encode(s.encode()).decode() for s in secrets)]
    leaks = [where for where, text in texts.items() for n in needles if n in text]
    assert leaks == [], leaks
    kinds = ("status", "event", "configmap", "operator.log")
    return {k: sum(1 for where in texts if k in where) for k in kinds}


def test_a_missing_secret_is_reported_from_the_pod_and_creating_it_starts_the_pod(
    real_node: RealNode,
    real_resources: Resources,
    real_namespace: str,
    real_volumes: dict[str, Path],
    real_operator: OperatorProcess,
) -> None:
    """The training pod runs on the real node, whose kubelet resolves Secrets (a missing one:
    CreateContainerConfigError, tried again until it exists)."""
    real_node.load("trainer")
    resources, api_client, namespace = real_resources, real_node.api, real_namespace
    operator = real_operator
    body = finetunejob(
        "creds",
        resources={"nodes": 1, "gpusPerNode": 1, **PLACEMENT},
        output={"uri": "s3://bucket/out/creds", "secretRef": {"name": "out-creds"}},
    )
    resources.create(FTJ, body)
    cond = wait_for(
        lambda: (
            (c := resources.condition(FTJ, "creds", "Ready"))
            and c["reason"] == "MissingDependency"
            and c
        ),
        60,
        "MissingDependency from the pod",
    )
    assert cond["message"].startswith('spec.output.secretRef.name: secret "out-creds" not found')
    status = resources.get(FTJ, "creds")["status"]
    assert status["phase"] == "Pending"
    assert resources.condition(FTJ, "creds", "Stalled")["status"] == "False"  # waiting, not stuck

    values = [f"AKIA{uuid.uuid4().hex[:16].upper()}", f"kt-secret-{uuid.uuid4().hex}"]
    client.CoreV1Api(api_client).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "out-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": values[0], "AWS_SECRET_ACCESS_KEY": values[1]},
        },
    )
    # The kubelet starts the pod by itself; the trainer then runs with the credentials (and
    # fails here on the empty model claim: the run is over either way).
    obj = resources.wait_phase(FTJ, "creds", "Failed", timeout=240)
    assert obj["status"]["failureReason"] != "MissingDependency"
    pods = (
        client.CoreV1Api(api_client)
        .list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=creds-train")
        .items
    )
    assert pods and all(
        s.state.terminated is not None for p in pods for s in p.status.container_statuses or []
    )
    read = _scan(api_client, namespace, operator.log, values)
    print(f"secret scan: {read}")
    assert read["status"] >= 1 and read["event"] >= 1 and read["configmap"] >= 1


def test_a_missing_claim_waits_and_its_creation_builds_the_children(
    resources: Resources, api_client: client.ApiClient, namespace: str, cluster: LocalCluster
) -> None:
    resources.create(
        FTJ,
        finetunejob(
            "later",
            model={"source": "pvc://later/base"},
            dataset={"source": "pvc://later/intents.jsonl"},
            output={"uri": "pvc://later/out"},
            resources={"nodes": 1, "gpusPerNode": 1},
        ),
    )
    cond = _ready(resources, "later")
    assert cond["reason"] == "MissingDependency"
    assert "spec.model.source: PersistentVolumeClaim 'later' not found" in cond["message"]
    assert resources.condition(FTJ, "later", "Reconciling")["status"] == "True"
    ensure_claim(api_client, namespace, "later", cluster.dir / "volumes" / namespace / "later")
    resources.wait_phase(FTJ, "later", "Running")


def test_a_model_that_does_not_exist_is_refused_and_correcting_the_source_goes_on(
    real_node: RealNode,
    real_resources: Resources,
    real_namespace: str,
    real_volumes: dict[str, Path],
) -> None:
    """The pre-flight pod runs in the trainer image on the real node."""
    real_node.load("trainer")
    resources, api_client, namespace = real_resources, real_node.api, real_namespace
    stage_sources(real_volumes)
    body = preflight_job("typo", "80Gi", runPolicy={"suspend": True})
    body["spec"]["model"]["source"] = "pvc://models/minlm"  # a typo
    resources.create(FTJ, body)
    refused = validated(resources, "typo")
    assert (refused["status"], refused["reason"]) == ("False", "ModelNotFound"), refused
    assert "/kubetune/pvc/models/minlm" in refused["message"]
    resources.patch(FTJ, "typo", {"spec": {"model": {"source": "pvc://models/minilm"}}})
    try:
        accepted = wait_for(
            lambda: (
                (c := resources.condition(FTJ, "typo", "Validated")) and c["status"] == "True" and c
            ),
            180,
            "the check of the corrected source",
        )
    except AssertionError as err:
        jobs = client.BatchV1Api(api_client).list_namespaced_job(namespace).items
        raise AssertionError(
            f"{err}\nstatus: {resources.get(FTJ, 'typo').get('status')}\n"
            f"jobs: {[(j.metadata.name, j.metadata.annotations, j.status) for j in jobs]}"
        ) from err
    assert accepted["reason"] == "Fits"
    resources.wait_phase(FTJ, "typo", "Suspended", timeout=60)


def test_the_trainers_token_patches_its_own_status_and_nothing_else(
    resources: Resources,
    api_client: client.ApiClient,
    namespace: str,
    cluster: LocalCluster,
    volumes: dict[str, Path],
) -> None:
    """Training pods share the namespace's kubetune-trainer ServiceAccount; the chart's
    ValidatingAdmissionPolicy lets a token bound to a pod of a job's Job (named as the Job
    controller names them) patch that job's status, and nothing else. The tokens are minted here
    by the TokenRequest API bound to pods, as the kubelet mints them for its pods; the pods are
    held by a scheduling gate (suspended jobs: no training pod runs)."""
    suspended = {"runPolicy": {"suspend": True}, "resources": {"nodes": 1, "gpusPerNode": 1}}
    for name in ("own", "other"):
        resources.create(FTJ, finetunejob(name, **suspended))
    for name in ("own", "other"):
        job = resources.wait_phase(FTJ, name, "Suspended")
        assert job["status"]["trainingJob"] == f"{name}-train"
    account = wait_for(
        lambda: _read_account(api_client, namespace, "kubetune-trainer"),
        what="the trainer's account",
    )
    trainer = _token_client(
        cluster, _pod_token(api_client, namespace, account, "own-train-0-x7k2p")
    )
    api = client.CustomObjectsApi(trainer)
    progress = {"status": {"progress": {"step": 1, "totalSteps": 10, "percent": 10}}}
    patched = api.patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", namespace, FTJ, "own", progress
    )
    assert patched["status"]["progress"]["step"] == 1

    def as_(token: str) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(_token_client(cluster, token))

    unbound = as_(_token(api_client, namespace, account))
    impostor = as_(_pod_token(api_client, namespace, account, "own-trainer-0-abcde"))

    def patch(api: client.CustomObjectsApi, name: str, body: dict[str, Any]) -> Any:
        return api.patch_namespaced_custom_object_status(
            "kubetune.io", "v1alpha1", namespace, FTJ, name, body
        )

    refused = {
        "another job's status": lambda: patch(api, "other", progress),
        "its own trainingJob": lambda: patch(api, "own", {"status": {"trainingJob": "x-train"}}),
        "a token bound to no pod": lambda: patch(unbound, "own", progress),
        "a pod not of its Job": lambda: patch(impostor, "own", progress),
        "its own spec": lambda: api.patch_namespaced_custom_object(
            "kubetune.io", "v1alpha1", namespace, FTJ, "own", {"spec": {"image": "evil:1"}}
        ),
        "listing jobs": lambda: api.list_namespaced_custom_object(
            "kubetune.io", "v1alpha1", namespace, FTJ
        ),
        "pods": lambda: client.CoreV1Api(trainer).list_namespaced_pod(namespace),
        "secrets": lambda: client.CoreV1Api(trainer).list_namespaced_secret(namespace),
        "its Role": lambda: client.RbacAuthorizationV1Api(trainer).patch_namespaced_role(
            "kubetune-trainer", namespace, {"rules": []}
        ),
    }
    answers = {}
    for what, call in refused.items():
        try:
            call()
            answers[what] = 200
        except ApiException as err:
            answers[what] = err.status
    assert answers == dict.fromkeys(refused, 403)
    status = resources.get(FTJ, "own")["status"]
    assert status["trainingJob"] == "own-train"  # nothing refused got through
    assert "progress" not in (resources.get(FTJ, "other").get("status") or {})


def _pod_token(admin: client.ApiClient, namespace: str, account: str, pod: str) -> str:
    """A token of `account` bound to a pod named `pod` (created here, held by a scheduling gate:
    it never runs), as the kubelet's projected token of that pod would be."""
    core = client.CoreV1Api(admin)
    created = core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": pod},
            "spec": {
                "serviceAccountName": account,
                "automountServiceAccountToken": False,
                "schedulingGates": [{"name": "kubetune.io/never"}],
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 1000,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "held",
                        "image": "kubetune/never:1",
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        },
    )
    bound = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": created.metadata.uid}
    request = core.create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 600, "boundObjectRef": bound}}
    )
    token: str = request.status.token
    return token


def _read_account(api_client: client.ApiClient, namespace: str, name: str) -> str | None:
    try:
        client.CoreV1Api(api_client).read_namespaced_service_account(name, namespace)
    except ApiException:
        return None
    return name
