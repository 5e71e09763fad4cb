"""The trainer's configuration: what the operator renders into a ConfigMap for the training pods.

The trainer parses it with these same models, so the operator and the trainer cannot disagree on
the shape of a FineTuneJob.
"""

from __future__ import annotations

from pydantic import Field

from kubetune.api.v1alpha1.base import ApiModel
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec, MemoryPlan
from kubetune.api.v1alpha1.reasons import ValidatedReason


class JobRef(ApiModel):
    """The FineTuneJob the trainer reports to."""

    name: str = Field(description="FineTuneJob name.")
    namespace: str = Field(description="FineTuneJob namespace.")
    uid: str | None = Field(
        default=None, description="FineTuneJob UID (guards against a recreated object)."
    )


class TrainerPaths(ApiModel):
    """Where the trainer finds its inputs and writes its outputs, as seen from inside the pod.

    A local path is read as is (a mounted PVC, or a folder on a developer's machine); an
    hf:// or s3:// URI is downloaded by the trainer before training starts.
    """

    model: str = Field(description="Local folder, hf://org/name or s3://bucket/prefix.")
    dataset: str = Field(description="Local file or folder, hf://dataset or s3://bucket/key.")
    output: str = Field(description="Local folder the fine-tuned model is written to.")
    checkpoints: str = Field(description="Local folder for checkpoints (survives restarts).")
    upload_uri: str | None = Field(
        default=None, description="s3:// URI the output folder is uploaded to after training."
    )


class ReportingSpec(ApiModel):
    """How progress reaches the FineTuneJob's status."""

    to_api_server: bool = Field(
        default=True,
        description="Patch the FineTuneJob's status with the pod's credential; off for local runs.",
    )
    min_interval_seconds: float = Field(
        default=5.0, description="At most one status write per this many seconds.", ge=0.0
    )


class TrainerConfig(ApiModel):
    """Everything one training process needs to know."""

    job: JobRef | None = Field(default=None, description="The FineTuneJob to report to.")
    spec: FineTuneJobSpec = Field(description="The FineTuneJob's spec, as the operator saw it.")
    paths: TrainerPaths = Field(description="Resolved inputs and outputs.")
    reporting: ReportingSpec = Field(
        default_factory=ReportingSpec, description="Progress reporting."
    )


# --- issue 10 (pre-flight check): begin
class PreflightResult(ApiModel):
    """What the pre-flight pod found: the Validated condition's status, reason and message.

    Written as one JSON object into the pre-flight container's termination message; the GPU
    memory it compared with came in api.contract.PreflightEnv."""

    validated: bool = Field(description="True: start training; False: refuse the job.")
    reason: ValidatedReason = Field(description="The Validated condition's reason.")
    message: str = Field(default="", description="The condition's message.", max_length=3000)
    plan: MemoryPlan | None = Field(default=None, description="The memory plan, when computed.")


# --- issue 10 (pre-flight check): end
