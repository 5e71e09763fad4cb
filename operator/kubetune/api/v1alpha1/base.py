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
# looser pattern let "1.2.3" through the CRD to fail only when the Job was created. The exponent
# has at most two digits: Kubernetes caps every quantity at 2^63-1 anyway, and the API server (as
# of v1.36) spins until its request deadline on an exponent as large as "1e2147483647" in a Pod
# or Deployment (every retry of the operator would hang a server thread for a minute).
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]{1,2})?$"
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]
DNS1123_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# What Kubernetes takes as a label value, and as a label key or other qualified name (an optional
# DNS-subdomain prefix and a slash, then a name of at most 63 characters). Pod fields the spec
# passes through (nodeSelector, tolerations, the Kueue label) are checked with them, so the CRD
# refuses what the pods' validation would only refuse after the operator built them.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_SUBDOMAIN = DNS1123_NAME_PATTERN.removeprefix("^").removesuffix("$")
QUALIFIED_NAME_PATTERN = rf"^({_SUBDOMAIN}/)?{_NAME}$"
# An extended resource (nvidia.com/gpu, nvidia.com/mig-1g.10gb): a qualified name with a prefix.
RESOURCE_NAME_PATTERN = rf"^{_SUBDOMAIN}/{_NAME}$"
# A container image reference: not empty, printable ASCII without spaces (written as a class, not
# \S, so that Python, pydantic's Rust engine and the API server's Go engine agree on it).
IMAGE_PATTERN = r"^[!-~]+$"
_PREFIX_RULE = "(!{0}.contains('/') || {0}.matches('^[^/]{{1,253}}/'))"


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


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    ALL = ""
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A core/v1 Toleration, passed through to the pods unchanged."""

    key: str | None = Field(
        default=None,
        description="Taint key the toleration applies to; empty (with Exists) for every key.",
        pattern=rf"^$|{QUALIFIED_NAME_PATTERN}",
        max_length=317,
    )
    operator: TolerationOperator | None = Field(
        default=None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(
        default=None,
        description="Taint value the toleration matches.",
        pattern=LABEL_VALUE_PATTERN,
        max_length=63,
    )
    effect: TaintEffect | None = Field(
        default=None, description="NoSchedule, PreferNoSchedule or NoExecute; empty for all."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.key) || " + _PREFIX_RULE.format("self.key"),
                    "message": "the key's prefix (before '/') has at most 253 characters",
                    "fieldPath": ".key",
                },
                {
                    "rule": "(has(self.key) && self.key != '') || "
                    "(has(self.operator) && self.operator == 'Exists')",
                    "message": "a toleration without a key needs operator Exists",
                    "fieldPath": ".operator",
                },
                {
                    "rule": "!has(self.operator) || self.operator != 'Exists' || "
                    "!has(self.value) || self.value == ''",
                    "message": "a toleration with operator Exists matches every value: no value",
                    "fieldPath": ".value",
                },
                {
                    "rule": "!has(self.tolerationSeconds) || "
                    "(has(self.effect) && self.effect == 'NoExecute')",
                    "message": "tolerationSeconds is only for effect NoExecute",
                    "fieldPath": ".effect",
                },
            ]
        }
    }


def _passed_through(what: str) -> Any:
    return Field(
        default=None,
        description=f"A core/v1 {what}, passed through to the pods unchanged.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class Affinity(ApiModel):
    """A core/v1 Affinity. Its three parts are passed through unchanged (the pods' validation
    judges them); anything else is refused."""

    node_affinity: dict[str, Any] | None = _passed_through("NodeAffinity")
    pod_affinity: dict[str, Any] | None = _passed_through("PodAffinity")
    pod_anti_affinity: dict[str, Any] | None = _passed_through("PodAntiAffinity")


LabelMap = dict[str, Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]]


def label_map(description: str) -> Any:
    """A field of labels ({key: value}) as Kubernetes takes them: values by pattern, keys by a
    CEL rule (a structural schema cannot constrain property names)."""
    return Field(
        default_factory=dict,
        description=description,
        max_length=64,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.all(k, k.matches(r'{QUALIFIED_NAME_PATTERN}') && "
                    + _PREFIX_RULE.format("k")
                    + ")",
                    "message": "every key must be a label key: an optional DNS-subdomain "
                    "prefix and '/', then a name of at most 63 letters, digits, '-', '_', '.'",
                }
            ]
        },
    )


class SchedulingSpec(ApiModel):
    """Where the pods may run. Passed through to the pod template."""

    node_selector: LabelMap = label_map("Node labels the pods must match.")
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for tainted (e.g. GPU) nodes.", max_length=32
    )
    affinity: Affinity | None = Field(
        default=None,
        description="A core/v1 Affinity (node, pod and anti-affinity), passed through unchanged.",
    )
    priority_class_name: str | None = Field(
        default=None,
        description="PriorityClass of the pods.",
        max_length=253,
        pattern=DNS1123_NAME_PATTERN,
    )
