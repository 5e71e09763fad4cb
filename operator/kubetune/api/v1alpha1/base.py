"""Shared building blocks of the v1alpha1 API: the model base class and small common types."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes quantities ("500m", "4Gi", "2"): kept as strings, checked by the API server's pattern.
# The grammar of resource.Quantity (a number, then a binary or decimal suffix or an exponent),
# without a sign: a negative request or size is refused by the pods' validation anyway, and a
# looser pattern let "1.2.3" through the CRD to fail only when the Job was created.
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]
DNS1123_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, snake_case in Python, unknown keys refused.

    Unknown keys are refused so that a typo in a config the trainer reads fails loudly; the API
    server prunes unknown fields before they ever reach the operator, so bodies parse cleanly.
    """

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready, camelCase form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A metav1.Condition: the latest observation of one aspect of the object's state."""

    type: str = Field(description="Type of condition in CamelCase, e.g. Ready.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="Machine-readable CamelCase reason for the last transition.", max_length=1024
    )
    message: str = Field(
        default="", description="Human-readable details about the transition.", max_length=32768
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the condition was set against.", ge=0
    )
    last_transition_time: datetime = Field(
        description="When the condition last changed from one status to another."
    )


class SecretRef(ApiModel):
    """A reference to a Secret in the resource's namespace. Its values never appear in status."""

    name: str = Field(
        description="Name of the Secret in the same namespace.",
        max_length=253,
        pattern=DNS1123_NAME_PATTERN,
    )


class Toleration(ApiModel):
    """A core/v1 Toleration, passed through to the pods unchanged."""

    key: str | None = Field(default=None, description="Taint key the toleration applies to.")
    operator: str | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, description="Taint value the toleration matches.")
    effect: str | None = Field(
        default=None, description="NoSchedule, PreferNoSchedule or NoExecute; empty for all."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


class SchedulingSpec(ApiModel):
    """Where the pods may run. Passed through to the pod template."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for tainted (e.g. GPU) nodes.", max_length=32
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="A core/v1 Affinity (node, pod and anti-affinity), passed through unchanged.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        default=None, description="PriorityClass of the pods.", max_length=253
    )
