"""The training loop: a deliberately small one, written for this trainer.

Why not Hugging Face's `Trainer`: the FineTuneJob contract needs things it does not give, or gives
only through callbacks that fight its own state machine:

- Exact resume. A checkpoint stores (epoch, index of the next micro-batch) and the batch plan is a
  pure function of the seed and the epoch, so a restarted pod trains on exactly the batches it had
  not seen and ends with the same step count. `Trainer` resumes by replaying (and discarding) the
  data iterator, and its position is in epochs and steps of its own sampler.
- Preemption. SIGTERM must produce a complete checkpoint on every rank's agreement and then exit
  with a distinct code; `Trainer` has no such path.
- Progress where the operator wants it: JSON lines on stdout and a rate-limited status patch,
  without a host synchronisation per step for the loss (Trainer's logging calls `.item()`).
- A global-batch definition of steps under torchrun, length-grouped batches that put the longest
  batch first, and failure classes written as the pod's termination message.
- Fewer moving parts: a few hundred lines that fit in a head, instead of a framework whose
  every release changes defaults (bench/bench_trainer.py compares the throughput of both).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from kubetune.api.v1alpha1.finetunejob import Hyperparameters, Progress
from kubetune.api.v1alpha1.trainerconfig import TrainerConfig
from kubetune.trainer import events, sharding
from kubetune.trainer.checkpoint import Checkpointer, CheckpointMeta, Position, capture_rng, now_iso
from kubetune.trainer.data import IGNORE_INDEX, BatchPlan, Example, eval_batches
from kubetune.trainer.distributed import DistContext, StopAgreement
from kubetune.trainer.errors import Preempted
from kubetune.trainer.modeling import trainable_state
from kubetune.trainer.reporting import Reporter

LOG_EVERY_ENV = "KUBETUNE_LOG_EVERY_STEPS"
HEARTBEAT_SECONDS = 30.0
MAX_GRAD_NORM = 1.0
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient = max_norm / (norm + eps)


def collate(examples: Sequence[Example], pad_id: int, multiple: int) -> dict[str, torch.Tensor]:
    """Pads a batch to its own longest example (rounded up to `multiple` for tensor cores)."""
    width = max(len(e.input_ids) for e in examples)
    width = -(-width // multiple) * multiple
    count = len(examples)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    mask = torch.zeros((count, width), dtype=torch.long)
    per_token = isinstance(examples[0].target, list)
    labels = (
        torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
        if per_token
        else torch.tensor([e.target for e in examples], dtype=torch.long)
    )
    packed = examples[0].position_ids is not None
    positions = torch.arange(width, dtype=torch.long).repeat(count, 1) if packed else None
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        mask[row, :length] = 1
        if per_token:
            labels[row, :length] = torch.tensor(example.target, dtype=torch.long)
        if positions is not None and example.position_ids is not None:
            positions[row, :length] = torch.tensor(example.position_ids, dtype=torch.long)
            positions[row, length:] -= length  # the padding: one more segment of its own
    if (
        positions is not None
    ):  # no attention mask: the model keeps attention within each example from these
        return {"input_ids": input_ids, "position_ids": positions, "labels": labels}
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def total_steps(plan: BatchPlan, hp: Hyperparameters) -> int:
    """Optimizer steps of the whole run, defined by the GLOBAL batch.

    batch_size is per process, so a step of N processes sees N x batch_size examples and an
    epoch takes ceil(n_train / (batch_size x N x accumulation)) steps: adding GPUs shortens the
    run (same epochs, fewer and larger steps), as with every data-parallel trainer. Keep the
    learning rate in mind when changing the process count.
    """
    return -(-plan.batches_per_epoch // hp.gradient_accumulation_steps) * hp.epochs


@dataclass
class Trainee:
    """The model and everything that updates it."""

    model: torch.nn.Module  # unwrapped: what is checkpointed and exported
    forward: torch.nn.Module  # what the loop calls: the DDP wrapper, or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    autocast_dtype: torch.dtype | None
    lora: bool
    fsdp: bool = False  # `model` is sharded with FSDP2; checkpoints are sharded too


@dataclass
class LoopResult:
    position: Position
    metrics: dict[str, float]
    samples_per_second: float
    train_seconds: float  # inside optimizer steps only
    wall_seconds: float  # the whole loop: steps, loaders, evaluation, checkpoints
    progress: Progress
    peak_memory_bytes: int | None  # this process's peak while the loop ran (see peak_memory)
    cpu_seconds: float  # CPU time of the whole process (all threads) while the loop ran


@dataclass
class _Window:
    """What happened since the last progress report (host-side counters, device-side loss)."""

    loss: torch.Tensor | None = None
    micro_batches: int = 0
    samples: int = 0
    started: float = field(default_factory=time.monotonic)


class TrainingLoop:
    def __init__(
        self,
        *,
        config: TrainerConfig,
        ctx: DistContext,
        trainee: Trainee,
        train: list[Example],
        validation: list[Example],
        plan: BatchPlan,
        pad_id: int,
        labels: list[str] | None,
        checkpointer: Checkpointer,
        reporter: Reporter,
        stop: StopAgreement,
    ) -> None:
        self.config = config
        self.spec = config.spec
        self.ctx = ctx
        self.trainee = trainee
        self.train = train
        self.validation = validation
        self.plan = plan
        self.labels = labels
        self.checkpointer = checkpointer
        self.reporter = reporter
        self.stop = stop
        self.accum = self.spec.hyperparameters.gradient_accumulation_steps
        self.steps_per_epoch = -(-plan.batches_per_epoch // self.accum)
        self.total_steps = total_steps(plan, self.spec.hyperparameters)
        cuda = ctx.device.type == "cuda"
        self._collate = partial(collate, pad_id=pad_id, multiple=8 if cuda else 1)
        self._workers = (
            min(2, max(0, (os.cpu_count() or 1) // ctx.local_world_size - 1)) if cuda else 0
        )
        self._log_every = int(os.environ.get(LOG_EVERY_ENV) or max(1, self.total_steps // 100))
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ the loop

    def run(self, start: Position) -> LoopResult:
        began = time.monotonic()
        cpu_began = time.process_time()
        self.position = start
        self._segment_start = start.step
        self._last_saved = start.step if start.step else -1  # resumed: that step is on disk
        self._last_loss: float | None = None
        self._train_seconds = 0.0
        self._samples = 0
        self._window = _Window()
        self._last_stdout = time.monotonic()
        reset_peak_memory(self.ctx.device)
        self.trainee.forward.train()
        for epoch in range(start.epoch, self.spec.hyperparameters.epochs):
            self._run_epoch(epoch, start.batch if epoch == start.epoch else 0)
            if epoch + 1 < self.spec.hyperparameters.epochs:
                self._evaluate_and_report()
        self.stop.drain()
        self._evaluate_and_report()
        if self.spec.checkpointing.enabled and self._last_saved != self.position.step:
            self.save_checkpoint()  # a restart after a failed export then skips straight to it
        return LoopResult(
            self.position,
            self.metrics,
            self._samples / self._train_seconds if self._train_seconds else 0.0,
            self._train_seconds,
            time.monotonic() - began,
            self._progress(self._last_loss),
            peak_memory(self.ctx.device),
            time.process_time() - cpu_began,
        )

    def _run_epoch(self, epoch: int, first_batch: int) -> None:
        global_batches = self.plan.global_batches(epoch)
        mine = [batch[self.ctx.rank :: self.ctx.world_size] for batch in global_batches]
        batches = iter(self._loader(mine[first_batch:]))
        index = first_batch
        while index < len(mine):
            count = min(self.accum, len(mine) - index)
            began = time.monotonic()
            self._optimizer_step(batches, count)
            self._train_seconds += time.monotonic() - began
            samples = sum(len(b) for b in global_batches[index : index + count])
            index += count
            self._samples += samples
            self._window.samples += samples
            done = index == len(mine)
            step = self.position.step + 1
            self.position = Position(step, epoch + 1 if done else epoch, 0 if done else index)
            self._after_step()

    def _loader(self, batches: list[list[int]]) -> DataLoader[Any]:
        """A loader over this rank's remaining batches of the epoch.

        It gets a generator of its own: by default each new loader iterator draws a seed from
        the global torch RNG, so a loader created at a resume point would shift every later
        dropout mask and the resumed run would no longer match an uninterrupted one.
        """
        return DataLoader(
            self.train,  # type: ignore[arg-type]  # a list is a map-style dataset
            batch_sampler=batches,
            collate_fn=self._collate,
            num_workers=self._workers,
            pin_memory=self.ctx.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.spec.hyperparameters.seed),
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self.trainee.autocast_dtype
        return torch.autocast(
            self.ctx.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        )

    def _optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]], count: int) -> None:
        """`count` micro-batches, gradients synchronised only on the last, then one update."""
        t = self.trainee
        for micro in range(count):
            batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in next(batches).items()}
            with self._gradient_sync(micro == count - 1):
                with self._autocast():
                    loss = t.forward(**batch).loss
                scaled = loss / count
                (t.scaler.scale(scaled) if t.scaler else scaled).backward()
            detached = loss.detach()
            self._window.loss = (
                detached if self._window.loss is None else self._window.loss + detached
            )
            self._window.micro_batches += 1
        params = [p for p in t.model.parameters() if p.grad is not None]
        if t.scaler:
            t.scaler.unscale_(t.optimizer)
            clip(params)
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            clipped_step(t.optimizer, params)
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradients are reduced on the last micro-batch of a step only (DDP's no_sync, FSDP's
        requires_gradient_sync)."""
        if self.trainee.fsdp:
            sharding.set_gradient_sync(self.trainee.model, sync)
            return contextlib.nullcontext()
        if sync or not self.ctx.distributed:
            return contextlib.nullcontext()
        return self.trainee.forward.no_sync()  # type: ignore[operator,no-any-return]

    def _after_step(self) -> None:
        step = self.position.step
        self._report(step)
        if self.stop.poll():
            self.save_checkpoint()
            raise Preempted(
                f"stopped by SIGTERM at step {step}/{self.total_steps}; resume from "
                f"{self.checkpointer.latest()}"
            )
        every = self.spec.checkpointing.every_steps
        if self.spec.checkpointing.enabled and step % every == 0 and step < self.total_steps:
            self.save_checkpoint()

    # ------------------------------------------------------------------ reporting

    def _report(self, step: int) -> None:
        """Reads the loss (a device sync) only when a line or a status write is actually due."""
        if not self.ctx.is_main:
            return
        now = time.monotonic()
        to_stdout = (
            step == self._segment_start + 1
            or step == self.total_steps
            or step % self._log_every == 0
            or now - self._last_stdout >= HEARTBEAT_SECONDS
        )
        if not (to_stdout or self.reporter.status_due()):
            return
        window = self._window
        loss = (window.loss.item() / window.micro_batches) if window.loss is not None else None
        throughput = window.samples / max(now - window.started, 1e-9)
        self._last_loss = loss
        self._window = _Window()
        if to_stdout:
            self._last_stdout = now
        self.reporter.progress(self._progress(loss, throughput), to_stdout=to_stdout)

    def _progress(self, loss: float | None, throughput: float | None = None) -> Progress:
        step = self.position.step
        done_here = step - self._segment_start
        eta = None
        if done_here and self._train_seconds:
            eta = int((self.total_steps - step) * self._train_seconds / done_here)
        epoch = self.position.epoch + self.position.batch / max(1, self.plan.batches_per_epoch)
        return Progress(
            step=step,
            total_steps=self.total_steps,
            epoch=round(epoch, 4),
            percent=min(100, 100 * step // max(1, self.total_steps)),
            loss=None if (finite := events.finite(loss)) is None else round(finite, 4),
            learning_rate=self.trainee.scheduler.get_last_lr()[0],
            samples_per_second=None if throughput is None else round(throughput, 2),
            eta_seconds=eta,
            eval_metrics=self.metrics,
            last_heartbeat=datetime.now(UTC).replace(microsecond=0),
        )

    def _evaluate_and_report(self) -> None:
        if not self.validation:
            return
        metrics = self.evaluate()
        self.metrics = events.finite_only(metrics)
        if self.ctx.is_main and metrics != self.metrics:
            events.emit("warning", message=f"evaluation gave non-finite metrics {metrics}")
        if self.ctx.is_main:
            events.emit(
                "eval", step=self.position.step, epoch=self.position.epoch, metrics=self.metrics
            )
            self.reporter.progress(self._progress(self._last_loss), to_stdout=False)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole validation split; each rank scores a share, sums are reduced."""
        model = self.trainee.model
        model.eval()
        lengths = [len(e.input_ids) for e in self.validation]
        size = self.spec.hyperparameters.batch_size * 2
        classes = len(self.labels) if self.labels else 0
        confusion = torch.zeros(classes * classes, dtype=torch.float64, device=self.ctx.device)
        totals = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # loss sum, count
        for indices, counts in self._eval_plan(lengths, size):
            batch = self._collate([self.validation[i] for i in indices])
            batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}
            with self._autocast():
                out = model(**batch)
            if not counts:
                continue
            if classes:
                predicted = out.logits.argmax(dim=-1)
                confusion += torch.bincount(
                    batch["labels"] * classes + predicted, minlength=classes * classes
                ).double()
                weight = batch["labels"].numel()
            else:
                weight = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            totals += torch.stack(
                [
                    out.loss.double() * weight,
                    torch.tensor(weight, dtype=torch.float64, device=self.ctx.device),
                ]
            )
        self.ctx.all_reduce_sum(confusion)
        self.ctx.all_reduce_sum(totals)
        model.train()
        loss = float(totals[0] / totals[1]) if totals[1] else float("nan")
        if classes:
            return {**classification_metrics(confusion.view(classes, classes)), "loss": loss}
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def _eval_plan(self, lengths: list[int], size: int) -> list[tuple[list[int], bool]]:
        """This rank's evaluation batches, each with whether it counts. Under FSDP every forward
        is collective, so a rank with fewer batches than another repeats one that is not counted
        (the shares differ by at most one batch)."""
        world, rank = self.ctx.world_size, self.ctx.rank
        mine = [(b, True) for b in eval_batches(lengths, size, world, rank)]
        if not self.trainee.fsdp:
            return mine
        shares = [eval_batches(lengths, size, world, r) for r in range(world)]
        filler = next((share[0] for share in shares if share), None)
        most = max(len(share) for share in shares)
        return mine + [(filler, False) for _ in range(most - len(mine)) if filler is not None]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Every rank contributes its RNG state (and, under FSDP, its shards); rank 0 writes the
        rest and commits; all wait until the checkpoint is on disk."""
        began = time.monotonic()
        rng = self.ctx.all_gather_object(capture_rng())
        t = self.trainee
        temp = self.checkpointer.begin() if self.ctx.is_main else None
        if t.fsdp:
            temp = self.ctx.all_gather_object(temp)[0]  # rank 0's folder, for every rank
            sharding.save_shards(temp / sharding.SHARDS_FOLDER, t.model, t.optimizer, t.lora)
        if self.ctx.is_main:
            assert temp is not None
            meta = CheckpointMeta(
                position=self.position,
                total_steps=self.total_steps,
                world_size=self.ctx.world_size,
                global_batch=self.plan.global_batch,
                labels=self.labels,
                task=str(self.spec.task),
                method=str(self.spec.method),
                time=now_iso(),
                sharded=t.fsdp,
            )
            training = {
                "scheduler": t.scheduler.state_dict(),
                "scaler": t.scaler.state_dict() if t.scaler else None,
                "rng": rng,
            }
            model = None
            if not t.fsdp:
                training["optimizer"] = t.optimizer.state_dict()
                model = trainable_state(t.model, t.lora)
            path = self.checkpointer.commit(temp, meta, model, training)
            self.reporter.checkpoint(self.position.step, str(path))
        self.ctx.barrier()
        self._last_saved = self.position.step
        self._window.started += time.monotonic() - began  # keep samples/s about training


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak: the device allocator's on a GPU, the process's resident set on Linux
    (writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def peak_memory(device: torch.device) -> int | None:
    """Bytes at the peak since reset_peak_memory: tensors on a GPU, the resident set on a CPU
    (weights, optimizer state, activations and the runtime itself); None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def clipped_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """One optimizer step on the gradients of `params`, clipped to a total norm of
    MAX_GRAD_NORM."""
    if fused_clipping(optimizer):
        # The fused kernel divides every gradient by `grad_scale` as it reads it (the
        # attribute GradScaler itself sets), so clipping costs no pass over the gradients
        # of its own: about 4% of a CPU step on MiniLM. It stays on the device (no sync).
        grads = [p.grad for p in params if p.grad is not None]
        norm = sharding.local_norm(torch.nn.utils.get_total_norm(grads))
        optimizer.grad_scale = ((norm + CLIP_EPS) / MAX_GRAD_NORM).clamp(min=1.0)  # type: ignore[attr-defined]
    else:
        clip(params)
    optimizer.step()


def clip(params: list[torch.nn.Parameter]) -> None:
    """Scales the gradients of `params` to a total norm of at most MAX_GRAD_NORM.

    clip_grads_with_norm_ takes the parameters (it reads their `.grad`): given the gradient
    tensors themselves it finds no `.grad` on them and clips nothing, which the fp16 and the
    non-fused paths did before."""
    grads = [p.grad for p in params if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(
        params, MAX_GRAD_NORM, torch.nn.utils.get_total_norm(grads)
    )


def fused_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer applies `grad_scale` inside its kernel (fused Adam/AdamW)."""
    return bool(optimizer.defaults.get("fused")) and getattr(
        optimizer, "_step_supports_amp_scaling", False
    )


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: truth, columns: prediction).

    Macro-F1 averages over the classes that occur in the truth or the predictions, as
    scikit-learn does, so a class absent from a small validation split does not count as 0.
    """
    total = float(confusion.sum())
    true_positive = confusion.diag()
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    present = (support + predicted) > 0
    f1 = (2 * true_positive) / (support + predicted).clamp(min=1e-12)
    return {
        "accuracy": float(true_positive.sum()) / total if total else 0.0,
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
    }
