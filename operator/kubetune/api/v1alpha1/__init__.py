"""kubetune.io/v1alpha1: FineTuneJob and ModelServer."""

from kubetune.api.v1alpha1 import finetunejob, modelserver
from kubetune.api.v1alpha1.base import API_VERSION, GROUP, VERSION, Condition, ConditionStatus
from kubetune.api.v1alpha1.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.v1alpha1.modelserver import ModelServer, ModelServerSpec, ModelServerStatus
from kubetune.api.v1alpha1.trainerconfig import TrainerConfig

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "ConditionStatus",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ModelServer",
    "ModelServerSpec",
    "ModelServerStatus",
    "TrainerConfig",
    "finetunejob",
    "modelserver",
]
