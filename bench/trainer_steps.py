"""Per-step loss and gradient norm: kubetune's loop against Hugging Face `Trainer`, side by side.

Both start from the same weights (kubetune's model, head included, copied into Trainer's), train on
the same batches in the same order (kubetune's plan, handed to Trainer as its sampler) with the
same hyperparameters (bench/bench_trainer.py's full fine-tune, fp32), and dropout is off in both,
so any difference is the loops' own: the schedule, AdamW, clipping, loss reduction, padding.
Prints each step's loss, pre-clipping gradient norm and learning rate for both, and the largest
weight differences at the end. `--dropout` keeps dropout on (each loop its own random stream).

Run: PYTHONPATH=operator python bench/trainer_steps.py [--steps N] [--seed S] [--dropout]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import bench_trainer as bt  # the same split, model and spec (bench/ is the script's folder)


def no_dropout(model: Any) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=27)
    parser.add_argument("--seed", type=int, default=bt.SEED)
    parser.add_argument("--dropout", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("KUBETUNE_LOG_EVERY_STEPS", "1000000")
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    from kubetune.trainer import loop as kloop
    from kubetune.trainer.distributed import StopAgreement, init_distributed
    from kubetune.trainer.reporting import Reporter
    from kubetune.trainer.run import set_up

    bench = argparse.Namespace(epochs=1, batch=16, seq=64, seed=args.seed, lr=lambda _: 1e-4)
    work = Path(tempfile.mkdtemp(prefix="kubetune-steps-"))
    split = bt.split_data(work)
    config = bt.kubetune_config(bt.kubetune_spec(bench, "full", "fp32"), split, work / "k")
    ctx = init_distributed(use_gpus=False, group_for_one=False)
    job = set_up(config, ctx, StopAgreement(ctx), Reporter(config, ctx.is_main))
    trainee = job.loop.trainee
    if not args.dropout:
        no_dropout(trainee.model)
    initial = copy.deepcopy(trainee.model.state_dict())
    batches = job.loop.plan.global_batches(0)[: args.steps]
    order = [i for batch in batches for i in batch]

    ours: list[dict[str, float]] = []
    step = kloop.clipped_step

    def recorded(optimizer: Any, params: Any) -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        ours.append({"grad_norm": float(norm), "lr": optimizer.param_groups[0]["lr"]})
        step(optimizer, params)

    kloop.clipped_step = recorded
    losses: list[float] = []
    trainee.forward.register_forward_hook(
        lambda _m, _i, out: (
            losses.append(float(out.loss.detach())) if torch.is_grad_enabled() else None
        )
    )
    job.loop.plan.global_batches = lambda _epoch: batches  # type: ignore[method-assign]
    with contextlib.redirect_stdout(io.StringIO()):
        job.loop.run(job.start)
    trained = {k: v.detach().clone() for k, v in trainee.model.state_dict().items()}

    tokenizer = AutoTokenizer.from_pretrained(bt.minilm_dir())
    dataset = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.target}
        for e in job.prepared.train
    ]
    model = AutoModelForSequenceClassification.from_pretrained(
        bt.minilm_dir(), num_labels=len(job.prepared.labels or [])
    )
    model.load_state_dict(initial)
    if not args.dropout:
        no_dropout(model)

    class Planned(torch.utils.data.Sampler[int]):
        def __iter__(self) -> Any:
            return iter(order)

        def __len__(self) -> int:
            return len(order)

    class PlannedTrainer(Trainer):
        def _get_train_sampler(self, *_args: Any, **_kwargs: Any) -> Any:
            return Planned()

    training_args = bt.trainer_arguments(
        bench, "full", work / "hf", logging_strategy="steps", logging_steps=1
    )
    trainer = PlannedTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,  # type: ignore[arg-type]
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]

    print(f"{'step':>4} {'loss':>9} {'Trainer':>9} {'grad norm':>10} {'Trainer':>9} {'lr':>10}")
    for index, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        print(
            f"{index + 1:>4} {losses[index]:9.5f} {b['loss']:9.5f} {a['grad_norm']:10.4f} "
            f"{b['grad_norm']:9.4f} {a['lr']:10.3e}"
        )
    final = model.state_dict()
    worst = max((float((trained[k] - final[k]).abs().max()), k) for k in trained if k in final)
    print(f"largest weight difference after {len(ours)} steps: {worst[0]:.2e} ({worst[1]})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
