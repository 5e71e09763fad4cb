"""The vllm runtime's repository: config.pbtxt (parsed with Triton's own ModelConfig schema),
model.json from spec.vllm and the replica's GPUs, LoRA adapters, and what is refused before a
pod would crash on it. The e2e tests (tests/e2e/test_serving_vllm.py) serve such a repository
with the real vLLM engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kubetune.api.v1alpha1.modelserver import VllmDtype, VllmSpec
from kubetune.serving.repository import (
    read_manifest,
    render_config_pbtxt,
    render_vllm_config_pbtxt,
    vllm_engine_args,
    write_vllm_repository,
)


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    folder = tmp_path / "llama"
    folder.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 8,
        "max_position_embeddings": 4096,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "optimizer.pt").write_bytes(b"state")
    return folder


def adapter(tmp_path: Path, name: str, rank: int) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"lora")
    return folder


def test_config_is_decoupled_vllm_without_triton_batching() -> None:
    config = parse(render_vllm_config_pbtxt("chat"))
    assert config.backend == "vllm"
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0
    [group] = config.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_MODEL
    assert group.count == 1
    inputs = {i.name: i for i in config.input}
    assert not inputs["text_input"].optional
    assert inputs["stream"].optional
    assert inputs["stream"].data_type == model_config_pb2.TYPE_BOOL
    assert [o.name for o in config.output] == ["text_output"]
    assert config.parameters["REPORT_CUSTOM_METRICS"].string_value == "true"


def test_python_backend_causal_lm_is_decoupled_with_an_optional_stream_input() -> None:
    config = parse(render_config_pbtxt("writer", "causal-lm"))
    assert config.model_transaction_policy.decoupled
    stream = {i.name: i for i in config.input}["STREAM"]
    assert stream.optional
    assert stream.data_type == model_config_pb2.TYPE_BOOL
    classifier = parse(render_config_pbtxt("intents", "sequence-classification"))
    assert not classifier.model_transaction_policy.decoupled
    assert [i.name for i in classifier.input] == ["TEXT"]


def test_engine_args_from_the_spec_and_the_gpus() -> None:
    spec = VllmSpec(
        max_model_len=8192,
        gpu_memory_utilization=0.8,
        max_num_seqs=64,
        dtype=VllmDtype.BFLOAT16,
        enforce_eager=True,
    )
    args = vllm_engine_args("/m/1/hf", spec, tensor_parallel_size=4)
    assert args == {
        "model": "/m/1/hf",
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.8,
        "max_num_seqs": 64,
        "dtype": "bfloat16",
        "enforce_eager": True,
        "disable_log_stats": False,
        "max_model_len": 8192,
    }
    assert "max_model_len" not in vllm_engine_args("/m", VllmSpec())
    with pytest.raises(ValueError, match="at least 1"):
        vllm_engine_args("/m", VllmSpec(), tensor_parallel_size=0)


def test_repository_layout_and_model_json(llama: Path, tmp_path: Path) -> None:
    out = write_vllm_repository(
        llama, tmp_path / "repo", "chat", VllmSpec(max_model_len=2048), tensor_parallel_size=2
    )
    assert parse((out / "config.pbtxt").read_text()).name == "chat"
    engine = json.loads((out / "1" / "model.json").read_text())
    assert engine["tensor_parallel_size"] == 2
    assert engine["max_model_len"] == 2048
    hf = Path(engine["model"])
    assert hf.is_absolute() and hf == (out / "1" / "hf").resolve()
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert not (out / "1" / "model.py").exists()  # the backend is the image's vLLM backend
    assert not (out / "1" / "multi_lora.json").exists()
    assert read_manifest(out).task == "causal-lm"


def test_lora_adapters_are_packaged_and_enabled(llama: Path, tmp_path: Path) -> None:
    adapters = {"support": adapter(tmp_path, "a1", 8), "billing": adapter(tmp_path, "a2", 16)}
    out = write_vllm_repository(llama, tmp_path / "repo", "chat", lora_adapters=adapters)
    engine = json.loads((out / "1" / "model.json").read_text())
    assert engine["enable_lora"] is True
    assert engine["max_loras"] == 2
    assert engine["max_lora_rank"] == 16
    loras = json.loads((out / "1" / "multi_lora.json").read_text())
    assert set(loras) == {"support", "billing"}
    for name, path in loras.items():
        assert (Path(path) / "adapter_config.json").is_file(), name
        assert Path(path).parent == (out / "1" / "lora").resolve()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor_parallel_size": 3}, "spec.resources.gpus: a tensor-parallel size of 3"),
        ({"vllm": VllmSpec(max_model_len=8192)}, r"spec\.vllm\.maxModelLen"),
    ],
)
def test_what_vllm_would_refuse_in_the_pod_is_refused_here(
    llama: Path, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        write_vllm_repository(llama, tmp_path / "repo", "chat", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "repo" / "chat").exists()


def test_adapter_above_the_rank_limit_is_refused(llama: Path, tmp_path: Path) -> None:
    big = adapter(tmp_path, "big", 64)
    with pytest.raises(ValueError, match=r"rank 64, above spec.vllm.maxLoraRank \(16\)"):
        write_vllm_repository(llama, tmp_path / "repo", "chat", lora_adapters={"big": big})
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    with pytest.raises(ValueError, match=r"holds no adapter_config\.json"):
        write_vllm_repository(llama, tmp_path / "repo", "chat", lora_adapters={"x": not_adapter})


def test_a_classifier_is_refused_by_the_vllm_runtime(llama: Path, tmp_path: Path) -> None:
    config = json.loads((llama / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"use spec\.runtime: python"):
        write_vllm_repository(llama, tmp_path / "repo", "intents")
