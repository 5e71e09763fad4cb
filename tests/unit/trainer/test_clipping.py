"""The trainer's optimizer step clips gradients to a total norm of 1, fused or not."""

from __future__ import annotations

import copy

import pytest
import torch

from kubetune.trainer.loop import MAX_GRAD_NORM, clipped_step, fused_clipping


@pytest.mark.parametrize("fused", [True, False])
def test_clipped_step_matches_clip_grad_norm_on_the_parameters(fused: bool) -> None:
    """Five AdamW steps on gradients far above the limit (norms 10-18): the same weights as
    torch's own clip_grad_norm_ over the parameters followed by a plain step."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(ours)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=fused)
    assert fused_clipping(optimizer) is fused
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for _ in range(5):
        x, y = torch.randn(8, 16) * 10, torch.randint(0, 4, (8,))
        for model in (ours, reference):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_GRAD_NORM)
        assert float(norm) > 5 * MAX_GRAD_NORM  # clipping matters in this step
        expected.step()
        clipped_step(optimizer, list(ours.parameters()))
        for opt in (optimizer, expected):
            opt.zero_grad()
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
