"""Checkpoint files: atomic commits, pruning, and the state they restore."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from kubetune.trainer.checkpoint import (
    Checkpointer,
    CheckpointMeta,
    Position,
    capture_rng,
    restore_rng,
)


def meta(step: int) -> CheckpointMeta:
    return CheckpointMeta(
        position=Position(step, 1, 3),
        total_steps=100,
        world_size=2,
        global_batch=32,
        labels=["a", "b"],
        task="sequence-classification",
        method="full",
        time="2024-01-01T00:00:00+00:00",
    )


def save(ckpt: Checkpointer, step: int) -> Path:
    return ckpt.save(meta(step), {"w": torch.full((2,), float(step))}, {"rng": [capture_rng()]})


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    path = save(ckpt, 7)
    assert path.name == "step-00000007"
    loaded = ckpt.load(path)
    assert loaded.meta == meta(7)
    assert torch.equal(loaded.model["w"], torch.tensor([7.0, 7.0]))


def test_only_keep_last_complete_checkpoints_remain(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        save(ckpt, step)
    assert [p.name for p in ckpt.complete()] == ["step-00000020", "step-00000030"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000030"]


def test_temp_and_unfinished_folders_are_never_resumed_from(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=3)
    save(ckpt, 5)
    (tmp_path / ".tmp-step-00000009-123").mkdir()  # killed while writing
    (tmp_path / "step-00000008").mkdir()  # no checkpoint.json: not complete
    assert ckpt.latest() == tmp_path / "step-00000005"
    save(ckpt, 6)
    assert not (tmp_path / ".tmp-step-00000009-123").exists()  # swept on the next save


def test_steps_sort_numerically_not_by_name(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=5)
    for step in (9, 100, 20):
        save(ckpt, step)
    assert ckpt.latest() == tmp_path / "step-00000100"


def test_rng_state_restores_every_generator() -> None:
    state = capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_rng_state_survives_the_checkpoint_file(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1)
    state = capture_rng()
    expected = (random.random(), float(torch.rand(1)))
    path = ckpt.save(meta(1), {}, {"rng": [state]})
    restore_rng(ckpt.load(path).training["rng"][0])
    assert (random.random(), float(torch.rand(1))) == expected


def test_a_sharded_checkpoint_commits_the_shards_folder_and_loads_without_weights(
    tmp_path: Path,
) -> None:
    """FSDP: the ranks write shards into the temp folder, rank 0 commits it with the rest; the
    loaded checkpoint carries no unsharded weights (each rank reads its shards itself)."""
    ckpt = Checkpointer(tmp_path, keep_last=2)
    temp = ckpt.begin()
    (temp / "sharded").mkdir()
    (temp / "sharded" / "__0_0.distcp").write_bytes(b"shard")
    sharded = CheckpointMeta(**{**meta(4).__dict__, "sharded": True})
    path = ckpt.commit(temp, sharded, None, {"rng": [capture_rng()]})
    assert not temp.exists()
    assert (path / "sharded" / "__0_0.distcp").read_bytes() == b"shard"
    loaded = ckpt.load(path)
    assert loaded.meta.sharded and loaded.model == {}
    assert ckpt.load(save(ckpt, 5)).meta.sharded is False  # the default, as in old checkpoints
