"""Hypothesis strategies for kubetune specs, derived from the typed API (the truth), not from the
CRDs (whose faithfulness is what the tests check).

- `invalid_specs(kind)`: a full, valid spec with exactly one thing broken, and the field path
  (as the API server writes it, `spec.resources.tolerations[0].key`) that the refusal must name.
  What is broken is drawn from every constraint the pydantic model states — types, bounds,
  lengths, patterns, enums, list sizes, required fields, unknown fields — plus the CEL rules,
  which only the CRD enforces.
- `valid_specs(kind)`: specs the model accepts, varying every field that reaches a pod.
- `children(kind, spec)`: what the builders make of a spec.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from hypothesis import HealthCheck, reject, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from kubetune.api.v1alpha1 import FineTuneJob, ModelServer
from kubetune.api.v1alpha1.base import LABEL_VALUE_PATTERN, QUALIFIED_NAME_PATTERN, QUANTITY_PATTERN
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec
from kubetune.api.v1alpha1.modelserver import ModelServerSpec
from kubetune.builders import serving, training
from kubetune.builders.common import Owner, Settings
from kubetune.builders.preflight import build_preflight_job
from kubetune.builders.serving import ResolvedModel

INT_LIMIT = 2**53  # exact in JSON on both sides


def examples(count: int) -> settings:
    """Hypothesis settings for the spec properties: `count` examples, the same ones on every run
    (derandomized, so a CI failure reproduces), no deadline (a loaded machine is no bug)."""
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


FTJ_BASE: dict[str, Any] = {
    "model": {
        "source": "hf://sentence-transformers/all-MiniLM-L6-v2",
        "revision": "main",
        "secretRef": {"name": "hub-token"},
    },
    "dataset": {
        "source": "pvc://datasets/intents.jsonl",
        "format": "jsonl",
        "textField": "text",
        "labelField": "label",
        "validationSplit": 0.1,
        "secretRef": {"name": "data-creds"},
    },
    "task": "sequence-classification",
    "method": "lora",
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["query"], "merge": True},
    "hyperparameters": {
        "epochs": 1,
        "learningRate": 5e-5,
        "batchSize": 16,
        "maxSeqLength": 128,
        "warmupRatio": 0.1,
        "weightDecay": 0.01,
        "gradientAccumulationSteps": 1,
        "seed": 42,
        "precision": "bf16",
    },
    "resources": {
        "nodes": 2,
        "gpusPerNode": 4,
        "gpuResourceName": "nvidia.com/gpu",
        "cpu": "8",
        "memory": "64Gi",
        "shmSize": "2Gi",
        "nodeSelector": {"pool": "h100"},
        "tolerations": [
            {
                "key": "dedicated",
                "operator": "Equal",
                "value": "ml",
                "effect": "NoExecute",
                "tolerationSeconds": 60,
            }
        ],
        "affinity": {"nodeAffinity": {}, "podAntiAffinity": {}},
        "priorityClassName": "training",
    },
    "output": {"uri": "s3://bucket/out", "triton": True, "secretRef": {"name": "s3-creds"}},
    "checkpointing": {"enabled": True, "everySteps": 200, "keepLast": 2},
    "runPolicy": {
        "backoffLimit": 3,
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 600,
        "suspend": False,
    },
    "queueName": "team-a",
    "image": "example.test/trainer:1",
}

MS_SOURCE_BASE: dict[str, Any] = {
    "model": {
        "source": "s3://bucket/triton/small",
        "name": "small_model",
        "secretRef": {"name": "s3"},
    },
    "triton": {
        "image": "example.test/triton:1",
        "maxBatchSize": 32,
        "dynamicBatching": {
            "enabled": True,
            "maxQueueDelayMicroseconds": 2000,
            "preferredBatchSizes": [8, 16],
        },
        "instanceCount": 1,
        "modelControlMode": "none",
        "shmSize": "1Gi",
    },
    "resources": {
        "gpus": 1,
        "gpuResourceName": "nvidia.com/gpu",
        "cpu": "2",
        "memory": "8Gi",
        "nodeSelector": {"pool": "serving"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "serving",
    },
    "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "metric": "queue-time", "target": 50000},
    "rollout": {"strategy": "surge", "smokeTest": {"enabled": True, "text": "hi"}},
    "service": {"type": "ClusterIP", "httpPort": 8000, "grpcPort": 8001, "metricsPort": 8002},
    "networkPolicy": {
        "sources": [
            {"namespace": "apps", "podLabels": {"app": "client"}},
            {"namespaceLabels": {"team": "search"}},
            {"podLabels": {"role": "gateway"}},
        ]
    },
}

MS_REF_BASE: dict[str, Any] = {
    "model": {"fineTuneJobRef": {"name": "intents"}},
    "replicas": 2,
    "rollout": {"strategy": "replace", "smokeTest": {"expectedLabel": "billing"}},
}

MODELS: dict[str, type[BaseModel]] = {
    "FineTuneJob": FineTuneJobSpec,
    "ModelServer": ModelServerSpec,
}
BASES: dict[str, list[dict[str, Any]]] = {
    "FineTuneJob": [FTJ_BASE],
    "ModelServer": [MS_SOURCE_BASE, MS_REF_BASE],
}

# Rules only the CRD states (CEL): (kind, base index, set these dotted paths, delete these, the
# field the refusal names).
CEL_BREAKS: list[tuple[str, int, dict[str, Any], list[str], str]] = [
    ("FineTuneJob", 0, {"method": "full"}, [], "spec.lora"),
    ("ModelServer", 0, {"replicas": 3}, [], "spec"),
    ("ModelServer", 0, {"autoscaling.minReplicas": 7}, [], "spec.autoscaling"),
    ("ModelServer", 0, {"model.fineTuneJobRef": {"name": "x"}}, [], "spec.model"),
    ("ModelServer", 1, {}, ["model.fineTuneJobRef"], "spec.model"),
    ("ModelServer", 1, {"model.revision": "v2"}, [], "spec.model"),
    (
        "ModelServer",
        0,
        {"model.source": "hf://org/name@main", "model.revision": "abc"},
        [],
        "spec.model",
    ),
    ("ModelServer", 0, {"service.grpcPort": 8000}, [], "spec.service"),
    ("ModelServer", 0, {"networkPolicy.sources": [{}]}, [], "spec.networkPolicy.sources[0]"),
    (
        "ModelServer",
        0,
        {"networkPolicy.sources": [{"namespace": "a", "namespaceLabels": {"t": "b"}}]},
        [],
        "spec.networkPolicy.sources[0]",
    ),
    (
        "ModelServer",
        0,
        {"networkPolicy.sources": [{"podLabels": {"a key": "v"}}]},
        [],
        "spec.networkPolicy.sources[0].podLabels",
    ),
    (
        "ModelServer",
        0,
        {"resources.nodeSelector": {"x/y/z": "v"}},
        [],
        "spec.resources.nodeSelector",
    ),
    (
        "FineTuneJob",
        0,
        {"resources.nodeSelector": {"a key": "v"}},
        [],
        "spec.resources.nodeSelector",
    ),
    (
        "FineTuneJob",
        0,
        {"resources.tolerations": [{"operator": "Equal", "value": "v"}]},
        [],
        "spec.resources.tolerations[0].operator",
    ),
    (
        "FineTuneJob",
        0,
        {"resources.tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        [],
        "spec.resources.tolerations[0].value",
    ),
    (
        "FineTuneJob",
        0,
        {"resources.tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]},
        [],
        "spec.resources.tolerations[0].effect",
    ),
    (
        "FineTuneJob",
        0,
        {"resources.tolerations": [{"key": "a" * 254 + "/b", "operator": "Exists"}]},
        [],
        "spec.resources.tolerations[0].key",
    ),
]


@dataclass(frozen=True)
class Broken:
    kind: str
    spec: dict[str, Any]
    field: str  # the path the API server's message must name
    what: str  # what was broken, for the failure report

    def body(self, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": self.kind,
            "metadata": {"name": name},
            "spec": self.spec,
        }


# -- the model's schema, resolved --------------------------------------------------------------


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """$ref inlined, `anyOf [X, null]` (an optional) turned into X."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**_resolve(options[0], defs), **rest}
    return node


@dataclass(frozen=True)
class Site:
    """A place in the base spec where one constraint can be broken."""

    path: tuple[str | int, ...]  # inside spec
    schema: dict[str, Any]
    parent_required: tuple[str, ...]
    present: bool


def k8s_path(path: tuple[str | int, ...]) -> str:
    out = "spec"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _sites(
    node: dict[str, Any],
    value: Any,
    path: tuple[str | int, ...],
    defs: dict[str, Any],
    required: tuple[str, ...] = (),
    present: bool = True,
) -> Iterator[Site]:
    node = _resolve(node, defs)
    if "items" in node:
        node = {**node, "items": _resolve(node["items"], defs)}
    yield Site(path, node, required, present)
    if not present:
        return
    if "properties" in node:
        for key, child in node["properties"].items():
            yield from _sites(
                child,
                (value or {}).get(key),
                (*path, key),
                defs,
                tuple(node.get("required", ())),
                isinstance(value, dict) and key in value,
            )
    elif node.get("type") == "array" and isinstance(value, list) and value:
        yield from _sites(node["items"], value[0], (*path, 0), defs)
    elif isinstance(node.get("additionalProperties"), dict) and isinstance(value, dict) and value:
        key = next(iter(value))
        yield from _sites(node["additionalProperties"], value[key], (*path, key), defs)


@cache
def sites(kind: str, index: int) -> list[Site]:
    """Every site of the kind's base spec number `index`."""
    schema = MODELS[kind].model_json_schema(by_alias=True)
    return list(_sites(schema, BASES[kind][index], (), schema.get("$defs", {})))


@cache
def _breaks(kind: str, index: int) -> list[tuple[Site, str, st.SearchStrategy[Any]]]:
    return [
        (site, what, strategy)
        for site in sites(kind, index)
        for what, strategy in _breakers(site)
        # the spec as a whole: only an unknown field applies
        if site.path or what == "an unknown field"
    ]


# -- breaking one thing --------------------------------------------------------------------------

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
_OTHER_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "integer": st.one_of(
        _TEXT.filter(lambda s: not re.fullmatch(r"\s*[+-]?\d+(\.0*)?\s*", s)),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
        st.lists(st.integers(), max_size=2),
        st.just({"a": 1}),
    ),
    "number": st.one_of(
        _TEXT.filter(
            lambda s: not re.fullmatch(r"\s*[-+0-9.eE_]+\s*|\s*(inf|nan|infinity)\s*", s, re.I)
        ),
        st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=2),
        st.just({"a": 1}),
    ),
    "string": st.one_of(
        st.integers(-INT_LIMIT, INT_LIMIT), st.booleans(), st.lists(_TEXT, max_size=2), st.just({})
    ),
    "boolean": st.one_of(
        _TEXT.filter(
            lambda s: (
                s.strip().lower()
                not in {"0", "1", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n"}
            )
        ),
        st.integers(2, 100),
        st.just([True]),
    ),
    "object": st.one_of(_TEXT, st.integers(), st.lists(st.integers(), max_size=2)),
    "array": st.one_of(_TEXT, st.integers(), st.just({"a": 1})),
}


def _breakers(site: Site) -> list[tuple[str, st.SearchStrategy[Any]]]:
    """(what, strategy of a replacement value) for each constraint at this site. A strategy of
    `_DELETE` removes the field; `_UNKNOWN` adds a field the schema does not declare."""
    s = site.schema
    kind = s.get("type")
    out: list[tuple[str, st.SearchStrategy[Any]]] = []
    if kind in _OTHER_TYPES:
        out.append((f"not a {kind}", _OTHER_TYPES[kind]))
    if "enum" in s:
        enum = set(s["enum"])
        out.append(("not in the enum", _TEXT.filter(lambda v: v not in enum)))
    if kind == "integer":
        if "minimum" in s:
            out.append(("below minimum", st.integers(-INT_LIMIT, s["minimum"] - 1)))
        if "maximum" in s:
            out.append(("above maximum", st.integers(s["maximum"] + 1, INT_LIMIT)))
    if kind == "number":
        bounded = {"allow_nan": False, "allow_infinity": False}
        if "minimum" in s:
            out.append(
                ("below minimum", st.floats(-1e9, s["minimum"], exclude_max=True, **bounded))
            )
        if "exclusiveMinimum" in s:
            out.append(
                ("not above exclusiveMinimum", st.floats(-1e9, s["exclusiveMinimum"], **bounded))
            )
        if "maximum" in s:
            out.append(("above maximum", st.floats(s["maximum"], 1e9, exclude_min=True, **bounded)))
        if "exclusiveMaximum" in s:
            out.append(
                ("not below exclusiveMaximum", st.floats(s["exclusiveMaximum"], 1e9, **bounded))
            )
    if kind == "string":
        if "maxLength" in s:
            n = s["maxLength"]
            out.append(("too long", st.text("abc-", min_size=n + 1, max_size=n + 8)))
        if s.get("minLength"):
            out.append(("too short", st.just("")))
        if "pattern" in s:
            pattern = re.compile(s["pattern"])
            out.append(("not matching the pattern", _TEXT.filter(lambda v: not pattern.search(v))))
            if s["pattern"] == QUANTITY_PATTERN:
                # Kubernetes' own grammar takes these; the API server spins on them (base.py).
                huge = st.sampled_from(["1e2147483647", "70e203368790117", "+.27E2792766099"])
                out.append(("a quantity with a huge exponent", huge))
    if kind == "array" and "maxItems" in s:
        n = s["maxItems"]
        item = {"integer": 8, "string": "query"}.get(s["items"].get("type", ""), {})
        out.append(("too many items", st.integers(n + 1, n + 4).map(lambda k: [item] * k)))
    if kind == "object" and s.get("additionalProperties") is False and site.present:
        known = set(s.get("properties", {}))
        names = st.from_regex(r"\A[a-z][a-zA-Z0-9]{0,11}\Z").filter(lambda k: k not in known)
        out.append(("an unknown field", names.map(lambda k: (_UNKNOWN, k))))
    if site.present and site.path and site.path[-1] in site.parent_required:
        out.append(("a required field missing", st.just(_DELETE)))
    return out


_DELETE = object()
_UNKNOWN = object()


def _set(spec: dict[str, Any], path: tuple[str | int, ...], value: Any) -> str:
    """Apply one break; return the path the refusal names."""
    target: Any = spec
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
        return k8s_path(path)
    if isinstance(value, tuple) and value and value[0] is _UNKNOWN:
        holder = target[path[-1]] if path else spec
        holder[value[1]] = "x"
        return k8s_path((*path, value[1]))
    if not path:
        raise AssertionError("the spec itself is replaced only by type breaks")
    target[path[-1]] = value
    return k8s_path(path)


def _rejected_by_model(kind: str, spec: dict[str, Any]) -> bool:
    try:
        MODELS[kind].model_validate(spec)
    except ValidationError:
        return True
    return False


@st.composite
def invalid_specs(draw: st.DrawFn, kind: str) -> Broken:
    bases = BASES[kind]
    index = draw(st.integers(0, len(bases) - 1))
    base = bases[index]
    site, what, strategy = draw(st.sampled_from(_breaks(kind, index)))
    spec = copy.deepcopy(base)
    field = _set(spec, site.path, draw(strategy))
    # A break the model would let through is not a break: the generator must not produce one.
    if not _rejected_by_model(kind, spec):
        raise AssertionError(f"the model accepts {k8s_path(site.path)} {what}: {spec}")
    return Broken(kind, spec, field, f"{k8s_path(site.path)} {what}")


def cel_breaks(kind: str) -> list[Broken]:
    """The CRD-only rules, each broken once."""
    out = []
    for rule_kind, index, sets, deletes, field in CEL_BREAKS:
        if rule_kind != kind:
            continue
        spec = copy.deepcopy(BASES[kind][index])
        for dotted, value in sets.items():
            *head, last = dotted.split(".")
            target = spec
            for part in head:
                target = target[part]
            target[last] = value
        for dotted in deletes:
            *head, last = dotted.split(".")
            target = spec
            for part in head:
                target = target[part]
            del target[last]
        out.append(Broken(kind, spec, field, f"CEL rule on {field}"))
    return out


# -- valid specs -----------------------------------------------------------------------------------

# Label keys and values as Kubernetes takes them, some spelled like the pod fields that must never
# reach a pod from the spec.
_LABEL_KEYS = st.sampled_from(["hostPath", "privileged", "hostNetwork", "capabilities"]) | (
    st.from_regex(QUALIFIED_NAME_PATTERN, fullmatch=True).filter(
        lambda k: len(k.partition("/")[0]) <= 253
    )
)
_LABEL_VALUES = st.from_regex(LABEL_VALUE_PATTERN, fullmatch=True).filter(
    lambda v: 0 < len(v) <= 63
)
_NODE_AFFINITY = st.builds(
    lambda key, values: {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": key, "operator": "In", "values": values}]}
            ]
        }
    },
    _LABEL_KEYS,
    st.lists(_LABEL_VALUES, min_size=1, max_size=3),
)
_POD_AFFINITY = st.builds(
    lambda weight, labels: {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": weight,
                "podAffinityTerm": {
                    "labelSelector": {"matchLabels": labels},
                    "topologyKey": "kubernetes.io/hostname",
                },
            }
        ]
    },
    st.integers(1, 100),
    st.dictionaries(_LABEL_KEYS, _LABEL_VALUES, min_size=1, max_size=3),
)
# The parts of a pod spec that the API passes through unchanged, as valid core/v1 values.
_PASSED_THROUGH = {
    "nodeAffinity": _NODE_AFFINITY,
    "podAffinity": _POD_AFFINITY,
    "podAntiAffinity": _POD_AFFINITY,
}


def _valid_value(site: Site) -> st.SearchStrategy[Any] | None:
    """A strategy of values the schema allows at this site, or None to keep the base's."""
    s = site.schema
    kind = s.get("type")
    if "enum" in s:
        return st.sampled_from(s["enum"])
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(s.get("minimum", -(2**31)), s.get("maximum", 2**31))
    if kind == "number":
        return st.floats(
            s.get("minimum", s.get("exclusiveMinimum", -1e6)),
            s.get("maximum", s.get("exclusiveMaximum", 1e6)),
            exclude_min="exclusiveMinimum" in s,
            exclude_max="exclusiveMaximum" in s,
            allow_nan=False,
        )
    if kind == "string":
        longest = s.get("maxLength", 64)
        if "pattern" in s:
            strings = st.from_regex(s["pattern"], fullmatch=True)
        else:
            strings = st.text(st.characters(blacklist_categories=("Cs",)), max_size=longest)
        return strings.filter(lambda v: s.get("minLength", 0) <= len(v) <= longest)
    if kind == "object" and s.get("x-kubernetes-preserve-unknown-fields"):
        return _PASSED_THROUGH[str(site.path[-1])]
    if kind == "object" and isinstance(s.get("additionalProperties"), dict):  # nodeSelector
        values = _valid_value(Site((), s["additionalProperties"], (), True))
        return st.dictionaries(_LABEL_KEYS, values if values is not None else _TEXT, max_size=3)
    return None


def _cel_holds(kind: str, spec: dict[str, Any]) -> bool:
    """The CRD's CEL rules (the API server refuses the rest before any builder sees them)."""
    if kind == "FineTuneJob":
        return "lora" not in spec or spec.get("method") == "lora"
    scaling = spec.get("autoscaling") or {}
    model = spec.get("model") or {}
    sources = (spec.get("networkPolicy") or {}).get("sources") or []
    return (
        all(
            ("namespace" in s or s.get("namespaceLabels") or s.get("podLabels"))
            and not ("namespace" in s and s.get("namespaceLabels"))
            for s in sources
        )
        and not ("replicas" in spec and "autoscaling" in spec)
        and scaling.get("minReplicas", 1) <= scaling.get("maxReplicas", 1000)
        and ("fineTuneJobRef" in model) != ("source" in model)
    )


@cache
def _changeable(kind: str, index: int) -> list[tuple[Site, st.SearchStrategy[Any]]]:
    return [
        (site, strategy)
        for site in sites(kind, index)
        if site.path and site.present and (strategy := _valid_value(site)) is not None
    ]


@st.composite
def valid_specs(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A base spec with any number of its fields (and every field that reaches a pod among
    them) replaced by values the model and the CRD's rules allow."""
    index = draw(st.integers(0, len(BASES[kind]) - 1))
    spec = copy.deepcopy(BASES[kind][index])
    changeable = _changeable(kind, index)
    for site, strategy in draw(st.lists(st.sampled_from(changeable), max_size=12, unique_by=id)):
        _set(spec, site.path, draw(strategy))
    if _rejected_by_model(kind, spec) or not _cel_holds(kind, spec):
        reject()
    return spec


# -- what the builders make of a spec --------------------------------------------------------------

SETTINGS = Settings(trainer_image="example.test/trainer:1", fetcher_image="example.test/fetcher:1")


def children(kind: str, spec: dict[str, Any], namespace: str = "ns") -> list[dict[str, Any]]:
    """The children the builders make of a resource `x` with this spec (a ModelServer serves
    its source, or a FineTuneJob's output; a FineTuneJob's pre-flight Job included)."""
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": namespace, "uid": "u", "generation": 1},
        "spec": spec,
    }
    owner = Owner.from_body(body)
    if kind == "FineTuneJob":
        ftj = FineTuneJob.model_validate(body)
        preflight = build_preflight_job(ftj, owner, SETTINGS, 80 * 2**30, "test")
        return [*training.build_children(ftj, owner, SETTINGS), preflight]
    ms = ModelServer.model_validate(body)
    uri = ms.spec.model.source or "pvc://models/out/x/triton-repository"
    model = ResolvedModel(uri=uri, revision="r1", task="sequence-classification")
    built, _ = serving.build_children(ms, owner, model, SETTINGS, spare_gpus=1)
    return built
