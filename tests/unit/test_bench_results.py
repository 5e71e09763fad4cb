"""`make bench`'s one table: the rows benchmarks record, printed with their ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench import results


def test_recorded_rows_print_as_one_table_with_ratios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "rows.jsonl"
    monkeypatch.setenv(results.ENV, str(target))
    results.record("serving", "req/s at 16 clients", 225.0, 111.0, "req/s", "batching off")
    results.record("scale", "time to all pods, N=100", 21.7, 8.6, "s", "training-operator")
    rows = [line for line in target.read_text().splitlines() if line]
    assert len(rows) == 2
    printed = results.table([json.loads(r) for r in rows])
    assert (
        "| serving | req/s at 16 clients | 225 req/s | 111 req/s | batching off | 2.03 |" in printed
    )
    assert (
        "| scale | time to all pods, N=100 | 21.7 s | 8.6 s | training-operator | 2.52 |" in printed
    )


def test_nothing_is_recorded_without_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(results.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    results.record("serving", "x", 1.0, 1.0, "s", "peer")
    assert list(tmp_path.iterdir()) == []
