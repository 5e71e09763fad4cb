"""Evaluation metrics and batch collation."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from kubetune.trainer.data import IGNORE_INDEX, Example
from kubetune.trainer.loop import classification_metrics, collate


def confusion_of(truth: list[int], predicted: list[int], classes: int) -> torch.Tensor:
    flat = torch.bincount(
        torch.tensor(truth) * classes + torch.tensor(predicted), minlength=classes**2
    )
    return flat.view(classes, classes).double()


@pytest.mark.parametrize(
    ("truth", "predicted"),
    [
        ([0, 1, 2, 2, 1, 0, 0], [0, 2, 2, 2, 1, 1, 0]),
        ([0, 0, 1, 1], [0, 0, 1, 1]),
        ([0, 0, 0, 1], [2, 0, 0, 1]),  # a predicted class absent from the truth
        ([0, 1, 1, 1], [1, 1, 1, 1]),
    ],
)
def test_metrics_match_scikit_learn(truth: list[int], predicted: list[int]) -> None:
    metrics = classification_metrics(confusion_of(truth, predicted, classes=4))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_collate_pads_to_the_longest_and_rounds_up() -> None:
    batch = collate([Example([5, 6, 7], 1), Example([8], 0)], pad_id=0, multiple=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_collate_pads_token_labels_with_the_ignore_index() -> None:
    batch = collate([Example([5, 6], [IGNORE_INDEX, 6]), Example([7], [7])], pad_id=9, multiple=1)
    assert batch["input_ids"].tolist() == [[5, 6], [7, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6], [7, IGNORE_INDEX]]
