"""FineTuneJob -> the children that run it.

- once per namespace, the trainer's identity (`build_trainer_identity`): a ServiceAccount, Role and
  RoleBinding shared by every training pod there, that may patch FineTuneJobs' status; the
  chart's ValidatingAdmissionPolicy (charts/kubetune/templates/trainer-status-policy.yaml) lets
  a pod's token patch only the job whose `status.trainingJob` runs that pod;
- a ConfigMap with the rendered trainer config (the same typed models the trainer parses);
- for more than one node, a headless Service, so every training pod has a stable DNS name (a
  single-node job rendezvouses with itself on localhost and needs none: one write and one
  watched object fewer per job);
- an Indexed Job with completions = parallelism = nodes running torchrun, whose settings come from
  `PET_*` environment variables (torchrun reads them): node rank = the completion index, master
  address = the index-0 pod's DNS name (localhost for one node).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from kubetune.api.contract import (
    DATASET,
    MODEL,
    NON_RETRYABLE_EXITS,
    OUTPUT,
    SECRET_KEYS,
    TRAINER_ACCOUNT,
    credential_env,
)
from kubetune.api.v1alpha1.finetunejob import FineTuneJob, FineTuneJobSpec
from kubetune.api.v1alpha1.trainerconfig import JobRef, ReportingSpec, TrainerConfig, TrainerPaths
from kubetune.builders.common import (
    COMPONENT_LABEL,
    MANAGED_BY,
    PART_OF,
    TERMINATION_LOG,
    Owner,
    Settings,
    child_name,
    container_security_context,
    metadata,
    placement,
    pod_security_context,
    resource_requirements,
    selector_labels,
    shm_volume,
    split_uri,
)

CONFIG_DIR = "/kubetune/config"
CONFIG_KEY = "config.json"
SCRATCH = "/kubetune/scratch"
PVC_ROOT = "/kubetune/pvc"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TEMPLATE_HASH = "kubetune.io/template-hash"
FORMAT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class SpecProblem:
    """Something only the operator can judge: which field, and what is wrong with it."""

    field: str
    message: str
    reason: str = "InvalidSpec"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Dependency:
    """An object that must exist before the job can run (checked by the handler)."""

    kind: str
    name: str
    field: str


def names(owner_name: str) -> dict[str, str]:
    return {
        "job": child_name(owner_name, "train", limit=52),  # pod hostnames add "-<index>"
        "service": child_name(owner_name, "workers"),
        "config": child_name(owner_name, "config"),
    }


def check_spec(spec: FineTuneJobSpec) -> list[SpecProblem]:
    """Checks the CRD schema cannot express."""
    problems = []
    if spec.dataset.format is None and not spec.dataset.source.startswith("hf://"):
        suffix = PurePosixPath(spec.dataset.source).suffix
        if suffix not in FORMAT_SUFFIXES:
            problems.append(
                SpecProblem(
                    "spec.dataset.format",
                    f"cannot infer the format of {spec.dataset.source!r} from its suffix "
                    f"{suffix or '(none)'}; set jsonl, csv or parquet",
                )
            )
    if spec.dataset.source.startswith("pvc://") and not split_uri(spec.dataset.source)[2]:
        problems.append(
            SpecProblem("spec.dataset.source", "a pvc:// dataset needs a file path after the claim")
        )
    return problems


def dependencies(spec: FineTuneJobSpec) -> list[Dependency]:
    deps: list[Dependency] = []
    for field, uri in _uris(spec).items():
        if uri.startswith("pvc://"):
            deps.append(Dependency("PersistentVolumeClaim", split_uri(uri)[1], f"spec.{field}"))
    return deps


def secret_fields(spec: FineTuneJobSpec) -> dict[str, list[str]]:
    """The fields that name each Secret: {"hub": ["spec.model.secretRef.name"]}. The Secrets
    are not read by the operator; a pod that cannot start without one names it, and the status
    names the field (training_status.observe)."""
    fields: dict[str, list[str]] = {}
    for field, ref in (
        ("model", spec.model.secret_ref),
        ("dataset", spec.dataset.secret_ref),
        ("output", spec.output.secret_ref),
    ):
        if ref is not None:
            fields.setdefault(ref.name, []).append(f"spec.{field}.secretRef.name")
    return fields


def _uris(spec: FineTuneJobSpec) -> dict[str, str]:
    return {
        "model.source": spec.model.source,
        "dataset.source": spec.dataset.source,
        "output.uri": spec.output.uri,
    }


def _claims(spec: FineTuneJobSpec) -> list[str]:
    claims = []
    for uri in _uris(spec).values():
        scheme, claim, _ = split_uri(uri)
        if scheme == "pvc" and claim not in claims:
            claims.append(claim)
    return claims


def _local_path(uri: str) -> str:
    """Where a URI is read from inside the pod: pvc:// is mounted, hf:// and s3:// are fetched."""
    scheme, claim, path = split_uri(uri)
    if scheme == "pvc":
        return str(PurePosixPath(PVC_ROOT) / claim / path)
    return uri


def trainer_config(ftj: FineTuneJob, owner: Owner) -> TrainerConfig:
    spec = ftj.spec
    if spec.output.uri.startswith("pvc://"):
        output, upload = _local_path(spec.output.uri), None
    else:
        output, upload = f"{SCRATCH}/output", spec.output.uri
    return TrainerConfig(
        job=JobRef(name=owner.name, namespace=owner.namespace, uid=owner.uid),
        spec=spec,
        paths=TrainerPaths(
            model=_local_path(spec.model.source),
            dataset=_local_path(spec.dataset.source),
            output=output,
            checkpoints=f"{output}/checkpoints",
            upload_uri=upload,
        ),
        reporting=ReportingSpec(to_api_server=True),
    )


TRAINER_IDENTITY = "trainer-identity"  # the component label of the shared identity
IDENTITY_SELECTOR = f"{MANAGED_BY}=kubetune,{COMPONENT_LABEL}={TRAINER_IDENTITY}"


def build_trainer_identity(namespace: str) -> list[dict[str, Any]]:
    """The ServiceAccount every training pod in `namespace` runs as, and the Role and
    RoleBinding that let it read and patch FineTuneJobs' status (nothing else).

    Shared per namespace instead of one set per job: three writes, three watched objects and
    three watch events fewer per FineTuneJob (docs/benchmarks-control-plane.md, session 13).
    Which job a pod may patch is not RBAC's to say (a Role names resources, not the pod asking):
    the chart's ValidatingAdmissionPolicy checks that the token is bound to a pod of the Job the
    job's status names (`status.trainingJob`). No owner: the identity outlives any one job, and
    goes with its namespace."""
    meta = {
        "name": TRAINER_ACCOUNT,
        "namespace": namespace,
        "labels": {
            MANAGED_BY: "kubetune",
            PART_OF: "kubetune",
            COMPONENT_LABEL: TRAINER_IDENTITY,
        },
    }
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta,
        "automountServiceAccountToken": False,
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta,
        "rules": [
            {
                "apiGroups": ["kubetune.io"],
                "resources": ["finetunejobs/status"],
                "verbs": ["get", "patch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta,
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": TRAINER_ACCOUNT,
        },
        "subjects": [{"kind": "ServiceAccount", "name": TRAINER_ACCOUNT, "namespace": namespace}],
    }
    return [account, role, binding]


def build_configmap(ftj: FineTuneJob, owner: Owner) -> dict[str, Any]:
    config = trainer_config(ftj, owner)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, names(owner.name)["config"], "trainer-config"),
        "data": {CONFIG_KEY: json.dumps(config.to_wire(), indent=2, sort_keys=True)},
    }


def build_service(owner: Owner) -> dict[str, Any]:
    n = names(owner.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, n["service"], "trainer"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rank 0 must resolve before it is Ready
            "selector": {**selector_labels(owner), "batch.kubernetes.io/job-name": n["job"]},
            "ports": [{"name": "rendezvous", "port": Settings.master_port, "protocol": "TCP"}],
        },
    }


def _secret_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Each location's Secret under its own names (api.contract.credential_env): the dataset's
    and the output's credentials never stand in for each other.

    The scheme's first key (HF_TOKEN, AWS_ACCESS_KEY_ID) is required, the others optional: the
    operator never reads a Secret (it holds no `get` on Secrets); a missing Secret or key is
    the kubelet's CreateContainerConfigError, which the status reports from the pod
    (training_status.observe) until the Secret is created and the kubelet starts the pod."""
    env: list[dict[str, Any]] = []
    for role, uri, ref in (
        (MODEL, spec.model.source, spec.model.secret_ref),
        (DATASET, spec.dataset.source, spec.dataset.secret_ref),
        (OUTPUT, spec.output.uri, spec.output.secret_ref),
    ):
        if ref is None:
            continue
        for index, key in enumerate(SECRET_KEYS.get(split_uri(uri)[0], ())):
            optional = index > 0
            env.append(
                {
                    "name": credential_env(role, key),
                    "valueFrom": {
                        "secretKeyRef": {"name": ref.name, "key": key, "optional": optional}
                    },
                }
            )
    return env


def build_job(ftj: FineTuneJob, owner: Owner, settings: Settings) -> dict[str, Any]:
    spec = ftj.spec
    res = spec.resources
    n = names(owner.name)
    distributed = res.nodes > 1
    master = f"{n['job']}-0.{n['service']}.{owner.namespace}.svc" if distributed else "localhost"
    env = [
        {"name": "PET_NNODES", "value": str(res.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(max(res.gpus_per_node, 1))},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {
                "fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                }
            },
        },
        {"name": "PET_MASTER_ADDR", "value": master},
        {"name": "PET_MASTER_PORT", "value": str(settings.master_port)},
        {"name": "KUBETUNE_TRAINER_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
        # The scratch emptyDir itself: a subfolder would not exist under a read-only root
        # (nothing creates it before torchrun asks tempfile for a folder).
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *_secret_env(spec),
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": n["config"]}},
        shm_volume(res.shm_size),
        {"name": "scratch", "emptyDir": {}},
    ]
    for index, claim in enumerate(_claims(spec)):
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{index}", "mountPath": f"{PVC_ROOT}/{claim}"})
    container = {
        "name": "trainer",
        "image": spec.image or settings.trainer_image,
        "command": ["torchrun"],
        "args": ["--module", "kubetune.trainer"],
        "env": env,
        "resources": resource_requirements(
            res.cpu, res.memory, res.gpus_per_node, res.gpu_resource_name
        ),
        "volumeMounts": mounts,
        "ports": [{"name": "rendezvous", "containerPort": settings.master_port}],
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **({"subdomain": n["service"]} if distributed else {}),
        "serviceAccountName": TRAINER_ACCOUNT,
        "automountServiceAccountToken": True,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 120,  # time for the SIGTERM checkpoint
    }
    pod_spec.update(placement(res, res.gpus_per_node, res.gpu_resource_name))
    policy = spec.run_policy
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": res.nodes,
        "parallelism": res.nodes,
        "backoffLimit": policy.backoff_limit,
        "podFailurePolicy": pod_failure_policy(),
        "suspend": policy.suspend,
        "template": {
            "metadata": {
                "labels": selector_labels(owner) | {"app.kubernetes.io/component": "trainer"}
            },
            "spec": pod_spec,
        },
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    digest = hashlib.sha256(json.dumps(job_spec["template"], sort_keys=True).encode()).hexdigest()
    meta = metadata(owner, n["job"], "trainer", annotations={TEMPLATE_HASH: digest[:16]})
    if spec.queue_name:
        meta["labels"][QUEUE_LABEL] = spec.queue_name
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def pod_failure_policy() -> dict[str, Any]:
    """Fail the Job at once when the trainer says a retry cannot help (bad data, a model that
    does not exist, credentials refused), and let disruptions (preemption, eviction, a drained
    node) not count against backoffLimit: the replacement pod resumes from the checkpoint."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": "trainer",
                    "operator": "In",
                    "values": [int(code) for code in NON_RETRYABLE_EXITS],
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def build_child(
    ftj: FineTuneJob, owner: Owner, settings: Settings, kind: str
) -> dict[str, Any] | None:
    """The one child of `kind` that `build_children` makes (None: it makes none), without
    building the others: a Job's status event asks only whether the Job drifted."""
    if kind == "Job":
        return build_job(ftj, owner, settings)
    if kind == "ConfigMap":
        return build_configmap(ftj, owner)
    if kind == "Service" and ftj.spec.resources.nodes > 1:
        return build_service(owner)
    return None


def build_children(ftj: FineTuneJob, owner: Owner, settings: Settings) -> list[dict[str, Any]]:
    """Every child, in the order they are applied (the Job last: it needs the others). The
    headless Service only where there is a rendezvous across nodes. The trainer's identity is
    the namespace's, not the job's (`build_trainer_identity`)."""
    service = [build_service(owner)] if ftj.spec.resources.nodes > 1 else []
    return [
        build_configmap(ftj, owner),
        *service,
        build_job(ftj, owner, settings),
    ]
