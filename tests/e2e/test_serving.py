"""The real Triton server serving what the real trainer produced.

One tritonserver (from the nvidia-pytriton wheel, CPU) is started for the module on two model
repositories: the one the trainer wrote for the fine-tuned classifier (``trained_classifier``,
a session fixture of tests/e2e/conftest.py), and one written here with two more models —
the same classifier with its weights corrupted after packaging, and a tiny causal LM. The server
keeps running when a model fails to load (``exit_on_error=False``), which is how a failed model
is observed from the outside.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_aio
from tests.e2e.llm_models import reference_generation
from tests.e2e.streaming import grpc_stream
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)
from tritonclient.utils import InferenceServerException

from kubetune.serving.generate import generate
from kubetune.serving.local import TritonError, TritonServer, running_triton
from kubetune.serving.repository import read_manifest, write_model_repository
from kubetune.serving.smoketest import smoke_test

DATASET = Path(__file__).resolve().parents[2] / "examples" / "data" / "support-intents.jsonl"
BROKEN = "broken-classifier"
GENERATOR = "tiny-generator"
LLAMA = "tiny-llama"
PROMPT = "my order has not arrived"
GENERATOR_POSITIONS = 64
EXAMPLES_PER_LABEL = 2
SAMPLE_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\} (?P<value>\S+)")


@pytest.fixture(scope="module")
def classifier_repository(trained_classifier: Any) -> Path:
    return Path(trained_classifier.output_dir) / "triton-repository"


@pytest.fixture(scope="module")
def classifier_name(classifier_repository: Path) -> str:
    """The model the trainer packaged (its name is the job's)."""
    [name] = [p.parent.name for p in classifier_repository.glob("*/config.pbtxt")]
    return name


@pytest.fixture(scope="module")
def classifier_hf_dir(classifier_repository: Path, classifier_name: str) -> Path:
    """The checkpoint exactly as Triton serves it."""
    return classifier_repository / classifier_name / "1" / "hf"


@pytest.fixture(scope="module")
def examples() -> list[tuple[str, str]]:
    """A handful of the shipped examples: the first few of every label."""
    picked: dict[str, list[str]] = {}
    for line in DATASET.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts = picked.setdefault(row["label"], [])
        if len(texts) < EXAMPLES_PER_LABEL:
            texts.append(row["text"])
    return [(text, label) for label, texts in sorted(picked.items()) for text in texts]


def _tiny_generator(tokenizer_dir: Path, folder: Path) -> Path:
    """A 2-layer GPT-2 with random weights: enough to run the real generate() path in Triton.
    Its position table is short on purpose: a long prompt makes its forward raise."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=GENERATOR_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # tied, a random GPT-2 repeats its input: EOS at once
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def extra_repository(
    classifier_hf_dir: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    work = tmp_path_factory.mktemp("serving")
    repo = work / "repository"
    broken = write_model_repository(classifier_hf_dir, repo, BROKEN, "sequence-classification")
    weights = broken / "1" / "hf" / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()  # a hard link to the trainer's output: replace it, never write through it
    weights.write_bytes(data[: len(data) // 2])
    generator = _tiny_generator(classifier_hf_dir, work / "generator")
    write_model_repository(generator, repo, GENERATOR, "causal-lm", max_new_tokens=8)
    write_model_repository(tiny_llama, repo, LLAMA, "causal-lm", max_new_tokens=16)
    return repo


@pytest.fixture(scope="module")
def triton(
    classifier_repository: Path, extra_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with running_triton(
        [classifier_repository, extra_repository],
        exit_on_error=False,
        strict_readiness=False,
        log_path=log,
        ready_timeout=240,
    ) as server:
        yield server


def _texts_tensor(texts: list[str]) -> triton_http.InferInput:
    tensor = triton_http.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    return tensor


def _statistics(server: TritonServer, model: str) -> tuple[int, int]:
    client = triton_http.InferenceServerClient(server.http_url)
    try:
        [stats] = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_finetuned_classifier_answers_the_shipped_examples(
    triton: TritonServer, classifier_name: str, examples: list[tuple[str, str]]
) -> None:
    for text, label in examples:
        result = smoke_test(triton.http_url, classifier_name, text, label, timeout=30)
        assert result.ok, result.message
        assert result.label == label
        assert result.scores is not None
        assert sum(result.scores) == pytest.approx(1.0, abs=1e-4)


def test_scores_equal_an_in_process_forward(
    triton: TritonServer,
    classifier_name: str,
    classifier_hf_dir: Path,
    examples: list[tuple[str, str]],
) -> None:
    """One request with every example (one execute, padded together) must give the numbers
    transformers gives on the same checkpoint: tokenization, padding and the split back per row
    are right."""
    texts = [text for text, _ in examples]
    client = triton_http.InferenceServerClient(triton.http_url, network_timeout=60)
    try:
        answer = client.infer(classifier_name, [_texts_tensor(texts)])
    finally:
        client.close()
    scores = answer.as_numpy("SCORES")
    labels = [x.decode() for x in answer.as_numpy("LABEL").reshape(-1)]

    tokenizer = AutoTokenizer.from_pretrained(classifier_hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_hf_dir).eval()
    expected = []
    with torch.inference_mode():
        for text in texts:  # one at a time: no padding on the reference side
            logits = model(**tokenizer(text, return_tensors="pt")).logits
            expected.append(torch.softmax(logits, dim=-1)[0].numpy())
    np.testing.assert_allclose(scores, np.stack(expected), atol=1e-4)
    manifest = read_manifest(classifier_hf_dir.parents[1])
    assert manifest.labels is not None
    assert labels == [manifest.labels[int(i)] for i in np.stack(expected).argmax(axis=1)]


def test_classification_extension_uses_the_packaged_labels(
    triton: TritonServer, classifier_name: str, examples: list[tuple[str, str]]
) -> None:
    text, label = examples[0]
    client = triton_http.InferenceServerClient(triton.http_url)
    try:
        answer = client.infer(
            classifier_name,
            [_texts_tensor([text])],
            outputs=[triton_http.InferRequestedOutput("SCORES", class_count=1)],
        )
    finally:
        client.close()
    [[top]] = answer.as_numpy("SCORES")
    score, _, name = top.decode().split(":")
    assert name == label
    assert 0.0 < float(score) <= 1.0


async def _concurrent_labels(url: str, model: str, texts: list[str]) -> list[str]:
    """Every request in flight at once, from one asyncio client (aiohttp connection pool)."""
    client = triton_aio.InferenceServerClient(url)

    async def one(text: str) -> str:
        tensor = triton_aio.InferInput("TEXT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        answer = await client.infer(model, [tensor])
        return str(answer.as_numpy("LABEL")[0][0].decode())

    try:
        return list(await asyncio.gather(*(one(text) for text in texts)))
    finally:
        await client.close()


def test_concurrent_requests_are_batched(
    triton: TritonServer, classifier_name: str, examples: list[tuple[str, str]]
) -> None:
    requests = 64
    texts = [examples[i % len(examples)][0] for i in range(requests)]
    expected = [examples[i % len(examples)][1] for i in range(requests)]
    inferences_before, executions_before = _statistics(triton, classifier_name)

    labels = asyncio.run(_concurrent_labels(triton.http_url, classifier_name, texts))

    inferences_after, executions_after = _statistics(triton, classifier_name)
    inferences = inferences_after - inferences_before
    executions = executions_after - executions_before
    assert labels == expected  # every answer went back to the request that asked
    assert inferences == requests
    assert executions < inferences, f"{inferences} requests ran in {executions} executions"


def test_metrics_the_autoscaler_reads(triton: TritonServer, classifier_name: str) -> None:
    assert smoke_test(triton.http_url, classifier_name, "where is my parcel", None, 30).ok
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as response:
        text = response.read().decode()
    # The names exactly as exposed (what a Prometheus query or adapter rule names): Triton's
    # counters carry no _total suffix.
    samples = {}
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if match and f'model="{classifier_name}"' in match["labels"]:
            samples[match["name"]] = float(match["value"])
    for name in (
        "nv_inference_queue_duration_us",
        "nv_inference_request_success",
        "nv_inference_pending_request_count",
    ):
        assert name in samples, f"{name} is not exported for {classifier_name}"
    assert samples["nv_inference_request_success"] >= 1
    assert samples["nv_inference_pending_request_count"] >= 0


def test_corrupted_weights_fail_the_smoke_test(triton: TritonServer) -> None:
    result = smoke_test(triton.http_url, BROKEN, "my card was charged twice", None, timeout=10)
    assert not result.ok
    assert result.error is not None
    assert "not ready" in result.error
    assert "corrupted" in result.error
    assert "At:" not in result.error  # the traceback is trimmed, the cause kept


def test_an_error_in_execute_fails_the_smoke_test(triton: TritonServer) -> None:
    """The tiny generator's position table is shorter than this prompt: its forward raises
    inside execute, and the smoke test reports the model's own error."""
    too_long = " ".join(["refund"] * (GENERATOR_POSITIONS * 2))
    result = smoke_test(triton.http_url, GENERATOR, too_long, None, timeout=30)
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("inference failed:")
    assert "index out of range" in result.error.lower()
    # The model instance survives the failed batch.
    assert smoke_test(triton.http_url, GENERATOR, "hello", None, timeout=30).ok


def test_causal_lm_generates_with_a_bounded_token_count(
    triton: TritonServer, extra_repository: Path
) -> None:
    """Through Triton's generate endpoint (the causal LM is decoupled, which HTTP infer
    refuses): a request's max_new_tokens bounds its answer, and the answers are transformers'."""
    folder = extra_repository / GENERATOR / "1" / "hf"
    default = generate(triton.http_url, GENERATOR, PROMPT, max_tokens=8, stream=False)
    asked = generate(triton.http_url, GENERATOR, PROMPT, max_tokens=3, stream=False)
    assert default.text == reference_generation(folder, PROMPT, 8)
    assert asked.text == reference_generation(folder, PROMPT, 3)
    assert default.text.startswith(asked.text)


def test_python_backend_streams_tokens_over_http(triton: TritonServer, tiny_llama: Path) -> None:
    """generate_stream: one event per decoding step, the first before the answer is complete,
    and together exactly the answer the same request gets unstreamed (and transformers gives)."""
    whole = generate(triton.http_url, LLAMA, PROMPT, max_tokens=12, stream=False)
    streamed = generate(triton.http_url, LLAMA, PROMPT, max_tokens=12, stream=True)
    assert whole.text == reference_generation(tiny_llama, PROMPT, 12)
    assert len(whole.text.split()) > 3  # the tiny model's answer is words, not EOS at once
    assert streamed.text == whole.text
    assert len([c for c in streamed.chunks if c]) > 3
    assert streamed.first_text_s is not None
    assert streamed.first_text_s < streamed.total_s


def test_python_backend_streams_tokens_over_grpc(triton: TritonServer) -> None:
    whole = generate(triton.http_url, LLAMA, PROMPT, max_tokens=12, stream=False)
    chunks, first, total = grpc_stream(
        triton.grpc_url,
        LLAMA,
        {"TEXT": PROMPT, "STREAM": True},
        "GENERATED_TEXT",
        parameters={"max_new_tokens": 12},
        batched=True,
    )
    assert "".join(chunks) == whole.text
    assert len(chunks) > 3
    assert first < total


def test_a_streaming_request_and_plain_ones_share_a_batch_correctly(triton: TritonServer) -> None:
    """Concurrent streaming and plain requests: each gets its own answer (the batch's generate
    serves rows of different limits and both kinds of request)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [PROMPT, "where is my parcel", "refund please", PROMPT]
    expected = {
        p: generate(triton.http_url, LLAMA, p, max_tokens=6, stream=False).text for p in prompts
    }
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(
            pool.map(
                lambda pair: (
                    generate(
                        triton.http_url, LLAMA, pair[1], max_tokens=6, stream=pair[0] % 2 == 0
                    ).text
                ),
                enumerate(prompts),
            )
        )
    assert answers == [expected[p] for p in prompts]


def test_model_control_mode_none_refuses_the_repository_api(
    triton: TritonServer, classifier_name: str
) -> None:
    client = triton_http.InferenceServerClient(triton.http_url)
    try:
        with pytest.raises(InferenceServerException, match="not allowed"):
            client.unload_model(classifier_name)
        assert client.is_model_ready(classifier_name)
    finally:
        client.close()


def test_the_launcher_reports_a_server_that_exits(tmp_path: Path) -> None:
    """A model Triton refuses makes the server exit (exit-on-error, as in the pods): the
    launcher raises with the log tail instead of waiting for readiness until its timeout."""
    model = tmp_path / "repository" / "refused"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 4\n'
        'input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        'output [ { name: "LABEL" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        "dynamic_batching { preferred_batch_size: [ 8 ] }\n"
    )
    (model / "1" / "model.py").write_text("")
    log = tmp_path / "tritonserver.log"
    started = time.monotonic()
    with (
        pytest.raises(TritonError, match="exited with code") as failure,
        running_triton(tmp_path / "repository", log_path=log, ready_timeout=120),
    ):
        pass
    assert time.monotonic() - started < 60
    assert "preferred size must be <= max batch size" in str(failure.value)
