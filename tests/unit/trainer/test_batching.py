"""The batch plan: a pure function of (seed, epoch, world size), which exact resume relies on."""

from __future__ import annotations

import random

import pytest

from kubetune.trainer.data import BatchPlan, eval_batches, mega_batch_multiple
from kubetune.trainer.errors import BadDataError

_RNG = random.Random(3)
LENGTHS = [_RNG.randint(4, 60) for _ in range(203)]


def test_one_process_sees_every_example_once_per_epoch() -> None:
    plan = BatchPlan(LENGTHS, batch_size=16, world_size=1, rank=0, seed=1)
    batches = plan.rank_batches(0)
    assert len(batches) == plan.batches_per_epoch == 13  # ceil(203 / 16)
    assert sorted(i for b in batches for i in b) == list(range(203))


def test_plan_is_reproducible_and_changes_with_epoch_and_seed() -> None:
    plan = BatchPlan(LENGTHS, batch_size=16, world_size=1, rank=0, seed=1)
    again = BatchPlan(LENGTHS, batch_size=16, world_size=1, rank=0, seed=1)
    assert plan.rank_batches(2) == again.rank_batches(2)
    assert plan.rank_batches(2) != plan.rank_batches(3)
    assert plan.rank_batches(2) != BatchPlan(LENGTHS, 16, 1, 0, seed=2).rank_batches(2)


def test_longest_batch_runs_first_and_batches_are_length_grouped() -> None:
    plan = BatchPlan(LENGTHS, batch_size=16, world_size=1, rank=0, seed=1)
    batches = plan.rank_batches(0)
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS)
    padded = sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)
    shuffled = list(range(len(LENGTHS)))
    random.Random(0).shuffle(shuffled)
    chunks = [shuffled[i : i + 16] for i in range(0, len(shuffled), 16)]
    unsorted = sum(len(b) * max(LENGTHS[i] for i in b) for b in chunks)
    assert padded < 0.75 * unsorted  # grouping saves at least a quarter of the padded tokens


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_get_disjoint_equal_count_shards_covering_the_epoch(world: int) -> None:
    plans = [BatchPlan(LENGTHS, 8, world, rank, seed=5) for rank in range(world)]
    per_rank = [p.rank_batches(1) for p in plans]
    assert {len(b) for b in per_rank} == {plans[0].batches_per_epoch}
    assert plans[0].batches_per_epoch == -(-203 // (8 * world))
    for step in range(plans[0].batches_per_epoch):
        assert all(per_rank[r][step] for r in range(world))  # nobody idles in a DDP step
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(203))
    assert len(seen) - 203 < world  # only the padding to a multiple of the world size repeats


def test_empty_training_set_is_bad_data() -> None:
    with pytest.raises(BadDataError, match="no training examples"):
        BatchPlan([], 8, 1, 0, seed=1)


def test_eval_batches_cover_validation_once_across_ranks() -> None:
    shards = [eval_batches(LENGTHS, 10, 3, rank) for rank in range(3)]
    seen = sorted(i for shard in shards for b in shard for i in b)
    assert seen == list(range(len(LENGTHS)))
    assert all(len(b) <= 10 for shard in shards for b in shard)


def test_mega_batches_are_fifty_global_batches_or_a_quarter_of_the_epoch() -> None:
    assert mega_batch_multiple(100_000, 16) == 50
    assert mega_batch_multiple(432, 16) == 6  # the shipped intents set: 27 batches, 4.5 mega
    assert mega_batch_multiple(432, 32) == 3  # two ranks of 16: the global batch counts
    assert mega_batch_multiple(40, 16) == 1  # under 4 batches: plain random batches


def test_a_small_epoch_is_not_sorted_by_length_as_a_whole() -> None:
    """With a fixed mega-batch of 50 batches, an epoch of 27 batches was sorted as one block, so
    every batch held 16 neighbouring lengths; one epoch of MiniLM on the shipped data then reached
    about 0.04 less accuracy than on random batches (docs/benchmarks-trainer.md). Each length
    here is distinct, so a batch cut from one sorted block spans exactly 15 length units."""
    lengths = list(range(8, 8 + 432))
    random.Random(7).shuffle(lengths)
    plan = BatchPlan(lengths, batch_size=16, world_size=1, rank=0, seed=42)
    batches = plan.rank_batches(0)
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(span == 15 for span in spans) < len(batches) // 2
    assert sum(spans) / len(spans) > 3 * 15  # drawn from a quarter of the epoch: about 4.5x
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch still first
