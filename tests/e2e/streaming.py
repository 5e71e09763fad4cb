"""Triton's gRPC streaming from a test: send one request on a bidirectional stream, collect the
decoupled model's responses until the final one."""

from __future__ import annotations

import queue
import time
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc


def _tensor(name: str, value: Any, batched: bool) -> triton_grpc.InferInput:
    shape = [1, 1] if batched else [1]
    if isinstance(value, bool):
        tensor = triton_grpc.InferInput(name, shape, "BOOL")
        tensor.set_data_from_numpy(np.array([value], dtype=bool).reshape(shape))
    else:
        tensor = triton_grpc.InferInput(name, shape, "BYTES")
        tensor.set_data_from_numpy(np.array([str(value).encode()], dtype=np.object_).reshape(shape))
    return tensor


def grpc_stream(
    url: str,
    model: str,
    inputs: dict[str, Any],
    output: str,
    *,
    parameters: dict[str, Any] | None = None,
    batched: bool = False,
    timeout: float = 120.0,
) -> tuple[list[str], float, float]:
    """The non-empty text pieces in order, seconds to the first and to the final response."""
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = triton_grpc.InferenceServerClient(url)
    pieces: list[str] = []
    first: float | None = None
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        started = time.perf_counter()
        client.async_stream_infer(
            model,
            [_tensor(name, value, batched) for name, value in inputs.items()],
            parameters=parameters,
            enable_empty_final_response=True,
        )
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise AssertionError(f"stream error: {error}")
            array = result.as_numpy(output)
            if array is not None and array.size:
                piece = "".join(
                    v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)
                )
                if piece:
                    first = first if first is not None else time.perf_counter() - started
                    pieces.append(piece)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                total = time.perf_counter() - started
                break
    finally:
        client.stop_stream()
        client.close()
    assert first is not None, "no text was streamed"
    return pieces, first, total
