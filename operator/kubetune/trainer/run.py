"""One training run, start to finish: data, model, resume, loop, export.

The order is chosen so that mistakes surface cheaply: the checkpoint folder and the data are read
and validated before the model is downloaded, and the model is loaded before any step is taken.
"""

from __future__ import annotations

import hashlib
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kubetune.api.v1alpha1.finetunejob import Method, OutputStatus, Sharding, Task
from kubetune.api.v1alpha1.trainerconfig import TrainerConfig
from kubetune.trainer import data, events, modeling, sharding
from kubetune.trainer.checkpoint import Checkpointer, LoadedCheckpoint, Position, restore_rng
from kubetune.trainer.distributed import DistContext, StopAgreement, init_distributed, shutdown
from kubetune.trainer.errors import ConfigError
from kubetune.trainer.export import export
from kubetune.trainer.loop import Trainee, TrainingLoop, total_steps
from kubetune.trainer.reporting import Reporter
from kubetune.trainer.sources import fetch_dataset, fetch_model


@dataclass
class RunResult:
    total_steps: int
    position: Position
    metrics: dict[str, float]
    samples_per_second: float
    train_seconds: float
    wall_seconds: float
    output: OutputStatus | None
    cpu_seconds: float = 0.0


@dataclass
class Prepared:
    """Validated, tokenized data and the label map."""

    train: list[data.Example]
    validation: list[data.Example]
    labels: list[str] | None


def run(config: TrainerConfig) -> RunResult:
    """Trains as one process of the job (torchrun's environment says which)."""
    hp = config.spec.hyperparameters
    ctx = init_distributed(
        use_gpus=config.spec.resources.gpus_per_node > 0,
        group_for_one=hp.sharding == Sharding.FSDP,
    )
    stop = StopAgreement(ctx)
    reporter = Reporter(config, ctx.is_main)
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.request())
    try:
        return _run(config, ctx, stop, reporter)
    finally:
        signal.signal(signal.SIGTERM, previous)
        reporter.close()
        shutdown(ctx)


@dataclass
class Job:
    """Everything set up for the loop, before its first step."""

    loop: TrainingLoop
    start: Position
    tokenizer: Any
    prepared: Prepared
    model_dir: Path


def exportable_model(config: TrainerConfig, ctx: DistContext, job: Job) -> torch.nn.Module | None:
    """What rank 0 exports: the trained model itself, or an unsharded, unquantised copy of it.

    Under FSDP every rank takes part in gathering the full weights, once, to rank 0's host
    memory; QLoRA's adapters go onto a bf16 copy of the base. None on the other ranks."""
    trainee = job.loop.trainee
    state: dict[str, torch.Tensor] | None = None
    if trainee.fsdp:
        state = sharding.full_state_on_rank0(trainee.model)
    elif config.spec.method == Method.QLORA and ctx.is_main:
        state = modeling.trainable_state(trainee.model, lora=True)
    if not ctx.is_main:
        return None
    if state is None:
        return trainee.model
    return modeling.build_export_model(
        job.model_dir,
        config.spec,
        job.prepared.labels,
        job.tokenizer.pad_token_id,
        trainee.autocast_dtype,
        state,
    )


def _run(
    config: TrainerConfig, ctx: DistContext, stop: StopAgreement, reporter: Reporter
) -> RunResult:
    job = set_up(config, ctx, stop, reporter)
    result = job.loop.run(job.start)
    output = None
    final = exportable_model(config, ctx, job)
    if ctx.is_main:
        assert final is not None
        if config.spec.task == Task.CAUSAL_LM:
            set_use_cache(final, True)  # off for training (packing), on for generation
        with reporter.beating("exporting the model"):
            output = export(
                config,
                model=final,
                tokenizer=job.tokenizer,
                labels=job.prepared.labels,
                metrics=result.metrics,
                steps=result.position.step,
            )
        events.emit("exported", path=config.paths.output, output=output.to_wire())
        reporter.output(output, result.progress)
    ctx.barrier()  # nobody exits (and tears the group down) while rank 0 still exports
    events.emit(
        "finished",
        rank=ctx.rank,
        worldSize=ctx.world_size,
        step=result.position.step,
        totalSteps=job.loop.total_steps,
        metrics=result.metrics,
        samplesPerSecond=round(result.samples_per_second, 2),
        trainSeconds=round(result.train_seconds, 2),
        loopSeconds=round(result.wall_seconds, 2),
        peakMemoryBytes=result.peak_memory_bytes,
    )
    return RunResult(
        job.loop.total_steps,
        result.position,
        result.metrics,
        result.samples_per_second,
        result.train_seconds,
        result.wall_seconds,
        output,
        result.cpu_seconds,
    )


def set_up(config: TrainerConfig, ctx: DistContext, stop: StopAgreement, reporter: Reporter) -> Job:
    """Checkpoint, data, model, optimizer, position: all checks that can fail, before step one."""
    spec, hp = config.spec, config.spec.hyperparameters
    checkpointer = Checkpointer(Path(config.paths.checkpoints), spec.checkpointing.keep_last)
    resume = load_resume(ctx, checkpointer)
    with reporter.beating("fetching the dataset"):
        table = read_data(config, ctx)
    with ctx.local_main_first(), reporter.beating("fetching the model"):
        model_dir = fetch_model(config.paths.model, spec.model.revision)
    tokenizer = modeling.load_tokenizer(model_dir)
    prepared = prepare(config, table, tokenizer, resume.meta.labels if resume else None)
    lengths = [len(e.input_ids) for e in prepared.train]
    plan = data.BatchPlan(lengths, hp.batch_size, ctx.world_size, ctx.rank, hp.seed)
    trainee = build_trainee(
        config,
        ctx=ctx,
        model_dir=model_dir,
        labels=prepared.labels,
        pad_token_id=tokenizer.pad_token_id,
        resume=resume,
        steps=total_steps(plan, hp),
    )
    loop = TrainingLoop(
        config=config,
        ctx=ctx,
        trainee=trainee,
        train=prepared.train,
        validation=prepared.validation,
        plan=plan,
        pad_id=tokenizer.pad_token_id,
        labels=prepared.labels,
        checkpointer=checkpointer,
        reporter=reporter,
        stop=stop,
    )
    start = restore_training(config, ctx, trainee, loop, resume)
    _announce(
        config, ctx=ctx, loop=loop, prepared=prepared, trainee=trainee, resume=resume, start=start
    )
    return Job(loop, start, tokenizer, prepared, model_dir)


def load_resume(ctx: DistContext, checkpointer: Checkpointer) -> LoadedCheckpoint | None:
    """Rank 0 reads the newest complete checkpoint and shares all but the weights.

    Only rank 0 is sure to see the folder it wrote (other nodes may not mount it); the weights
    reach the other ranks through DDP's initial broadcast of rank 0's parameters.
    """
    loaded: LoadedCheckpoint | None = None
    if ctx.is_main:
        for path in reversed(checkpointer.complete()):
            try:
                loaded = checkpointer.load(path)
                break
            except Exception as exc:
                events.emit("warning", message=f"skipping unreadable checkpoint {path}: {exc}")
    if not ctx.distributed:
        return loaded
    shared: list[Any] = [None if loaded is None else (loaded.path, loaded.meta, loaded.training)]
    dist.broadcast_object_list(shared, src=0, group=ctx.control)
    if ctx.is_main or shared[0] is None:
        return loaded
    path, meta, training = shared[0]
    return LoadedCheckpoint(path, meta, {}, training)


def read_data(config: TrainerConfig, ctx: DistContext) -> data.Table:
    with ctx.local_main_first():
        location = fetch_dataset(config.paths.dataset)
    path = data.find_data_file(location)
    return data.read_table(path, data.detect_format(path, config.spec.dataset.format))


def prepare(
    config: TrainerConfig, table: data.Table, tokenizer: Any, known_labels: list[str] | None
) -> Prepared:
    spec, hp = config.spec, config.spec.hyperparameters
    if spec.task == Task.SEQUENCE_CLASSIFICATION:
        classes = data.classification_data(table, spec.dataset, known_labels)
        train_idx, val_idx = data.split_indices(
            len(table.rows), classes.label_ids, spec.dataset.validation_split, hp.seed
        )
        return Prepared(
            data.tokenize_classification(tokenizer, classes, train_idx, hp.max_seq_length),
            data.tokenize_classification(tokenizer, classes, val_idx, hp.max_seq_length),
            classes.labels,
        )
    train_idx, val_idx = data.split_indices(
        len(table.rows), None, spec.dataset.validation_split, hp.seed
    )
    if spec.dataset.messages_field:
        chats = data.chat_data(table, spec.dataset)
        train = data.tokenize_chat(tokenizer, chats, train_idx, hp.max_seq_length)
        validation = data.tokenize_chat(tokenizer, chats, val_idx, hp.max_seq_length)
    else:
        texts = data.causal_data(table, spec.dataset)
        train = data.tokenize_causal(tokenizer, texts, train_idx, hp.max_seq_length)
        validation = data.tokenize_causal(tokenizer, texts, val_idx, hp.max_seq_length)
    if hp.packing:
        train = data.pack(train, hp.max_seq_length)
        validation = data.pack(validation, hp.max_seq_length)
    return Prepared(train, validation, None)


def build_trainee(
    config: TrainerConfig,
    *,
    ctx: DistContext,
    model_dir: Path,
    labels: list[str] | None,
    pad_token_id: int,
    resume: LoadedCheckpoint | None,
    steps: int,
) -> Trainee:
    spec = config.spec
    lora = modeling.is_lora(spec)
    autocast_dtype = modeling.resolve_precision(spec.hyperparameters.precision, ctx.device)
    torch.manual_seed(spec.hyperparameters.seed)  # the same new head (and adapters) on every rank
    model = modeling.build_model(model_dir, spec, labels, pad_token_id, autocast_dtype, ctx.device)
    if spec.task == Task.CAUSAL_LM:
        # Training needs no KV cache, and with one transformers ignores packed sequences'
        # boundaries (position ids); the export turns it back on for generation.
        set_use_cache(model, False)
    fits = sharding.planner_fits(model_dir, len(labels) if labels else 2)
    fsdp = sharding.use_fsdp(spec, ctx, model, fits)
    if resume is not None and resume.meta.sharded != fsdp:
        written = "with" if resume.meta.sharded else "without"
        raise ConfigError(
            f"the checkpoint {resume.path} was written {written} FSDP and this run "
            f"{'uses' if fsdp else 'does not use'} it "
            "(hyperparameters.sharding, or the process count with sharding auto); resume with the "
            "setting that wrote it, or remove the checkpoints to start over"
        )
    if resume is not None and ctx.is_main and not fsdp:
        modeling.load_trainable_state(model, resume.model, lora)
    forward: torch.nn.Module = model
    if fsdp:
        model = forward = sharding.shard(model, ctx, autocast_dtype)
    else:
        if spec.method != Method.QLORA:  # a 4-bit base is placed as it is quantised
            model = model.to(ctx.device)
        forward = model
        if ctx.distributed:
            forward = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
    optimizer = modeling.build_optimizer(model, spec.hyperparameters, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    scheduler = modeling.build_scheduler(optimizer, spec.hyperparameters.warmup_ratio, steps)
    return Trainee(model, forward, optimizer, scheduler, scaler, autocast_dtype, lora, fsdp)


def set_use_cache(model: torch.nn.Module, on: bool) -> None:
    config: Any = getattr(model, "config", None)
    if config is not None:
        config.use_cache = on


def restore_training(
    config: TrainerConfig,
    ctx: DistContext,
    trainee: Trainee,
    loop: TrainingLoop,
    resume: LoadedCheckpoint | None,
) -> Position:
    """Optimizer, scheduler, scaler, RNG and data position from a checkpoint (or a fresh start)."""
    seed = config.spec.hyperparameters.seed
    if resume is None:
        reseed(seed, ctx.rank, 0)
        return Position()
    state = resume.training
    if resume.meta.sharded:
        shards = resume.path / sharding.SHARDS_FOLDER
        sharding.load_shards(shards, trainee.model, trainee.optimizer, trainee.lora)
    else:
        trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    if trainee.scaler is not None and state.get("scaler"):
        trainee.scaler.load_state_dict(state["scaler"])
    meta = resume.meta
    if meta.world_size == ctx.world_size and meta.global_batch == loop.plan.global_batch:
        restore_rng(state["rng"][ctx.rank])
        return meta.position
    position = remap_position(meta.position, meta.global_batch, loop)
    trainee.scheduler.last_epoch = position.step
    reseed(seed, ctx.rank, position.step)
    if ctx.is_main:
        events.emit(
            "warning",
            message=f"the checkpoint was written by {meta.world_size} processes (global batch "
            f"{meta.global_batch}); this run has {ctx.world_size} (global batch "
            f"{loop.plan.global_batch}): resuming at the nearest batch, step {position.step}",
        )
    return position


def remap_position(saved: Position, saved_global_batch: int, loop: TrainingLoop) -> Position:
    """The same point in the epoch when the global batch changed (a job resized between runs)."""
    per_epoch = loop.plan.batches_per_epoch
    batch = min(saved.batch * saved_global_batch // loop.plan.global_batch, per_epoch)
    batch -= batch % loop.accum
    if batch >= per_epoch:
        return Position((saved.epoch + 1) * loop.steps_per_epoch, saved.epoch + 1, 0)
    return Position(saved.epoch * loop.steps_per_epoch + batch // loop.accum, saved.epoch, batch)


def reseed(seed: int, rank: int, step: int) -> None:
    """Distinct, reproducible random streams per rank (dropout differs across data shards)."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:4], "little")
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _announce(
    config: TrainerConfig,
    *,
    ctx: DistContext,
    loop: TrainingLoop,
    prepared: Prepared,
    trainee: Trainee,
    resume: LoadedCheckpoint | None,
    start: Position,
) -> None:
    spec = config.spec
    events.emit(
        "started",
        rank=ctx.rank,
        worldSize=ctx.world_size,
        device=str(ctx.device),
        precision=str(trainee.autocast_dtype or torch.float32).removeprefix("torch."),
        sharding="fsdp" if trainee.fsdp else ("ddp" if ctx.distributed else "none"),
        activationCheckpointing=spec.hyperparameters.activation_checkpointing,
        trainableParameters=sum(p.numel() for p in trainee.model.parameters() if p.requires_grad),
        quantizedLayers=sum(  # bitsandbytes' own 4-bit layers (peft's wrappers share the name)
            type(m).__module__.startswith("bitsandbytes") for m in trainee.model.modules()
        ),
        task=str(spec.task),
        method=str(spec.method),
        epochs=spec.hyperparameters.epochs,
        stepsPerEpoch=loop.steps_per_epoch,
        totalSteps=loop.total_steps,
        globalBatch=loop.plan.global_batch * loop.accum,
        trainExamples=len(prepared.train),
        validationExamples=len(prepared.validation),
        labels=prepared.labels,
        startStep=start.step,
    )
    if resume is not None and ctx.is_main:
        events.emit(
            "resumed",
            checkpoint=str(resume.path),
            step=start.step,
            epoch=start.epoch,
            batch=start.batch,
        )
