"""FineTuneJob -> the pre-flight Job: one CPU pod that checks before any GPU is held.

It runs `python -m kubetune.trainer preflight` on the same rendered config (the same ConfigMap)
and mounts as the training pods, so it sees the sources exactly as training will: config.json
from the model source, the dataset, with the same credentials. It requests no GPU but may land
wherever the job may (the user's placement and the GPU taint's toleration), so a zonal volume or
a dedicated node pool work the same. Its verdict comes back as a PreflightResult JSON in the
container's termination message (see kubetune.trainer.preflight).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubetune.api.contract import OUTPUT, PreflightEnv, TrainerEnv, credential_env
from kubetune.api.v1alpha1.finetunejob import FineTuneJob
from kubetune.api.v1alpha1.reasons import ValidatedReason
from kubetune.api.v1alpha1.trainerconfig import (
    PreflightResult,
)
from kubetune.builders.common import (
    COMPONENT_LABEL,
    MANAGED_BY,
    TERMINATION_LOG,
    Owner,
    Settings,
    child_name,
    container_security_context,
    metadata,
    placement,
    pod_security_context,
)
from kubetune.builders.training import (
    CONFIG_DIR,
    CONFIG_KEY,
    PVC_ROOT,
    SCRATCH,
    TEMPLATE_HASH,
    _claims,
    _secret_env,
    names,
)

COMPONENT = "preflight"
# "true" or "false" on a FineTuneJob overrides the operator's default (Settings.preflight)
PREFLIGHT_ANNOTATION = "kubetune.io/preflight"
PREFLIGHT_OF = "kubetune.io/preflight-of"
CHECKED_DIGEST = "kubetune.io/checked-spec"
DEADLINE_SECONDS = 900  # a hub or S3 that does not answer in 15 minutes fails the check
RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}


def wanted(body: dict[str, Any], default: bool) -> bool:
    """Whether this FineTuneJob is checked before its training Job: its annotation, else the
    operator's default."""
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(PREFLIGHT_ANNOTATION)
    return default if value not in ("true", "false") else value == "true"


def preflight_name(owner_name: str) -> str:
    return child_name(owner_name, "preflight", limit=52)


def build_preflight_job(
    ftj: FineTuneJob,
    owner: Owner,
    settings: Settings,
    gpu_memory_bytes: int | None,
    gpu_memory_source: str | None,
) -> dict[str, Any]:
    """The Job; `gpu_memory_*` from kubetune.planner.device_memory (None: not known)."""
    spec = ftj.spec
    res = spec.resources
    n = names(owner.name)
    env: list[dict[str, Any]] = [
        {"name": TrainerEnv.CONFIG, "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": TrainerEnv.TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
        # The scratch emptyDir itself: nothing creates a subfolder under the read-only root.
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # the model's and the dataset's credentials; the output is not its business
        *(e for e in _secret_env(spec) if not e["name"].startswith(credential_env(OUTPUT, ""))),
    ]
    if gpu_memory_bytes is not None:
        env.append({"name": PreflightEnv.GPU_MEMORY_BYTES, "value": str(gpu_memory_bytes)})
        env.append({"name": PreflightEnv.GPU_MEMORY_SOURCE, "value": gpu_memory_source or ""})
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": n["config"]}},
        {"name": "scratch", "emptyDir": {}},
    ]
    for index, claim in enumerate(_claims(spec)):
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append(
            {"name": f"pvc-{index}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}
        )
    container = {
        "name": COMPONENT,
        "image": spec.image or settings.trainer_image,
        "command": ["python", "-m", "kubetune.trainer", "preflight"],
        "env": env,
        "resources": RESOURCES,
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # it talks to no API server
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    pod_spec.update(placement(res, res.gpus_per_node, res.gpu_resource_name))
    # The verdict belongs to one spec and one GPU size: a change of either changes the
    # template hash, which tells the handler to check again.
    checked = json.dumps([spec.to_wire(), gpu_memory_bytes], sort_keys=True).encode()
    template = {
        "metadata": {
            # Not the FineTuneJob's pod label: the training status counts those pods, and
            # this one is read once, by its Job's name, when the Job has finished.
            "labels": {MANAGED_BY: "kubetune", PREFLIGHT_OF: owner.name},
            "annotations": {CHECKED_DIGEST: hashlib.sha256(checked).hexdigest()[:16]},
        },
        "spec": pod_spec,
    }
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(
            owner, preflight_name(owner.name), COMPONENT, annotations={TEMPLATE_HASH: digest[:16]}
        ),
        "spec": {
            "backoffLimit": 1,  # a verdict exits 0; only a check that could not run is retried
            "activeDeadlineSeconds": DEADLINE_SECONDS,
            "template": template,
        },
    }


def read_result(termination_message: str | None) -> PreflightResult | None:
    """The verdict from the pre-flight container's termination message (None: none there)."""
    text = (termination_message or "").strip()
    if not text.startswith("{"):
        return None
    try:
        return PreflightResult.model_validate_json(text)
    except ValueError:
        return None


def is_preflight_job(obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return obj.get("kind") == "Job" and labels.get(COMPONENT_LABEL) == COMPONENT


def checked_digest(job: dict[str, Any]) -> str | None:
    template = (job.get("spec") or {}).get("template") or {}
    value = ((template.get("metadata") or {}).get("annotations") or {}).get(CHECKED_DIGEST)
    return str(value) if value else None


def outcome(job: dict[str, Any], pods: list[dict[str, Any]]) -> PreflightResult | None:
    """The verdict of a finished pre-flight Job from its pods' termination messages; None while
    it runs. A Job that failed without a verdict (the check could not run) refuses the job."""
    status = job.get("status") or {}
    failed = any(
        c.get("type") == "Failed" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if not (status.get("succeeded") or failed):
        return None
    messages = []
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp"))):
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = ((container.get("state") or {}).get("terminated")) or {}
            if terminated.get("message"):
                messages.append(str(terminated["message"]))
    for message in reversed(messages):
        result = read_result(message)
        if result is not None:
            return result
    last = messages[-1].strip() if messages else "the pre-flight pod ended without a verdict"
    return PreflightResult(
        validated=False, reason=ValidatedReason.CHECK_FAILED, message=last[:3000]
    )
