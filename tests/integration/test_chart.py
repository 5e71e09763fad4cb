"""The Helm chart, with the real helm binary and the real local control plane.

Rendering tests need only helm; the others install the chart and then act as the operator's
ServiceAccount (a real token from the TokenRequest API) to show that the ClusterRole allows every
call the operator's code makes — the children the builders produce, applied the way kube.py
applies them, and a list+watch on every resource kopf has a handler for — and nothing it should
not have (no verb on Secrets, no escalate, no bind).

The session's CRDs come from the `crds` fixture (the same generator), without Helm's ownership
labels, so the install here uses crds.enabled=false; the chart's CRD templates are exercised by
`helm template` and a server-side dry run instead.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

import kubetune.handlers  # noqa: F401  (registers the handlers whose watches RBAC must allow)
from kubetune.api.v1alpha1.finetunejob import FineTuneJob
from kubetune.api.v1alpha1.modelserver import ModelServer
from kubetune.builders import serving, training
from kubetune.builders.common import Owner, Settings
from kubetune.cli import build_parser
from kubetune.crdgen import all_crds
from kubetune.devcluster.binaries import kubectl_path
from kubetune.devcluster.cluster import LocalCluster
from kubetune.handlers.common import apply_children
from kubetune.kube import Forbidden, Kube, NotFound
from tests.tools.helm import CHART, Helm
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm.in_folder(tmp_path_factory.mktemp("helm"))


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = find(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


# -- rendering (helm only) ------------------------------------------------------------------------


def test_lint_is_clean(helm: Helm) -> None:
    result = helm.run("lint", "--strict", str(CHART))
    findings = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert findings == ["[INFO] Chart.yaml: icon is recommended"], result.stdout


def test_every_value_is_documented_and_known_to_the_schema() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for index, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not key:
            continue
        above = lines[index - 1].strip() if index else ""
        if " # " not in line and not above.startswith("#"):
            undocumented.append(line.strip())
    assert undocumented == []
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load("\n".join(lines))
    assert set(schema["properties"]) - {"global"} == set(values)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("imageTag=1.0", "at '': additional properties 'imageTag' not allowed"),
        ("image.tagg=1.0", "at '/image': additional properties 'tagg' not allowed"),
        ("crds.kep=false", "at '/crds': additional properties 'kep' not allowed"),
        (
            "securityContext.capabilities.dorp={ALL}",
            "at '/securityContext/capabilities': additional properties 'dorp' not allowed",
        ),
        ("logLevel=verbose", "at '/logLevel'"),
        ("watchNamespaces={Team_A}", "at '/watchNamespaces/0'"),
    ],
)
def test_the_schema_rejects_unknown_keys_and_bad_values(
    helm: Helm, setting: str, message: str
) -> None:
    result = helm.run("template", "kt", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_defaults_render_the_operator_with_the_app_version_images(helm: Helm) -> None:
    docs = helm.template()
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    container = operator_container(docs)
    assert container["image"] == f"ghcr.io/kubetune/operator:{APP_VERSION}"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == f"ghcr.io/kubetune/trainer:{APP_VERSION}"
    assert env["KUBETUNE_FETCHER_IMAGE"] == f"ghcr.io/kubetune/triton:{APP_VERSION}"
    assert env["KUBETUNE_VLLM_IMAGE"] == "nvcr.io/nvidia/tritonserver:25.12-vllm-python-py3"
    assert not [arg for arg in container["args"] if arg.startswith("--namespace")]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    (deployment,) = find(docs, "Deployment")
    # Two replicas elect a leader through a Lease in the release's namespace.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert "--leader-election=kubetune-system/kt-kubetune" in container["args"]
    (budget,) = find(docs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    (single,) = find(helm.template("replicas=1"), "Deployment")
    assert single["spec"]["strategy"] == {"type": "Recreate"}
    assert not [
        a for a in single["spec"]["template"]["spec"]["containers"][0]["args"] if "leader" in a
    ]
    assert {
        d["metadata"]["namespace"] for d in docs if d["kind"] in ("Deployment", "ServiceAccount")
    } == {"kubetune-system"}

    custom = operator_container(
        helm.template("image.tag=dev", "trainerImage.repository=r.example/t", "trainerImage.tag=v7")
    )
    assert custom["image"] == "ghcr.io/kubetune/operator:dev"
    assert {e["name"]: e["value"] for e in custom["env"]}[
        "KUBETUNE_TRAINER_IMAGE"
    ] == "r.example/t:v7"


def test_crds_render_from_the_generator_and_only_when_enabled(helm: Helm) -> None:
    rendered = {
        doc["metadata"]["name"]: doc for doc in find(helm.template(), "CustomResourceDefinition")
    }
    generated = {crd["metadata"]["name"]: crd for crd in all_crds().values()}
    assert set(rendered) == set(generated)
    for name, crd in rendered.items():
        assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert crd == generated[name], f"chart CRD {name} is stale: run `make crds`"

    assert find(helm.template("crds.enabled=false"), "CustomResourceDefinition") == []
    for crd in find(helm.template("crds.keep=false"), "CustomResourceDefinition"):
        assert not crd["metadata"].get("annotations")


def test_watch_namespaces_become_namespace_flags(helm: Helm) -> None:
    container = operator_container(helm.template("watchNamespaces={team-a,team-b}"))
    flags = [arg for arg in container["args"] if arg.startswith("--namespace")]
    assert flags == ["--namespace=team-a", "--namespace=team-b"]


@pytest.mark.parametrize(
    ("sets", "namespaces"),
    [
        ((), []),
        (("watchNamespaces={team-a,team-b}", "logLevel=debug"), ["team-a", "team-b"]),
        (("metrics.enabled=false",), []),
    ],
    ids=["defaults", "namespaced-debug", "no-health-endpoint"],
)
def test_the_rendered_command_is_what_kubetune_run_accepts(
    helm: Helm, sets: tuple[str, ...], namespaces: list[str]
) -> None:
    """The chart and the CLI change together: a flag the CLI lacks would crash the pod at start."""
    container = operator_container(helm.template(*sets))
    assert container["command"] == ["kubetune"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "run"
    assert args.namespace == namespaces


def test_the_metrics_service_selects_the_operator_and_a_service_monitor_is_opt_in(
    helm: Helm,
) -> None:
    docs = helm.template()
    (service,) = find(docs, "Service")
    (deployment,) = find(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["metadata"]["name"] == "kt-kubetune-metrics"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]}
    assert (port["name"], port["targetPort"]) == ("metrics", "metrics")
    assert container_ports["metrics"] == 9090
    assert find(docs, "ServiceMonitor") == []

    docs = helm.template(
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.interval=15s",
        "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
    )
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # It selects the metrics Service (and nothing else the chart makes), by the Service's port.
    selected = [
        d
        for d in docs
        if d["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert selected == find(docs, "Service")
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["kubetune-system"]}

    assert find(helm.template("metrics.enabled=false"), "Service") == []


def test_the_cluster_role_grants_nothing_on_secrets_and_no_escalation(helm: Helm) -> None:
    (role,) = find(helm.template(), "ClusterRole")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    everything = {verb for verbs in granted.values() for verb in verbs}
    assert "*" not in everything and not any("*" in key for pair in granted for key in pair)
    assert ("", "secrets") not in granted  # a missing Secret is reported from the pod
    assert not everything & {"escalate", "bind", "impersonate", "deletecollection"}


# -- the chart on the cluster ---------------------------------------------------------------------


def _labelled_namespace(core: client.CoreV1Api, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    return name


@pytest.mark.cluster
def test_rendered_objects_pass_a_server_side_dry_run(
    helm: Helm, cluster: LocalCluster, api_client: client.ApiClient
) -> None:
    """Every rendered object, CRDs included, is valid for the API server, and the operator's pod
    template meets the Pod Security "restricted" profile (the namespace enforces it)."""
    core = client.CoreV1Api(api_client)
    namespace = _labelled_namespace(core, "chart-dry-run")
    try:
        rendered = helm.run(
            "template",
            "kt",
            str(CHART),
            "--namespace",
            namespace,
            "--set",
            "watchNamespaces={team-a}",
            "--set",
            "tolerations[0].key=dedicated,tolerations[0].operator=Exists",
            "--set",
            "nodeSelector.kubernetes\\.io/os=linux",
        ).stdout
        result = subprocess.run(
            [
                str(kubectl_path()),
                f"--kubeconfig={cluster.kubeconfig}",
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=chart-test",
                "--dry-run=server",
                "-n",
                namespace,
                "-f",
                "-",
            ],
            input=rendered,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        applied = result.stdout.splitlines()
        assert len(applied) == len([d for d in yaml.safe_load_all(rendered) if d]), applied
        assert all("(server dry run)" in line for line in applied), applied
        assert "PodSecurity" not in result.stderr, result.stderr
    finally:
        core.delete_namespace(namespace)


@dataclass
class Installed:
    release: str
    namespace: str
    account: str
    fullname: str


@pytest.fixture(scope="module")
def installed(
    helm: Helm, cluster: LocalCluster, api_client: client.ApiClient, crds: None
) -> Iterator[Installed]:
    """The chart installed in a namespace of its own that enforces Pod Security "restricted"."""
    core = client.CoreV1Api(api_client)
    namespace = _labelled_namespace(core, "chart-install")
    release = f"kt-{namespace[-6:]}"
    env = {**helm.env, "KUBECONFIG": str(cluster.kubeconfig)}
    Helm(env).run(
        "install", release, str(CHART), "--namespace", namespace, "--set", "crds.enabled=false"
    )
    yield Installed(release, namespace, f"{release}-kubetune", f"{release}-kubetune")
    Helm(env).run("uninstall", release, "--namespace", namespace, "--ignore-not-found")
    core.delete_namespace(namespace)


@pytest.mark.cluster
def test_install_creates_the_operator_its_rbac_and_a_restricted_pod(
    installed: Installed, api_client: client.ApiClient
) -> None:
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    ns = installed.namespace
    deployment = apps.read_namespaced_deployment(installed.fullname, ns)
    assert deployment.spec.replicas == 2
    assert deployment.spec.template.spec.service_account_name == installed.account
    assert (
        core.read_namespaced_service_account(installed.account, ns).metadata.labels[
            "app.kubernetes.io/managed-by"
        ]
        == "Helm"
    )
    role = rbac.read_cluster_role(installed.fullname)
    assert any("finetunejobs/status" in (rule.resources or []) for rule in role.rules)
    binding = rbac.read_cluster_role_binding(installed.fullname)
    assert binding.role_ref.name == installed.fullname
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
        ("ServiceAccount", installed.account, ns)
    ]
    ext = client.ApiextensionsV1Api(api_client)
    for crd in all_crds().values():
        assert (
            ext.read_custom_resource_definition(crd["metadata"]["name"]).spec.group == "kubetune.io"
        )
    # The ReplicaSet's pod was admitted by a namespace that enforces "restricted".
    pods = wait_for(
        lambda: (
            core.list_namespaced_pod(
                ns, label_selector=f"app.kubernetes.io/instance={installed.release}"
            ).items
        ),
        what="the operator pod to be created",
    )
    assert pods[0].spec.containers[0].security_context.read_only_root_filesystem is True


def _token(admin: client.ApiClient, ns: str, account: str) -> str:
    """A token for the ServiceAccount, minted by the API server (the TokenRequest API)."""
    request = client.CoreV1Api(admin).create_namespaced_service_account_token(
        account, ns, {"spec": {"expirationSeconds": 600}}
    )
    token: str = request.status.token
    return token


def _token_client(cluster: LocalCluster, token: str) -> client.ApiClient:
    """A client of the local cluster that authenticates with `token` only (no client cert)."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
    cfg.cert_file = cfg.key_file = None
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


@pytest.fixture(scope="module")
def as_operator(
    installed: Installed, cluster: LocalCluster, api_client: client.ApiClient
) -> client.ApiClient:
    return _token_client(cluster, _token(api_client, installed.namespace, installed.account))


def _allowed(
    sa: client.ApiClient, verb: str, group: str, resource: str, ns: str | None = None
) -> bool:
    resource, _, subresource = resource.partition("/")
    review = client.AuthorizationV1Api(sa).create_self_subject_access_review(
        {
            "spec": {
                "resourceAttributes": {
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "subresource": subresource or None,
                    "namespace": ns,
                }
            }
        }
    )
    return bool(review.status.allowed)


def _kopf_selectors() -> set[tuple[str, str]]:
    """(group, plural) of every resource kopf has a handler for: each one is listed and watched."""
    registry = kopf.get_default_registry()
    found = set()
    for sub in vars(registry).values():
        for selector in getattr(sub, "get_all_selectors", lambda: [])():
            found.add((selector.group, selector.any_name))
    return found


@pytest.mark.cluster
def test_the_operator_may_watch_everything_it_handles_but_never_list_secrets(
    as_operator: client.ApiClient,
) -> None:
    watched = _kopf_selectors()
    assert ("kubetune.io", "finetunejobs") in watched and ("", "pods") in watched
    needed = {
        *((verb, group, plural, None) for group, plural in watched for verb in ("list", "watch")),
        ("list", "apiextensions.k8s.io", "customresourcedefinitions", None),
        ("watch", "apiextensions.k8s.io", "customresourcedefinitions", None),
        ("list", "", "namespaces", None),
        ("watch", "", "namespaces", None),
        ("list", "", "nodes", None),
        ("patch", "kubetune.io", "finetunejobs/status", "any-namespace"),
        ("patch", "kubetune.io", "modelservers/status", "any-namespace"),
        ("get", "", "persistentvolumeclaims", "any-namespace"),
        ("create", "", "events", "any-namespace"),
        ("create", "events.k8s.io", "events", "any-namespace"),
    }
    missing = [n for n in needed if not _allowed(as_operator, *n)]
    assert missing == []
    refused = [
        ("get", "", "secrets", "any-namespace"),
        ("get", "", "secrets", None),
        ("list", "", "secrets", None),
        ("watch", "", "secrets", None),
        ("list", "", "secrets", "any-namespace"),
        ("escalate", "rbac.authorization.k8s.io", "roles", "any-namespace"),
        ("bind", "rbac.authorization.k8s.io", "roles", "any-namespace"),
        ("create", "", "pods", "any-namespace"),
        ("impersonate", "", "serviceaccounts", None),
        ("delete", "kubetune.io", "finetunejobs", "any-namespace"),
    ]
    granted = [r for r in refused if _allowed(as_operator, *r)]
    assert granted == []


def _owner(
    api_client: client.ApiClient, kind: str, ns: str, spec: dict[str, Any], stand_in: dict[str, Any]
) -> dict[str, Any]:
    """A resource as the API server would hand it to a handler, with the uid of a real object of
    that kind and name, so the children's owner references point at something (the garbage
    collector deletes children of a missing owner, which would race this test's next apply).

    The real object is `stand_in`, a spec the session's operator (when running) builds nothing
    for: a FineTuneJob whose claims do not exist here, a ModelServer that waits for that job."""
    plural = {"FineTuneJob": "finetunejobs", "ModelServer": "modelservers"}[kind]
    real = client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "kubetune.io",
        "v1alpha1",
        ns,
        plural,
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": "rbac"},
            "spec": stand_in,
        },
    )
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": {
            "name": "rbac",
            "namespace": ns,
            "uid": real["metadata"]["uid"],
            "generation": 1,
        },
        "spec": spec,
    }


@pytest.mark.cluster
def test_the_operator_can_make_every_call_of_a_reconcile(
    installed: Installed, as_operator: client.ApiClient, api_client: client.ApiClient
) -> None:
    """The builders' real children, applied as kube.py applies them, with the operator's token.

    Creating the namespace's trainer Role (finetunejobs/status get+patch) succeeds without
    `escalate` because the operator holds those permissions itself. The Job and the Deployment
    are dry-run only (authorization is the same; no pod takes simulated GPUs from other tests).
    """
    ns = installed.namespace
    kube = Kube(as_operator)
    ftj_spec = {
        "model": {"source": "pvc://models/base/minilm"},
        "dataset": {"source": "pvc://datasets/intents.jsonl"},
        "resources": {"nodes": 2, "gpusPerNode": 4},
        "output": {"uri": "pvc://models/out/rbac"},
    }
    ftj_body = _owner(api_client, "FineTuneJob", ns, ftj_spec, stand_in=ftj_spec)
    ms_body = _owner(
        api_client,
        "ModelServer",
        ns,
        {
            "model": {"source": "pvc://models/base/minilm"},
            "resources": {"gpus": 1},
            "autoscaling": {
                "minReplicas": 2,
                "maxReplicas": 4,
                "metric": "queue-time",
                "target": 50000,
            },
            "networkPolicy": {"sources": [{"namespace": "apps", "podLabels": {"app": "client"}}]},
        },
        stand_in={"model": {"fineTuneJobRef": {"name": "rbac"}}},
    )
    ftj, ftj_owner = FineTuneJob.model_validate(ftj_body), Owner.from_body(ftj_body)
    ms, ms_owner = ModelServer.model_validate(ms_body), Owner.from_body(ms_body)
    model = serving.ResolvedModel(uri="pvc://models/base/minilm", revision="r1")
    ms_children, _ = serving.build_children(ms, ms_owner, model, Settings(), 0)
    children = [
        *training.build_trainer_identity(ns),
        *training.build_children(ftj, ftj_owner, Settings()),
        *ms_children,
    ]
    assert {c["kind"] for c in children} >= {
        "Role",
        "RoleBinding",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Job",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    (trainer_role,) = [c for c in children if c["kind"] == "Role"]
    assert trainer_role["rules"][0]["resources"] == ["finetunejobs/status"]

    # The handlers dry-run every child first (as the operator would), then apply them.
    apply_children(kube, children, dry_run=True, rejected=AssertionError)
    # Then created for real (Job and Deployment aside: no simulated pod takes other tests' GPUs);
    # a refusal raises AssertionError, anything else kopf.TemporaryError. The owner references
    # (blockOwnerDeletion) pass the local cluster's OwnerReferencesPermissionEnforcement.
    created = [c for c in children if c["kind"] not in ("Job", "Deployment")]
    apply_children(kube, created, dry_run=False, rejected=AssertionError)
    assert kube.get("v1", "PersistentVolumeClaim", "absent", ns) is None  # a 404, not a 403
    with pytest.raises(Forbidden):
        kube.get("v1", "Secret", "absent", ns)
    assert kube.list("v1", "Node", None)
    kube.list("v1", "Pod", None)
    for kind in ("FineTuneJob", "ModelServer"):
        with pytest.raises(NotFound):  # authorized, and then not found
            kube.patch_status("kubetune.io/v1alpha1", kind, "absent", ns, {"phase": "Pending"})
    client.CoreV1Api(as_operator).create_namespaced_event(
        ns,
        {
            "metadata": {"generateName": "rbac-"},
            "involvedObject": {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "rbac",
                "namespace": ns,
            },
            "reason": "Check",
            "message": "the operator may post events",
            "type": "Normal",
        },
    )
    for child in children:
        kube.delete(child["apiVersion"], child["kind"], child["metadata"]["name"], ns)

    with pytest.raises(Forbidden):
        kube.list("v1", "Secret", ns)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.cluster
def test_the_charts_command_runs_the_operator_as_its_service_account(
    helm: Helm,
    installed: Installed,
    cluster: LocalCluster,
    api_client: client.ApiClient,
    tmp_path: Path,
) -> None:
    """The container's command, arguments and environment, run here with the ServiceAccount's
    token: kopf starts every watch without a 403, and the liveness endpoint answers."""
    port = _free_port()
    docs = helm.template(
        f"watchNamespaces={{{installed.namespace}}}",
        "logLevel=debug",
        f"metrics.port={port}",
        namespace=installed.namespace,
    )
    container = operator_container(docs)
    token = _token(api_client, installed.namespace, installed.account)
    kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())
    for user in kubeconfig["users"]:
        user["user"] = {"token": token}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    env = {
        **os.environ,
        **{e["name"]: e["value"] for e in container["env"]},
        "KUBECONFIG": str(tmp_path / "kubeconfig"),
        "PYTHONPATH": str(REPO / "operator"),
    }
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune", *container["args"]],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(healthy, 30, "the operator's liveness endpoint")
        streams = len(_kopf_selectors()) + 1  # and kopf's own watch on the CRDs
        wait_for(
            lambda: log.read_text().count("Starting the watch-stream") >= streams,
            30,
            f"{streams} watch streams to start",
        )
        time.sleep(2)  # a refused list comes back within milliseconds of the stream's start
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "APIForbiddenError" not in text and "Traceback" not in text, text[-5000:]


@pytest.mark.cluster
def test_uninstall_removes_the_cluster_scoped_objects_and_leaves_existing_crds(
    helm: Helm, cluster: LocalCluster, api_client: client.ApiClient, crds: None
) -> None:
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    namespace = _labelled_namespace(core, "chart-uninstall")
    env = Helm({**helm.env, "KUBECONFIG": str(cluster.kubeconfig)})
    release = f"kt-{namespace[-6:]}"
    try:
        env.run("install", release, str(CHART), "-n", namespace, "--set", "crds.enabled=false")
        assert rbac.read_cluster_role(f"{release}-kubetune").metadata.name
        env.run("uninstall", release, "-n", namespace)
        with pytest.raises(ApiException) as gone:
            rbac.read_cluster_role(f"{release}-kubetune")
        assert gone.value.status == 404
        with pytest.raises(ApiException) as binding_gone:
            rbac.read_cluster_role_binding(f"{release}-kubetune")
        assert binding_gone.value.status == 404
        ext = client.ApiextensionsV1Api(api_client)
        assert ext.read_custom_resource_definition("finetunejobs.kubetune.io")
    finally:
        core.delete_namespace(namespace)
