"""The post-rollout smoke test: one real inference request against a Triton endpoint.

The operator calls this after a rollout before it reports a ModelServer ``Ready``, so it must
never raise for a failure of the thing it tests: an unreachable server, a model that failed to
load, an inference error or a wrong label all come back as ``SmokeResult(ok=False, error=...)``
with a message a person can act on. It speaks plain HTTP through tritonclient (numpy, no torch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from kubetune.serving.generate import (
    GENERATED_OUTPUT,
    TEXT_INPUT,
    VLLM_TEXT_OUTPUT,
    GenerationError,
    generate,
)

LABEL_OUTPUT = "LABEL"
SCORES_OUTPUT = "SCORES"
# The python backend appends the Python traceback to an error; the line above it is the cause.
TRACEBACK_MARK = "\n\nAt:"
# A generation smoke test asks for a short, bounded answer: it proves the model generates, not
# how well, and must not hold a replica's engine for long.
SMOKE_MAX_TOKENS = 8


@dataclass(frozen=True)
class SmokeResult:
    """The outcome of one smoke test. ``latency_s`` is the inference call alone."""

    ok: bool
    model_name: str
    label: str | None = None
    scores: list[float] | None = None
    generated_text: str | None = None
    latency_s: float | None = None
    error: str | None = None

    @property
    def message(self) -> str:
        """One line for a condition message or an Event."""
        if not self.ok:
            return f"smoke test of {self.model_name} failed: {self.error}"
        answer = self.label if self.label is not None else repr(self.generated_text)
        latency = f" in {self.latency_s * 1000:.0f} ms" if self.latency_s is not None else ""
        return f"smoke test of {self.model_name} passed{latency}: {answer}"


def _split_url(url: str) -> tuple[str, bool]:
    """tritonclient wants host:port and a separate ssl flag; accept http(s):// URLs too."""
    url = url.strip().rstrip("/")
    if url.startswith("https://"):
        return url.removeprefix("https://"), True
    return url.removeprefix("http://"), False


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        text = exc.message() or str(exc)
        status = exc.status()
        return f"{text} (status {status})" if status else str(text)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _not_ready_reason(client: triton_http.InferenceServerClient, model_name: str) -> str:
    """Why a model is not ready, from the repository index (allowed in every control mode)."""
    try:
        index: list[dict[str, Any]] = client.get_model_repository_index()
    except Exception as exc:
        return f"model {model_name!r} is not ready (repository index unavailable: {exc})"
    entries = [e for e in index if e.get("name") == model_name]
    if not entries:
        names = ", ".join(sorted(str(e.get("name")) for e in index)) or "none"
        return f"model {model_name!r} is not in the server's repository (models: {names})"
    entry = entries[-1]
    state = entry.get("state", "UNKNOWN")
    reason = str(entry.get("reason") or "no reason given")
    # The python backend appends the Python traceback ("\n\nAt:\n  file(line): ..."); the
    # exception line above it is the part a person needs, and conditions have limited room.
    reason = reason.split(TRACEBACK_MARK, 1)[0].strip()
    return f"model {model_name!r} is not ready (state {state}): {reason}"


def smoke_test(
    url: str,
    model_name: str,
    text: str,
    expected_label: str | None = None,
    timeout: float = 10.0,
) -> SmokeResult:
    """Send ``text`` to ``model_name`` at ``url`` (host:port or http(s)://host:port)."""
    host, ssl = _split_url(url)
    try:
        client = triton_http.InferenceServerClient(
            url=host, ssl=ssl, connection_timeout=timeout, network_timeout=timeout
        )
    except Exception as exc:
        return SmokeResult(False, model_name, error=f"bad Triton URL {url!r}: {_error_text(exc)}")
    try:
        return _run(client, url, model_name, text, expected_label, timeout)
    except Exception as exc:  # the contract: report, never raise
        return SmokeResult(False, model_name, error=f"unexpected failure: {_error_text(exc)}")
    finally:
        client.close()


def _run(
    client: triton_http.InferenceServerClient,
    url: str,
    model_name: str,
    text: str,
    expected_label: str | None,
    timeout: float,
) -> SmokeResult:
    try:
        live = client.is_server_live()
    except Exception as exc:
        return SmokeResult(
            False, model_name, error=f"cannot reach Triton at {url}: {_error_text(exc)}"
        )
    if not live:
        return SmokeResult(False, model_name, error=f"Triton at {url} is not live")
    try:
        ready = client.is_model_ready(model_name)
    except Exception as exc:
        return SmokeResult(False, model_name, error=f"readiness check failed: {_error_text(exc)}")
    if not ready:
        return SmokeResult(False, model_name, error=_not_ready_reason(client, model_name))

    config: dict[str, Any] = client.get_model_config(model_name)
    outputs = {o["name"] for o in config.get("output", [])}
    if GENERATED_OUTPUT in outputs or VLLM_TEXT_OUTPUT in outputs:
        return _generation(url, model_name, text, expected_label, outputs, timeout)
    batched = int(config.get("max_batch_size", 0)) > 0
    shape = [1, 1] if batched else [1]
    request_input = triton_http.InferInput(TEXT_INPUT, shape, "BYTES")
    request_input.set_data_from_numpy(
        np.array([text.encode("utf-8")], dtype=np.object_).reshape(shape)
    )

    started = time.perf_counter()
    try:
        response = client.infer(model_name, [request_input])
    except Exception as exc:
        return SmokeResult(
            False,
            model_name,
            latency_s=time.perf_counter() - started,
            error=f"inference failed: {_error_text(exc)}",
        )
    latency = time.perf_counter() - started

    if LABEL_OUTPUT in outputs:
        label_array = response.as_numpy(LABEL_OUTPUT)
        if label_array is None or label_array.size == 0:
            return SmokeResult(False, model_name, latency_s=latency, error="no LABEL in answer")
        raw = label_array.reshape(-1)[0]
        label = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        scores_array = response.as_numpy(SCORES_OUTPUT) if SCORES_OUTPUT in outputs else None
        scores = [float(x) for x in scores_array.reshape(-1)] if scores_array is not None else None
        if expected_label is not None and label != expected_label:
            return SmokeResult(
                False,
                model_name,
                label=label,
                scores=scores,
                latency_s=latency,
                error=f"expected label {expected_label!r}, got {label!r} for {text!r}",
            )
        return SmokeResult(True, model_name, label=label, scores=scores, latency_s=latency)

    return SmokeResult(
        False,
        model_name,
        latency_s=latency,
        error=f"model has neither {LABEL_OUTPUT} nor {GENERATED_OUTPUT} outputs "
        f"(it has {', '.join(sorted(outputs)) or 'none'}): not a kubetune model",
    )


def _generation(
    url: str,
    model_name: str,
    text: str,
    expected_text: str | None,
    outputs: set[str],
    timeout: float,
) -> SmokeResult:
    """A short prompt, a bounded answer, through the generate endpoint (both runtimes are
    decoupled, which Triton's HTTP infer endpoint refuses). It fails on an error and on an empty
    answer (broken weights typically decode to padding, which decodes to nothing); with
    ``expected_text`` the answer must contain it."""
    started = time.perf_counter()
    try:
        answer = generate(
            url,
            model_name,
            text,
            max_tokens=SMOKE_MAX_TOKENS,
            stream=False,
            outputs=frozenset(outputs),
            timeout=timeout,
        )
    except (GenerationError, OSError, ValueError) as exc:
        message = str(exc) if isinstance(exc, GenerationError) else _error_text(exc)
        return SmokeResult(
            False,
            model_name,
            latency_s=time.perf_counter() - started,
            error=f"inference failed: {message.split(TRACEBACK_MARK, 1)[0].strip()}",
        )
    value, latency = answer.text, answer.total_s
    if not value.strip():
        return SmokeResult(
            False,
            model_name,
            generated_text=value,
            latency_s=latency,
            error=f"the model generated nothing for {text!r} (at most {SMOKE_MAX_TOKENS} tokens)",
        )
    if expected_text is not None and expected_text not in value:
        return SmokeResult(
            False,
            model_name,
            generated_text=value,
            latency_s=latency,
            error=f"expected the answer to contain {expected_text!r}, got {value!r}",
        )
    return SmokeResult(True, model_name, generated_text=value, latency_s=latency)
