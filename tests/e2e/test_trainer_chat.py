"""The real trainer on chat data (`spec.dataset.messagesField`) with packing: a tiny GPT-2 with
the shipped tokenizer and the ChatML template, trained as a training pod runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.e2e.test_trainer import DATASET, tiny_gpt2
from tests.unit.trainer.test_chat_and_packing import CHATML
from transformers import AutoTokenizer

TrainerHarness = Any


def chat_model(folder: Path, tokenizer_dir: Path) -> Path:
    """The shipped tokenizer with ChatML's markers as special tokens and its template."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder / "tokenizer")
    return tiny_gpt2(folder / "model", folder / "tokenizer")


def test_chat_data_with_packing_trains_and_exports(trainer: TrainerHarness, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines()[:120]]
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "name the intent"},
                        {"role": "user", "content": r["text"]},
                        {"role": "assistant", "content": r["label"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        ),
        encoding="utf-8",
    )
    spec = {
        "task": "causal-lm",
        "dataset": {"messagesField": "messages", "validationSplit": 0.1},
        "hyperparameters": {
            "epochs": 2,
            "batchSize": 4,
            "maxSeqLength": 64,
            "packing": True,
            "learningRate": 5e-3,
        },
        "output": {"triton": False},
    }
    config = trainer.write_config(tmp_path, dataset, spec, job={"name": "chat", "namespace": "x"})
    raw = json.loads(config.read_text())
    raw["paths"]["model"] = str(chat_model(tmp_path / "gpt2", trainer.model_dir))
    config.write_text(json.dumps(raw))
    run = trainer.run(config)
    assert run.returncode == 0, run.stderr[-3000:]
    (started,) = run.of("started")
    assert started["trainExamples"] < 108 * 0.75  # 108 conversations, packed
    losses = [e["loss"] for e in run.of("progress")]
    assert losses[-1] < losses[0]
    exported = json.loads((run.output_dir / "config.json").read_text())
    assert exported["use_cache"] is True  # off while training, back on for generation
