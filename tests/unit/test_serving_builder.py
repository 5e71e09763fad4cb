from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api.v1alpha1 import ModelServer
from kubetune.api.v1alpha1.modelserver import SMOKE_TEST_CONDITION
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import (
    ResolvedModel,
    build_deployment,
    build_hpa,
    desired_replicas,
    quantity_bytes,
    rollout_strategy,
    runtime,
    shm_size,
)


def ms(**spec: Any) -> ModelServer:
    base: dict[str, Any] = {"model": {"source": "pvc://m/r"}}
    base.update(spec)
    return ModelServer.model_validate({"metadata": {"name": "x"}, "spec": base})


@pytest.mark.parametrize(
    ("gpus", "spare", "strategy", "surge"),
    [
        (1, 1, "auto", 1),
        (1, 0, "auto", 0),
        (2, 1, "auto", 0),
        (0, 0, "auto", 1),
        (1, 0, "surge", 1),
        (1, 8, "replace", 0),
    ],
)
def test_rollout_surges_only_when_a_gpu_is_free(
    gpus: int, spare: int, strategy: str, surge: int
) -> None:
    spec = ms(resources={"gpus": gpus}, rollout={"strategy": strategy}).spec
    update = rollout_strategy(spec, spare)["rollingUpdate"]
    assert update["maxSurge"] == surge
    assert update["maxUnavailable"] == 1 - surge


def test_replicas_are_left_to_the_autoscaler() -> None:
    assert desired_replicas(ms().spec) == 1
    assert desired_replicas(ms(replicas=3).spec) == 3
    assert desired_replicas(ms(autoscaling={"maxReplicas": 4, "target": 5}).spec) is None


# --- the vllm runtime (issue 11) ---------------------------------------------------------------


CAUSAL = ResolvedModel(uri="pvc://models/llm", revision="ftj-1", task="causal-lm")
CLASSIFIER = ResolvedModel(uri="pvc://models/cls", revision="ftj-2", task="sequence-classification")
SOURCE = ResolvedModel(uri="pvc://models/any", revision="source-1", task="auto")
OWNER = Owner("kubetune.io/v1alpha1", "ModelServer", "x", "default", "u")
SETTINGS = Settings(vllm_image="example.test/vllm:1", triton_image="example.test/triton:1")


def deployment(server: ModelServer, model: ResolvedModel, **settings: Any) -> dict[str, Any]:
    chosen = Settings(**{**SETTINGS.__dict__, **settings})
    return build_deployment(server, OWNER, model, chosen, spare_gpus=0)


def containers(deploy: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = deploy["spec"]["template"]["spec"]
    return pod["initContainers"][0], pod["containers"][0]


def test_runtime_defaults_by_task() -> None:
    assert runtime(ms().spec, CAUSAL) == "vllm"
    assert runtime(ms().spec, CLASSIFIER) == "python"
    assert runtime(ms().spec, SOURCE) == "python"  # a source's task is known only once fetched
    assert runtime(ms(runtime="python").spec, CAUSAL) == "python"
    assert runtime(ms(runtime="vllm").spec, SOURCE) == "vllm"


def test_image_follows_the_runtime_unless_the_spec_names_one() -> None:
    assert containers(deployment(ms(), CAUSAL))[1]["image"] == "example.test/vllm:1"
    assert containers(deployment(ms(), CLASSIFIER))[1]["image"] == "example.test/triton:1"
    pinned = ms(triton={"image": "example.test/mine:2"})
    assert containers(deployment(pinned, CAUSAL))[1]["image"] == "example.test/mine:2"


def test_a_tensor_parallel_replica_requests_its_gpus_and_shards_over_them() -> None:
    server = ms(resources={"gpus": 4}, vllm={"maxModelLen": 4096, "dtype": "bfloat16"})
    fetch, triton = containers(deployment(server, CAUSAL))
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "--runtime=vllm" in fetch["args"]
    assert "--tensor-parallel-size=4" in fetch["args"]
    [engine] = [a.removeprefix("--vllm=") for a in fetch["args"] if a.startswith("--vllm=")]
    assert json.loads(engine)["maxModelLen"] == 4096
    assert json.loads(engine)["dtype"] == "bfloat16"
    env = {e["name"]: e["value"] for e in triton["env"]}
    assert env["HOME"] == "/tmp"  # the root filesystem is read-only
    assert env["HF_HUB_OFFLINE"] == "1"


def test_shm_grows_with_tensor_parallelism() -> None:
    assert shm_size(ms(resources={"gpus": 1}).spec, CAUSAL) == "1Gi"
    assert shm_size(ms(resources={"gpus": 4}).spec, CAUSAL) == "8Gi"
    assert shm_size(ms(resources={"gpus": 4}).spec, CLASSIFIER) == "1Gi"  # python backend
    big = ms(resources={"gpus": 2}, triton={"shmSize": "16Gi"}).spec
    assert shm_size(big, CAUSAL) == "16Gi"  # a larger wish is kept
    volumes = deployment(ms(resources={"gpus": 2}), CAUSAL)["spec"]["template"]["spec"]["volumes"]
    [dshm] = [v for v in volumes if v["name"] == "dshm"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert [quantity_bytes(q) for q in ("1Gi", "512M", "1048576")] == [2**30, 512 * 10**6, 2**20]


def test_the_python_runtime_gets_no_vllm_arguments() -> None:
    fetch, triton = containers(deployment(ms(), CLASSIFIER))
    assert not [a for a in fetch["args"] if "vllm" in a or "tensor-parallel" in a]
    assert "env" not in triton


def test_lora_adapters_reach_the_fetcher() -> None:
    model = ResolvedModel(
        uri="hf://org/base",
        revision="ftj-3",
        task="causal-lm",
        lora_adapters=(("support", "pvc://models/out/support"),),
    )
    fetch, _ = containers(deployment(ms(), model))
    assert "--lora-adapter=support=pvc://models/out/support" in fetch["args"]


@pytest.mark.parametrize(
    ("metric", "model", "name"),
    [
        ("queue-time", CAUSAL, "vllm_time_to_first_token_us"),  # vLLM queues in its engine
        ("queue-time", CLASSIFIER, "triton_queue_time_per_request_us"),
        ("generation-tokens-per-second", CAUSAL, "vllm_generation_tokens_per_second"),
        ("pending-requests", CLASSIFIER, "nv_inference_pending_request_count"),
    ],
)
def test_autoscaling_metric_by_runtime(metric: str, model: ResolvedModel, name: str) -> None:
    server = ms(autoscaling={"maxReplicas": 3, "target": 100, "metric": metric})
    hpa = build_hpa(server, OWNER, model)
    assert hpa is not None
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == name


def test_scale_down_waits_the_given_window_and_scale_up_none() -> None:
    default = build_hpa(ms(autoscaling={"maxReplicas": 3, "target": 100}), OWNER, CLASSIFIER)
    short = build_hpa(
        ms(autoscaling={"maxReplicas": 3, "target": 100, "scaleDownStabilizationSeconds": 15}),
        OWNER,
        CLASSIFIER,
    )
    assert default is not None and short is not None
    assert default["spec"]["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 300}
    assert short["spec"]["behavior"] == {
        "scaleUp": {"stabilizationWindowSeconds": 0},
        "scaleDown": {"stabilizationWindowSeconds": 15},
    }


def test_the_readiness_gate_unless_turned_off_or_no_smoke_test() -> None:
    gated = deployment(ms(), CAUSAL)["spec"]["template"]["spec"]
    assert gated["readinessGates"] == [{"conditionType": SMOKE_TEST_CONDITION}]
    ungated = deployment(ms(), CAUSAL, smoke_test_gate=False)["spec"]["template"]["spec"]
    assert "readinessGates" not in ungated
    off = ms(rollout={"smokeTest": {"enabled": False}})
    assert (
        "readinessGates"
        not in deployment(off, CAUSAL, smoke_test_gate=True)["spec"]["template"]["spec"]
    )
