"""kubetune's Triton python-backend model: text in, label + scores (or generated text) out.

This file runs INSIDE Triton's python backend stub, copied into each model repository as
``<model>/1/model.py``. It therefore imports only the standard library, numpy, torch,
transformers and ``triton_python_backend_utils`` (provided by the stub) — never kubetune, which
is not installed in the serving image.

Everything Triton hands to one ``execute`` call (all requests the dynamic batcher merged) goes
through ONE tokenizer call and ONE forward pass; the results are split back per request. That is
what makes dynamic batching pay off. A causal LM is served decoupled: its answers go through the
requests' response senders, token by token for a request whose STREAM input is true.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

MANIFEST_NAME = "kubetune-serving.json"
TEXT_INPUT = "TEXT"
STREAM_INPUT = "STREAM"  # optional BOOL: send the answer token by token (decoupled causal LMs)
LABEL_OUTPUT = "LABEL"
SCORES_OUTPUT = "SCORES"
GENERATED_OUTPUT = "GENERATED_TEXT"
CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_MAX_NEW_TOKENS_LIMIT = 256
DEFAULT_MAX_LENGTH = 512
WARMUP_TEXT = "kubetune warm-up request"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_weights(hf_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse to serve weights that differ from what was packaged: a truncated copy or a
    checkpoint rewritten in place would otherwise load garbage or fail with an obscure error."""
    if os.environ.get("KUBETUNE_SKIP_CHECKSUM") == "1":
        return
    for entry in manifest.get("weights", []):
        path = hf_dir / entry["file"]
        if not path.is_file():
            raise RuntimeError(f"weights file {entry['file']} is missing from {hf_dir}")
        actual = _sha256(path)
        if actual != entry["sha256"]:
            raise RuntimeError(
                f"weights file {entry['file']} is corrupted: sha256 {actual} does not match "
                f"the packaged {entry['sha256']}"
            )


def _torch_threads(instance_count: int) -> int:
    """Share the pod's CPUs between the model instances instead of every instance using all of
    them (oversubscription makes every forward slower). A GPU instance needs few CPU threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(1, instance_count))


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class TritonPythonModel:
    """The model Triton instantiates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.model_config: dict[str, Any] = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        manifest = json.loads((version_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        hf_dir = version_dir / manifest.get("hfDir", "hf")
        self.task: str = manifest["task"]
        self.batched = int(self.model_config.get("max_batch_size", 0)) > 0
        self.decoupled = bool(pb_utils.using_decoupled_model_transaction_policy(self.model_config))
        params = {
            key: value.get("string_value", "")
            for key, value in self.model_config.get("parameters", {}).items()
        }
        self.max_new_tokens_limit = int(
            params.get("max_new_tokens_limit", DEFAULT_MAX_NEW_TOKENS_LIMIT)
        )
        self.default_max_new_tokens = min(
            int(params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), self.max_new_tokens_limit
        )

        instance_count = sum(
            int(group.get("count", 1)) for group in self.model_config.get("instance_group", [])
        )
        torch.set_num_threads(_torch_threads(instance_count))
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
        else:
            self.device = torch.device("cpu")

        _verify_weights(hf_dir, manifest)
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        model_max = getattr(self.tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)
        self.max_length = min(
            int(manifest.get("maxSequenceLength") or DEFAULT_MAX_LENGTH),
            int(model_max) if model_max and model_max < 1_000_000 else DEFAULT_MAX_LENGTH,
        )
        if self.task == CLASSIFICATION:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                hf_dir, local_files_only=True
            )
            id2label = self.model.config.id2label
            self.labels = [str(id2label[i]) for i in range(len(id2label))]
        elif self.task == CAUSAL_LM:
            if not self.decoupled:
                raise RuntimeError(
                    "a causal LM is served decoupled (it streams): its config.pbtxt lacks "
                    "model_transaction_policy { decoupled: true }; package it again with "
                    "kubetune.serving.repository.write_model_repository"
                )
            self.model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
            # Left padding: generation continues every prompt from its own last token.
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        else:
            raise RuntimeError(f"unknown task {self.task!r} in {MANIFEST_NAME}")
        self.model.to(self.device)
        self.model.eval()
        # One forward before Triton reports the model ready: the first user request must not pay
        # for lazy initialisation (allocator, kernels, tokenizer caches).
        if self.task == CLASSIFICATION:
            self._classify([WARMUP_TEXT])
        else:
            self._generate([WARMUP_TEXT], 1)

    def _classify(self, texts: list[str]) -> tuple[list[str], np.ndarray[Any, Any]]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            logits = self.model(**encoded).logits
            probabilities = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        labels = [self.labels[int(i)] for i in probabilities.argmax(axis=-1)]
        return labels, probabilities.astype(np.float32)

    def _generate(
        self, texts: list[str], max_new_tokens: int, streamer: Any = None
    ) -> list[list[int]]:
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,  # a BERT-style tokenizer's, which decoders refuse
        ).to(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
            )
        prompt_length = encoded["input_ids"].shape[1]
        return [row[prompt_length:].tolist() for row in output]

    def _max_new_tokens(self, request: Any) -> int:
        """A request may ask for fewer or more tokens (parameter ``max_new_tokens``), bounded by
        the configured limit so one request cannot hold the instance for minutes."""
        try:
            params = json.loads(request.parameters() or "{}")
        except (AttributeError, ValueError):
            params = {}
        value = params.get("max_new_tokens", self.default_max_new_tokens)
        try:
            wanted = int(value)
        except (TypeError, ValueError):
            wanted = self.default_max_new_tokens
        return max(1, min(wanted, self.max_new_tokens_limit))

    def execute(self, requests: list[Any]) -> list[Any] | None:
        shapes: list[tuple[int, ...]] = []
        texts: list[str] = []
        for request in requests:
            array = pb_utils.get_input_tensor_by_name(request, TEXT_INPUT).as_numpy()
            shapes.append(tuple(array.shape))
            texts.extend(_decode(v) for v in array.reshape(-1))
        if self.task == CAUSAL_LM:
            self._serve_decoupled(requests, shapes, texts)
            return None  # every answer went through the requests' response senders
        try:
            return self._classification_responses(shapes, texts)
        except Exception as exc:  # one failed batch answers every request with the error
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]

    def _text_of(self, tokens: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _serve_decoupled(
        self, requests: list[Any], shapes: list[tuple[int, ...]], texts: list[str]
    ) -> None:
        """Decoupled generation: ONE generate() for the whole batch (greedy decoding makes the
        first n tokens of a longer generation exactly the generation of n tokens, so one pass
        at the largest limit serves every request), with a streamer that sends each streaming
        request its new text after every decoding step (Triton's generate_stream, gRPC
        streaming); other requests get one final answer."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [r.get_response_sender() for r in requests]
        finished = [False] * len(requests)
        try:
            limits = [self._max_new_tokens(r) for r in requests]
            streams = [_wants_stream(r) for r in requests]
            rows: list[int] = []  # row -> request index
            for index, shape in enumerate(shapes):
                count = int(np.prod(shape))
                if streams[index] and count != 1:
                    raise ValueError(f"{STREAM_INPUT} takes one text per request, got {count}")
                rows += [index] * count
            streamer = (
                _RowStreamer(self, rows, limits, streams, senders, shapes) if any(streams) else None
            )
            generated = self._generate(texts, max(limits), streamer)
            start = 0
            for index, (shape, limit) in enumerate(zip(shapes, limits, strict=True)):
                count = int(np.prod(shape))
                answers = [self._text_of(row[:limit]) for row in generated[start : start + count]]
                start += count
                if streams[index]:
                    assert streamer is not None
                    rest = answers[0][len(streamer.sent[index]) :]
                    if rest:
                        senders[index].send(_text_response(rest, shape), flags=final)
                    else:
                        senders[index].send(flags=final)
                else:
                    senders[index].send(_text_response_rows(answers, shape), flags=final)
                finished[index] = True
        except Exception as exc:  # every request not yet answered gets the error, once
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            for index, sender in enumerate(senders):
                if not finished[index]:
                    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), final)

    def _classification_responses(
        self, shapes: list[tuple[int, ...]], texts: list[str]
    ) -> list[Any]:
        labels, scores = self._classify(texts)
        responses = []
        start = 0
        for shape in shapes:
            rows = int(np.prod(shape))
            label_array = np.array(
                [x.encode("utf-8") for x in labels[start : start + rows]], dtype=np.object_
            ).reshape(shape)
            score_array = scores[start : start + rows]
            if not self.batched:
                score_array = score_array.reshape(-1)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(LABEL_OUTPUT, label_array),
                        pb_utils.Tensor(SCORES_OUTPUT, np.ascontiguousarray(score_array)),
                    ]
                )
            )
            start += rows
        return responses

    def finalize(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _wants_stream(request: Any) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, STREAM_INPUT)
    return tensor is not None and bool(tensor.as_numpy().reshape(-1)[0])


def _text_response_rows(values: list[str], shape: tuple[int, ...]) -> Any:
    array = np.array([v.encode("utf-8") for v in values], dtype=np.object_).reshape(shape)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(GENERATED_OUTPUT, array)])


def _text_response(value: str, shape: tuple[int, ...]) -> Any:
    return _text_response_rows([value], shape)


class _RowStreamer:
    """transformers' streamer protocol (``put`` after each step, ``end``) for a whole batch:
    after each step, each streaming row whose decoded text grew sends the new part. The first
    ``put`` carries the prompts, which are not sent. A row stops at its own limit or at EOS."""

    def __init__(
        self,
        model: TritonPythonModel,
        rows: list[int],
        limits: list[int],
        streams: list[bool],
        senders: list[Any],
        shapes: list[tuple[int, ...]],
    ) -> None:
        self.model = model
        self.rows = rows
        self.limits = limits
        self.streams = streams
        self.senders = senders
        self.shapes = shapes
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.done = [False] * len(rows)
        self.sent = ["" for _ in limits]
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        step = value.reshape(-1).tolist()
        eos = self.model.tokenizer.eos_token_id
        for row, token in enumerate(step):
            request = self.rows[row]
            if self.done[row] or not self.streams[request]:
                continue
            self.tokens[row].append(int(token))
            if int(token) == eos or len(self.tokens[row]) >= self.limits[request]:
                self.done[row] = True
            text = self.model._text_of(self.tokens[row])
            # Only a strict extension is sent: a detokenizer may rewrite the tail of what it
            # decoded before (merged word pieces); the final answer then sends the rest.
            if text.startswith(self.sent[request]) and len(text) > len(self.sent[request]):
                delta = text[len(self.sent[request]) :]
                self.senders[request].send(_text_response(delta, self.shapes[request]), flags=0)
                self.sent[request] = text

    def end(self) -> None:
        return None
