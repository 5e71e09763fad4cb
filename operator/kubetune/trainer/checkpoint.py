"""Checkpoints that survive preemption: atomic, self-describing, pruned to keep_last.

A checkpoint is a folder `step-NNNNNNNN/` written first as a `.tmp-...` folder and renamed into
place once every file is flushed to disk: the rename is the commit, so a kill at any instant leaves
either the previous complete checkpoint or the new one, never half of one. `checkpoint.json`
inside says where in the data the run stood (epoch + index of the next micro-batch in that epoch's
seeded plan), which is what lets a restart replay exactly the batches it had not yet trained on.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

NAME = re.compile(r"^step-(\d+)$")
META_FILE = "checkpoint.json"
MODEL_FILE = "model.pt"
TRAINING_FILE = "training.pt"


@dataclass
class Position:
    """How far training got: optimizer steps done, and the next micro-batch to train on."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class CheckpointMeta:
    position: Position
    total_steps: int
    world_size: int
    global_batch: int  # examples per micro-batch over all ranks, the unit of `position.batch`
    labels: list[str] | None
    task: str
    method: str
    time: str
    sharded: bool = False  # model and optimizer in torch.distributed.checkpoint shards (FSDP)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        raw = json.loads(text)
        raw["position"] = Position(**raw["position"])
        return cls(**raw)


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: CheckpointMeta
    model: dict[str, torch.Tensor]
    training: dict[str, Any]  # optimizer, scheduler, scaler, rng (one entry per rank)


def capture_rng() -> dict[str, Any]:
    """Every random generator a training step can draw from (dropout, shuffles in libraries)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples back that serialisation may have made lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


class Checkpointer:
    """Writes (rank 0) and finds checkpoints under one folder."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first. Temp folders never match the name pattern."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if NAME.match(p.name) and (p / META_FILE).is_file()]
        return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(
        self, meta: CheckpointMeta, model: dict[str, torch.Tensor], training: dict[str, Any]
    ) -> Path:
        return self.commit(self.begin(), meta, model, training)

    def begin(self) -> Path:
        """A fresh temp folder to write a checkpoint into (sharded saves: every rank writes its
        shards there before rank 0 commits)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        temp = self.root / f".tmp-{os.getpid()}-{time.monotonic_ns()}"
        temp.mkdir()
        return temp

    def commit(
        self,
        temp: Path,
        meta: CheckpointMeta,
        model: dict[str, torch.Tensor] | None,
        training: dict[str, Any],
    ) -> Path:
        """Writes the rest into `temp`, flushes everything to disk and renames it into place."""
        final = self.root / f"step-{meta.position.step:08d}"
        if model is not None:
            torch.save(model, temp / MODEL_FILE)
        torch.save(training, temp / TRAINING_FILE)
        (temp / META_FILE).write_text(meta.to_json(), encoding="utf-8")
        for item in sorted(temp.rglob("*"), key=lambda p: -len(p.parts)):
            _fsync(item)  # files and sub-folders (the shards) before their parents
        _fsync(temp)
        if final.exists():  # the same step saved again (a resumed run stopped at once)
            self._discard(final)
        temp.rename(final)
        _fsync(self.root)
        self._prune()
        return final

    def load(self, path: Path) -> LoadedCheckpoint:
        """Metadata, the unsharded weights (none in a sharded checkpoint: every rank reads its
        own shards later) and the training state."""
        meta = CheckpointMeta.from_json((path / META_FILE).read_text(encoding="utf-8"))
        model = {}
        if not meta.sharded:
            model = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
        training = torch.load(path / TRAINING_FILE, map_location="cpu", weights_only=True)
        return LoadedCheckpoint(path, meta, model, training)

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            self._discard(old)

    def _discard(self, path: Path) -> None:
        """Renames before deleting, so a half-deleted folder never looks like a checkpoint."""
        doomed = self.root / f".trash-{path.name}-{os.getpid()}"
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Temp and trash folders of a process that was killed while writing."""
        for item in self.root.iterdir():
            if item.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(item, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
