"""The fetch init container on the vllm runtime, run with exactly the arguments the builder
renders for the pod: builder and fetcher agree on every flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.v1alpha1 import ModelServer
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import ResolvedModel, build_deployment
from kubetune.serving import fetch

OWNER = Owner("kubetune.io/v1alpha1", "ModelServer", "chat", "default", "u")


def llama(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 8}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def fetch_args(spec: dict[str, object], model: ResolvedModel) -> list[str]:
    server = ModelServer.model_validate({"metadata": {"name": "chat"}, "spec": spec})
    deploy = build_deployment(server, OWNER, model, Settings(), spare_gpus=0)
    [init] = deploy["spec"]["template"]["spec"]["initContainers"]
    return [a for a in init["args"] if not a.startswith(("--source=", "--dest="))]


def test_the_rendered_arguments_write_a_tensor_parallel_vllm_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = llama(tmp_path / "source")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    model = ResolvedModel(
        uri="pvc://models/base",
        revision="ftj-1",
        task="causal-lm",
        lora_adapters=(("support", str(adapter)),),
    )
    args = fetch_args(
        {
            "model": {"source": "pvc://models/base"},
            "resources": {"gpus": 2},
            "vllm": {"maxModelLen": 2048, "maxNumSeqs": 32},
        },
        model,
    )
    term = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(term))
    dest = tmp_path / "models"
    assert fetch.main([f"--source={source}", f"--dest={dest}", *args]) == 0
    engine = json.loads((dest / "chat" / "1" / "model.json").read_text())
    assert engine["tensor_parallel_size"] == 2
    assert engine["max_model_len"] == 2048
    assert engine["max_num_seqs"] == 32
    assert engine["enable_lora"] is True
    assert set(json.loads((dest / "chat" / "1" / "multi_lora.json").read_text())) == {"support"}
    assert 'backend: "vllm"' in (dest / "chat" / "config.pbtxt").read_text()
    assert term.read_text().startswith("checksum: sha256:")


def test_a_bad_engine_setting_fails_the_fetch_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = llama(tmp_path / "source")
    term = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(term))
    code = fetch.main(
        [
            f"--source={source}",
            f"--dest={tmp_path / 'models'}",
            "--model-name=chat",
            "--runtime=vllm",
            "--tensor-parallel-size=3",  # 8 heads do not split over 3 GPUs
        ]
    )
    assert code == 2
    assert "spec.resources.gpus" in term.read_text()
    assert not (tmp_path / "models" / "chat").exists()
