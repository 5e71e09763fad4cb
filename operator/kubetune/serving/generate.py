"""A client for Triton's generate extension, streamed or not: tests, the benchmark, a demo.

``generate(url, model, text, max_tokens=..., stream=True)`` posts to
``/v2/models/<model>/generate_stream`` (server-sent events, one per response of the decoupled
model) or ``/generate`` (one answer) and measures the time to the first piece of text and to the
end. It speaks both kubetune runtimes: ``generate_request`` writes the body, and the model's
outputs (read once from its config) tell which runtime serves it. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

TEXT_INPUT = "TEXT"
STREAM_INPUT = "STREAM"
GENERATED_OUTPUT = "GENERATED_TEXT"
# Triton's vLLM backend's tensors.
VLLM_TEXT_INPUT = "text_input"
VLLM_TEXT_OUTPUT = "text_output"


class GenerationError(RuntimeError):
    """The server answered with an error (the model's message, as Triton passed it on)."""


@dataclass(frozen=True)
class Generation:
    text: str
    chunks: tuple[str, ...]  # what each response carried, in order (one when not streamed)
    first_text_s: float | None  # seconds from sending to the first non-empty text
    total_s: float


def generate_request(
    outputs: set[str] | frozenset[str], text: str, max_tokens: int, *, stream: bool = False
) -> tuple[dict[str, Any], str]:
    """The body of Triton's generate extension for a kubetune generating model, and the answer's
    key: kubetune's python backend (``TEXT`` -> ``GENERATED_TEXT``, ``max_new_tokens``,
    ``STREAM``) or Triton's vLLM backend (``text_input`` -> ``text_output``, vLLM's sampling
    parameters, ``stream``; greedy, the prompt left out of the answer). ``outputs`` are the
    model's output names (from its config), which tell the two apart."""
    if VLLM_TEXT_OUTPUT in outputs:
        body: dict[str, Any] = {
            VLLM_TEXT_INPUT: text,
            "exclude_input_in_output": True,
            "parameters": {"max_tokens": max_tokens, "temperature": 0},
        }
        if stream:
            body["stream"] = True
        return body, VLLM_TEXT_OUTPUT
    body = {TEXT_INPUT: text, "parameters": {"max_new_tokens": max_tokens}}
    if stream:
        body[STREAM_INPUT] = True
    return body, GENERATED_OUTPUT


def model_outputs(url: str, model_name: str, timeout: float = 30.0) -> frozenset[str]:
    """The output names of ``model_name`` (``/v2/models/<m>/config``)."""
    with urllib.request.urlopen(_url(url, f"/v2/models/{model_name}/config"), timeout=timeout) as r:
        config = json.loads(r.read())
    return frozenset(str(o["name"]) for o in config.get("output", []))


def _url(url: str, path: str) -> str:
    base = url if url.startswith(("http://", "https://")) else f"http://{url}"
    return base.rstrip("/") + path


def _error(exc: urllib.error.HTTPError) -> GenerationError:
    detail = exc.read().decode("utf-8", errors="replace")
    with contextlib.suppress(ValueError):
        detail = str(json.loads(detail).get("error", detail))
    return GenerationError(detail)


def generate(
    url: str,
    model_name: str,
    text: str,
    *,
    max_tokens: int,
    stream: bool,
    outputs: frozenset[str] | None = None,
    timeout: float = 120.0,
) -> Generation:
    outputs = outputs if outputs is not None else model_outputs(url, model_name, timeout)
    body, key = generate_request(outputs, text, max_tokens, stream=stream)
    path = f"/v2/models/{model_name}/{'generate_stream' if stream else 'generate'}"
    request = urllib.request.Request(
        _url(url, path),
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    chunks: list[str] = []
    first: float | None = None
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if not stream:
                chunks.append(_text(json.loads(response.read()), key))
                first = time.perf_counter() - started
            else:
                for raw in response:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line.removeprefix("data:"))
                    if "error" in event:
                        raise GenerationError(str(event["error"]))
                    piece = _text(event, key)
                    if piece and first is None:
                        first = time.perf_counter() - started
                    chunks.append(piece)
    except urllib.error.HTTPError as exc:
        raise _error(exc) from exc
    return Generation("".join(chunks), tuple(chunks), first, time.perf_counter() - started)


def _text(event: dict[str, Any], key: str) -> str:
    value = event.get(key)
    if isinstance(value, list):
        value = "".join(str(v) for v in value)
    if value is None:
        raise GenerationError(f"no {key} in the answer: {event}")
    return str(value)
