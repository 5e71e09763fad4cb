"""Handler orchestration on a fake Kube facade (see tests/fakekube.py): what is written, when.

The real API server behaviour (defaults, admission, controllers) is covered in
tests/integration; these tests pin the orchestration: nothing is written when nothing changed,
a finished job is never trained again, output comes only from the trainer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.api.v1alpha1.base import API_VERSION
from kubetune.builders.common import FTJ_LABEL, MANAGED_BY
from kubetune.handlers import finetunejob as ftj_handlers
from kubetune.handlers.common import Context
from kubetune.handlers.indexes import Indexes
from tests.fakekube import FakeKube


def _ftj(name: str = "job") -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ns", "generation": 1},
        "spec": {
            "model": {"source": "pvc://models/minilm"},
            "dataset": {"source": "pvc://data/train.jsonl", "labelField": "label"},
            "output": {"uri": "pvc://out/job"},
            "resources": {"gpusPerNode": 1},
        },
    }


CLAIMS = ("models", "data", "out")


def _claims_index(*names: str) -> Indexes:
    """The claims as kopf's claims index holds them (the reconcile reads no claim itself)."""
    return Indexes(claims={("ns", name): [True] for name in names})


@pytest.fixture
def world() -> tuple[FakeKube, Context]:
    kube = FakeKube()
    return kube, Context(kube=kube, indexes=_claims_index(*CLAIMS))  # type: ignore[arg-type]


def test_the_claims_are_checked_in_the_index_not_read(world: Any) -> None:
    """No claim is in the fake API server: only the index says that they exist."""
    kube, ctx = world
    kube.put(_ftj())
    assert _reconcile(kube, ctx)["status"]["phase"] == "Pending" and _job(kube) is not None


def _started(kube: FakeKube, ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job reconciled, its Job active and its pod running (in the pods index): (Job, pod)."""
    kube.put(_ftj())
    _reconcile(kube, ctx)
    job = _job(kube)
    assert job is not None
    job["status"] = {"active": 1, "startTime": "2026-01-01T00:00:00Z"}
    kube.put(job)
    pod = {
        "kind": "Pod",
        "metadata": {
            "name": "job-train-0",
            "namespace": "ns",
            "labels": {MANAGED_BY: "kubetune", FTJ_LABEL: "job"},
        },
        "spec": {"nodeName": "gpu-0"},
        "status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"},
    }
    ctx.indexes = Indexes(pods={("ns", "FineTuneJob", "job"): [pod]}, claims=ctx.indexes.claims)
    return job, pod


def _count_reads(kube: FakeKube) -> list[str]:
    """From now on, the kind of every object read from the fake API server."""
    reads: list[str] = []
    get = kube.get

    def counted(api_version: str, kind: str, name: str, namespace: str | None) -> Any:
        reads.append(kind)
        return get(api_version, kind, name, namespace)

    kube.get = counted  # type: ignore[method-assign]
    return reads


def _reconcile(kube: FakeKube, ctx: Context, name: str = "job") -> dict[str, Any]:
    body = kube.get(API_VERSION, "FineTuneJob", name, "ns")
    assert body is not None
    ftj_handlers.reconcile_body(ctx, body)
    after = kube.get(API_VERSION, "FineTuneJob", name, "ns")
    assert after is not None
    return after


def _job(kube: FakeKube) -> dict[str, Any] | None:
    return kube.get("batch/v1", "Job", "job-train", "ns")


def test_a_second_reconcile_with_nothing_changed_writes_nothing(world: Any) -> None:
    kube, ctx = world
    kube.put(_ftj())
    first = _reconcile(kube, ctx)
    # The Job, known to be missing, is created (a POST, cheaper for the API server), not applied.
    assert kube.writes["create Job"] == 1 and kube.writes["apply Job"] == 0
    assert kube.writes["patch FineTuneJob/status"] == 1
    assert first["status"]["phase"] == "Pending"
    before = kube.total_writes()
    _reconcile(kube, ctx)
    assert kube.total_writes() == before, kube.writes


def test_the_trainer_identity_is_made_once_per_namespace_and_restored(world: Any) -> None:
    """The first job of a namespace applies its ServiceAccount, Role and RoleBinding; the next
    ones neither read nor write them. A deletion (from their watch) makes them again while the
    namespace has a FineTuneJob, and only the one that went is written."""
    kube, ctx = world
    reads = _count_reads(kube)
    for name in ("a", "b", "c"):
        kube.put(_ftj(name))
        before = len(reads)
        assert _reconcile(kube, ctx, name)["status"]["trainingJob"] == f"{name}-train"
        identity = [r for r in reads[before:] if r in ("ServiceAccount", "Role", "RoleBinding")]
        assert identity == (["ServiceAccount", "Role", "RoleBinding"] if name == "a" else [])
    assert [kube.writes[f"apply {k}"] for k in ("ServiceAccount", "Role", "RoleBinding")] == [1] * 3
    job = kube.get("batch/v1", "Job", "b-train", "ns")
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune-trainer"

    binding = kube.get("rbac.authorization.k8s.io/v1", "RoleBinding", "kubetune-trainer", "ns")
    kube.delete("rbac.authorization.k8s.io/v1", "RoleBinding", "kubetune-trainer", "ns")
    restore = ftj_handlers.identity_event(ctx, {"type": "DELETED", "object": binding})
    assert restore is not None
    restore()
    assert kube.get("rbac.authorization.k8s.io/v1", "RoleBinding", "kubetune-trainer", "ns")
    assert [kube.writes[f"apply {k}"] for k in ("ServiceAccount", "Role", "RoleBinding")] == [
        1,
        1,
        2,
    ]
    # Its own apply's echo (a MODIFIED that holds what kubetune applies) is nothing to do.
    echo = kube.get("rbac.authorization.k8s.io/v1", "Role", "kubetune-trainer", "ns")
    assert ftj_handlers.identity_event(ctx, {"type": "MODIFIED", "object": echo}) is None
    for name in ("a", "b", "c"):
        kube.delete(API_VERSION, "FineTuneJob", name, "ns")
    kube.delete("v1", "ServiceAccount", "kubetune-trainer", "ns")
    gone = {"kind": "ServiceAccount", "metadata": {"name": "kubetune-trainer", "namespace": "ns"}}
    last = ftj_handlers.identity_event(ctx, {"type": "DELETED", "object": gone})
    assert last is not None
    last()  # no FineTuneJob is left: a person removed it for good
    assert kube.get("v1", "ServiceAccount", "kubetune-trainer", "ns") is None


def test_a_restarted_operator_restores_an_identity_that_went_while_it_was_down(
    world: Any,
) -> None:
    """No watch event tells a new process what went while none ran: its first reconcile in the
    namespace (the start-up listing's) reads the identity, also for a job whose Job exists."""
    kube, ctx = world
    kube.put(_ftj())
    _reconcile(kube, ctx)
    kube.delete("v1", "ServiceAccount", "kubetune-trainer", "ns")
    restarted = Context(kube=kube, indexes=ctx.indexes)
    _reconcile(kube, restarted)
    assert kube.get("v1", "ServiceAccount", "kubetune-trainer", "ns") is not None
    assert kube.writes["apply ServiceAccount"] == 2 and kube.writes["apply Role"] == 1
    assert kube.writes["create Job"] == 1 and kube.writes["apply Job"] == 0


def test_a_job_left_by_an_earlier_attempt_is_applied_over_not_created_twice(world: Any) -> None:
    kube, ctx = world
    kube.put(_ftj())
    _reconcile(kube, ctx)
    # That attempt created the Job, then (say) lost its status write: the job still looks new.
    ftj = kube.get(API_VERSION, "FineTuneJob", "job", "ns")
    assert ftj is not None
    ftj.pop("status")
    kube.put(ftj)
    again = _reconcile(kube, ctx)
    assert kube.writes["create Job"] == 1 and kube.writes["apply Job"] == 1
    assert again["status"]["phase"] == "Pending"


def test_an_edited_child_is_written_back_and_only_that_one(world: Any) -> None:
    kube, ctx = world
    kube.put(_ftj())
    _reconcile(kube, ctx)
    config = kube.get("v1", "ConfigMap", "job-config", "ns")
    config["data"] = {"config.json": "{}"}
    kube.put(config)
    before = dict(kube.writes)
    _reconcile(kube, ctx)
    assert kube.writes["apply ConfigMap"] == before["apply ConfigMap"] + 1
    assert kube.writes["apply Job"] == before.get("apply Job", 0)
    assert kube.writes["create Job"] == before["create Job"]


def _finish(kube: FakeKube, condition: str) -> None:
    job = _job(kube)
    assert job is not None
    job["status"] = {
        "conditions": [
            {"type": condition, "status": "True", "lastTransitionTime": "2026-01-01T00:10:00Z"}
        ],
        "completionTime": "2026-01-01T00:10:00Z",
        "succeeded": 1,
    }
    kube.put(job)


def test_a_finished_job_whose_job_was_deleted_is_not_trained_again(world: Any) -> None:
    kube, ctx = world
    kube.put(_ftj())
    _reconcile(kube, ctx)
    _finish(kube, "Complete")
    done = _reconcile(kube, ctx)
    assert done["status"]["phase"] == "Succeeded"
    kube.delete("batch/v1", "Job", "job-train", "ns")  # ttlSecondsAfterFinished did this
    writes = kube.writes["apply Job"] + kube.writes["create Job"]
    again = _reconcile(kube, ctx)
    assert _job(kube) is None and kube.writes["apply Job"] + kube.writes["create Job"] == writes
    assert again["status"]["phase"] == "Succeeded"


def test_output_is_only_what_the_trainer_reported(world: Any) -> None:
    kube, ctx = world
    kube.put(_ftj())
    _reconcile(kube, ctx)
    _finish(kube, "Complete")
    done = _reconcile(kube, ctx)
    assert "output" not in done["status"]  # the trainer never said it wrote anything


def _conditions(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in body["status"]["conditions"]}


def test_kstatus_conditions_through_the_lifecycle(world: Any) -> None:
    kube, ctx = world
    kube.put(_ftj())
    pending = _conditions(_reconcile(kube, ctx))
    assert pending["Ready"][0] == "False" and pending["Reconciling"][0] == "True"
    assert pending["Stalled"][0] == "False"
    _finish(kube, "Failed")
    failed = _conditions(_reconcile(kube, ctx))
    assert failed["Ready"][0] == "False" and failed["Stalled"][0] == "True"
    assert failed["Reconciling"][0] == "False"


def test_a_missing_claim_waits_reconciling_and_builds_nothing(world: Any) -> None:
    kube, ctx = world
    ctx.indexes = _claims_index("models", "out")  # no "data"
    kube.put(_ftj())
    with pytest.raises(Exception, match="not found"):
        _reconcile(kube, ctx)
    body = kube.get(API_VERSION, "FineTuneJob", "job", "ns")
    conds = _conditions(body)
    assert conds["Reconciling"] == ("True", "MissingDependency")
    assert conds["Stalled"][0] == "False"
    assert not any(key.startswith("apply") for key in kube.writes)


def test_an_edit_of_a_finished_job_is_observed_without_training_again(world: Any) -> None:
    kube, ctx = world
    kube.put(_ftj())
    _reconcile(kube, ctx)
    _finish(kube, "Complete")
    _reconcile(kube, ctx)
    kube.delete("batch/v1", "Job", "job-train", "ns")
    body = kube.get(API_VERSION, "FineTuneJob", "job", "ns")
    body["metadata"]["generation"] = 2  # e.g. runPolicy.ttlSecondsAfterFinished edited
    kube.put(body)
    after = _reconcile(kube, ctx)
    assert after["status"]["observedGeneration"] == 2 and _job(kube) is None


def test_a_running_job_is_checked_for_a_silent_trainer_until_it_finishes(world: Any) -> None:
    """The periodic check (one thread for all running jobs, no kopf timer per job) sees a
    trainer whose last heartbeat is older than the timeout; a finished job leaves the check."""
    kube, ctx = world
    _started(kube, ctx)
    running = _reconcile(kube, ctx)
    assert running["status"]["phase"] == "Running"
    assert ctx.watched["heartbeat"] == {("ns", "job")}
    assert _conditions(running)["TrainerHeartbeat"][0] == "True"
    running["status"]["progress"] = {"lastHeartbeat": "2026-01-01T00:01:00Z"}  # long ago
    kube.put(running)
    ftj_handlers._check_heartbeat(ctx, "ns", "job")
    silent = kube.get(API_VERSION, "FineTuneJob", "job", "ns")
    assert _conditions(silent)["TrainerHeartbeat"] == ("False", "HeartbeatStale")
    _finish(kube, "Complete")
    _reconcile(kube, ctx)
    assert ctx.watched["heartbeat"] == set()


def _lora_job(merge: bool) -> dict[str, Any]:
    job = _ftj("adapter")
    job["spec"] |= {"task": "causal-lm", "method": "lora", "lora": {"r": 8, "merge": merge}}
    job["status"] = {
        "phase": "Succeeded",
        "completionTime": "2026-01-01T00:10:00Z",
        "output": {
            "modelUri": "pvc://out/adapter",
            "tritonRepositoryUri": "pvc://out/adapter/triton-repository",
        },
    }
    return job


@pytest.mark.parametrize(
    ("runtime", "merge", "uri", "adapters"),
    [
        ("vllm", False, "pvc://models/minilm", (("adapter", "pvc://out/adapter"),)),
        ("vllm", True, "pvc://out/adapter/triton-repository", ()),
        ("python", False, "pvc://out/adapter/triton-repository", ()),
    ],
)
def test_an_unmerged_adapter_is_served_beside_its_base_on_vllm(
    world: Any, runtime: str, merge: bool, uri: str, adapters: tuple[tuple[str, str], ...]
) -> None:
    from kubetune.api.v1alpha1.modelserver import ModelServer
    from kubetune.builders.common import Owner
    from kubetune.handlers import modelserver as ms_handlers

    kube, ctx = world
    kube.put(_lora_job(merge))
    body = {
        "apiVersion": API_VERSION,
        "kind": "ModelServer",
        "metadata": {"name": "srv", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"model": {"fineTuneJobRef": {"name": "adapter"}}, "runtime": runtime},
    }
    resolved = ms_handlers._resolve_model(
        ctx, ModelServer.model_validate(body), Owner.from_body(body)
    )
    assert (resolved.uri, resolved.lora_adapters) == (uri, adapters)


def _served_source(kube: FakeKube, ctx: Context, model: dict[str, Any], generation: int) -> Any:
    from kubetune.handlers import modelserver as ms_handlers

    kube.put(
        {
            "apiVersion": API_VERSION,
            "kind": "ModelServer",
            "metadata": {"name": "srv", "namespace": "ns", "uid": "u", "generation": generation},
            "spec": {"model": model},
        }
    )
    body = kube.get(API_VERSION, "ModelServer", "srv", "ns")
    assert body is not None
    ms_handlers.reconcile_body(ctx, body)
    deployment = kube.get("apps/v1", "Deployment", "srv", "ns")
    assert deployment is not None
    template = deployment["spec"]["template"]
    fetch = template["spec"]["initContainers"][0]
    return template["metadata"]["annotations"]["kubetune.io/model-revision"], fetch


@pytest.mark.parametrize("uri", ["pvc://models/served", "s3://bucket/served", "hf://org/name"])
def test_a_new_content_revision_at_the_same_uri_rolls_out(world: Any, uri: str) -> None:
    """The operator cannot see new weights behind an unchanged URI: spec.model.revision names
    them, and a new value is a new rollout revision (for hf://, also what is downloaded)."""
    kube, ctx = world
    kube.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": "ns"}})
    unpinned, _ = _served_source(kube, ctx, {"source": uri}, 1)
    first, fetch = _served_source(kube, ctx, {"source": uri, "revision": "2026-01"}, 2)
    again, _ = _served_source(kube, ctx, {"source": uri, "revision": "2026-01"}, 2)
    second, _ = _served_source(kube, ctx, {"source": uri, "revision": "2026-02"}, 3)
    assert len({unpinned, first, second}) == 3 and again == first
    wanted = f"{uri}@2026-01" if uri.startswith("hf://") else None
    args = " ".join(fetch.get("args") or fetch.get("command") or [])
    if wanted:
        assert wanted in args, args
    else:
        assert "@2026-01" not in args, args


def test_child_events_that_wait_for_their_job_are_folded_into_one_look(world: Any) -> None:
    """A pod created, scheduled and running and its Job's counts, all arrived while the job
    waited: one read of the FineTuneJob and one status write, not one each (and an event that
    comes once the look has started gets a look of its own)."""
    kube, ctx = world
    job, pod = _started(kube, ctx)
    events = [
        {"type": "ADDED", "object": pod},
        {"type": "MODIFIED", "object": pod},
        {"type": "MODIFIED", "object": job},
        {"type": "MODIFIED", "object": pod},
    ]
    looks = [ftj_handlers._child_event(ctx, event) for event in events]
    assert looks[0] is not None and looks[1:] == [None, None, None]
    reads = _count_reads(kube)
    patches = kube.writes["patch FineTuneJob/status"]
    looks[0]()
    assert reads.count("FineTuneJob") == 1, reads
    assert kube.writes["patch FineTuneJob/status"] == patches + 1
    assert kube.get(API_VERSION, "FineTuneJob", "job", "ns")["status"]["phase"] == "Running"
    assert ftj_handlers._child_event(ctx, events[1]) is not None


def test_the_heartbeat_check_reads_a_running_job_only_when_a_look_could_change_it(
    world: Any,
) -> None:
    """The once-a-minute check of a running job decides on the status its watch last showed: a
    fresh report means no read at all; one past the timeout, a read and the stale condition."""
    kube, ctx = world
    _started(kube, ctx)
    running = _reconcile(kube, ctx)
    assert running["status"]["phase"] == "Running"
    reads = _count_reads(kube)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    running["status"]["progress"] = {"lastHeartbeat": now}
    kube.put(running)
    ftj_handlers._note_running(ctx, running)
    ftj_handlers._check_heartbeat(ctx, "ns", "job")
    assert reads == []
    running["status"]["progress"] = {"lastHeartbeat": "2026-01-01T00:01:00Z"}  # long ago
    kube.put(running)
    ftj_handlers._note_running(ctx, running)
    ftj_handlers._check_heartbeat(ctx, "ns", "job")
    assert reads.count("FineTuneJob") == 1, reads
    silent = kube.get(API_VERSION, "FineTuneJob", "job", "ns")
    assert _conditions(silent)["TrainerHeartbeat"] == ("False", "HeartbeatStale")
    ftj_handlers._note_running(ctx, silent)  # stale: looked at until a report sets it back
    ftj_handlers._check_heartbeat(ctx, "ns", "job")
    assert reads.count("FineTuneJob") == 3, reads  # the read of `silent` above, and the look


def test_a_job_its_watches_show_is_looked_at_without_reading_it_back(world: Any) -> None:
    """As in a burst: the FineTuneJob's ADDED event, its first reconcile, then its Job's and
    pod's events. No look reads the FineTuneJob or its Job from the server (handlers/latest.py):
    each reads what the watches showed and what its own status write answered, so the second
    look sees the first one's conditions and posts no transition again."""
    kube, ctx = world
    get = kube.get
    ctx.latest.seen("FineTuneJob", "ADDED", kube.put(_ftj()))
    reads = _count_reads(kube)
    stub = {"metadata": {"name": "job", "namespace": "ns"}}
    ftj_handlers._reconcile_event(ctx, stub, ftj_handlers._reconcile_if_behind)  # the ADDED's
    # The namespace's trainer identity, read once per namespace (the first job there).
    assert reads == ["ServiceAccount", "Role", "RoleBinding"], reads
    reads.clear()
    assert get(API_VERSION, "FineTuneJob", "job", "ns")["status"]["phase"] == "Pending"
    job = get("batch/v1", "Job", "job-train", "ns")
    job["status"] = {"active": 1, "startTime": "2026-01-01T00:00:00Z"}
    job = kube.put(job)
    pod = {
        "kind": "Pod",
        "metadata": {"name": "job-train-0", "namespace": "ns", "labels": job["metadata"]["labels"]},
        "spec": {"nodeName": "gpu-0"},
        "status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"},
    }
    ctx.indexes = Indexes(pods={("ns", "FineTuneJob", "job"): [pod]}, claims=ctx.indexes.claims)
    look = ftj_handlers._child_event(ctx, {"type": "MODIFIED", "object": job})
    assert look is not None
    assert ftj_handlers._child_event(ctx, {"type": "ADDED", "object": pod}) is None  # folded
    look()
    assert reads == [], reads
    assert get(API_VERSION, "FineTuneJob", "job", "ns")["status"]["phase"] == "Running"
    patches = kube.writes["patch FineTuneJob/status"]
    look = ftj_handlers._child_event(ctx, {"type": "MODIFIED", "object": pod})
    assert look is not None
    look()  # nothing moved since the answer to the last write: nothing written
    assert reads == [] and kube.writes["patch FineTuneJob/status"] == patches, reads


def test_the_heartbeat_look_reads_the_server_not_what_a_silent_watch_last_showed(
    world: Any,
) -> None:
    """The watch's copy says the last report was long ago; the server has a fresh one (the
    watch fell silent, not the trainer): the look reads the server, and nothing is marked
    stale or restarted."""
    kube, ctx = world
    _started(kube, ctx)
    running = _reconcile(kube, ctx)
    running["status"]["progress"] = {"lastHeartbeat": "2026-01-01T00:01:00Z"}  # long ago
    ctx.latest.seen("FineTuneJob", "MODIFIED", kube.put(running))
    ftj_handlers._note_running(ctx, running)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    running["status"]["progress"] = {"lastHeartbeat": now}
    kube.put(running)  # the trainer's report, whose event never came
    ftj_handlers._check_heartbeat(ctx, "ns", "job")
    looked = kube.get(API_VERSION, "FineTuneJob", "job", "ns")
    assert _conditions(looked)["TrainerHeartbeat"][0] == "True", looked["status"]["conditions"]
    assert kube.writes["delete Pod"] == 0
