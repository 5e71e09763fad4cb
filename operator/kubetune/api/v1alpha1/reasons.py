"""Condition types and reasons of both kinds: the words GitOps tools and people read.

The three kstatus conditions (https://github.com/kubernetes-sigs/cli-utils, pkg/kstatus) carry the
verdict; Flux, kpt and `kubectl wait` read them:

- `Ready=True` only when what the user asked for holds: a FineTuneJob that succeeded, a
  ModelServer serving the revision its spec asks for.
- `Reconciling=True` while work is under way (kstatus: InProgress).
- `Stalled=True` when nothing will progress without a person: training failed, a rollout that
  was rolled back, a spec that cannot work (kstatus: Failed).

The other conditions are details a person reads in `kubectl describe`.
"""

from __future__ import annotations

from enum import StrEnum


class ConditionType(StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    # FineTuneJob details
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    SCHEDULED = "Scheduled"
    TRAINER_HEARTBEAT = "TrainerHeartbeat"
    # ModelServer details
    MODEL_LOADED = "ModelLoaded"
    DEGRADED = "Degraded"
    SMOKE_TEST_PASSED = "SmokeTestPassed"


class Reason(StrEnum):
    """Reasons shared by both kinds, and the FineTuneJob's own."""

    INVALID_SPEC = "InvalidSpec"
    CHILD_REJECTED = "ChildRejected"
    MISSING_DEPENDENCY = "MissingDependency"
    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    FINISHING = "Finishing"
    SUCCEEDED = "Succeeded"
    SUSPENDED = "Suspended"
    WAITING_FOR_QUEUE = "WaitingForQueue"
    UNSCHEDULABLE = "Unschedulable"
    SCHEDULED = "Scheduled"
    NOT_FINISHED = "NotFinished"
    NOT_FAILED = "NotFailed"
    NOT_SUSPENDED = "NotSuspended"
    AS_DESIRED = "AsDesired"
    NO_HEARTBEAT_YET = "NoHeartbeatYet"
    HEARTBEAT_FRESH = "HeartbeatFresh"
    HEARTBEAT_STALE = "HeartbeatStale"
    TRAINER_FAILED = "TrainerFailed"


class ServingReason(StrEnum):
    """The ModelServer's reasons."""

    FINE_TUNE_JOB_NOT_FOUND = "FineTuneJobNotFound"
    WAITING_FOR_FINE_TUNE_JOB = "WaitingForFineTuneJob"
    SERVING_LAST_GOOD_REVISION = "ServingLastGoodRevision"
    MODEL_ANSWERING = "ModelAnswering"
    ROLLING_OUT = "RollingOut"
    ROLLOUT_COMPLETE = "RolloutComplete"
    ROLLED_BACK = "RolledBack"
    ROLLOUT_FAILED = "RolloutFailed"
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
    SCALED_TO_ZERO = "ScaledToZero"
    REPLICAS_UNAVAILABLE = "ReplicasUnavailable"
    SMOKE_TEST_PASSED = "SmokeTestPassed"
    SMOKE_TEST_FAILED = "SmokeTestFailed"
    SMOKE_TEST_DISABLED = "SmokeTestDisabled"
    MODEL_READY = "ModelReady"
    NO_READY_REPLICA = "NoReadyReplica"


# --- issue 10 (pre-flight check): begin
class ValidatedReason(StrEnum):
    """Reasons of the `Validated` condition (the pre-flight check, before any GPU is held)."""

    CHECKING = "Checking"  # Unknown: the pre-flight pod is running
    FITS = "Fits"  # True: sources reachable and the plan fits the GPU
    MEMORY_UNKNOWN = "GpuMemoryUnknown"  # True: sources reachable, no GPU memory to compare with
    DOES_NOT_FIT = "DoesNotFit"  # False: the plan needs more than one GPU has
    MODEL_NOT_FOUND = "ModelNotFound"  # False: the model source does not exist / no config.json
    BAD_DATA = "BadData"  # False: the dataset source is missing, empty or malformed
    ACCESS_DENIED = "AccessDenied"  # False: the credentials do not open a source
    PLAN_ERROR = "PlanError"  # False: the model's config or the spec cannot be planned
    CHECK_FAILED = "PreflightFailed"  # False: the pre-flight pod failed otherwise


VALIDATED = "Validated"


# --- issue 10 (pre-flight check): end
