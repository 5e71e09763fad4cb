"""Reading and validating datasets: every bad input names the file, the line and the spec field."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1.finetunejob import DatasetFormat, DatasetSpec
from kubetune.trainer import data
from kubetune.trainer.errors import BadDataError, Reason

SPEC = DatasetSpec(source="pvc://data/train.jsonl")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path: Path) -> data.Table:
    return data.read_table(path, data.detect_format(path, None))


def rows(count: int, labels: tuple[str, ...] = ("a", "b")) -> list[dict[str, Any]]:
    return [{"text": f"example {i}", "label": labels[i % len(labels)]} for i in range(count)]


def test_jsonl_rows_and_line_numbers_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x", "label": "a"}\n\n{"text": "y", "label": "b"}\n', "utf-8")
    table = load(path)
    assert [r["text"] for r in table.rows] == ["x", "y"]
    assert table.where(1) == f"line 3 of {path}"


def test_csv_is_read_with_its_header(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows(4))
    table = load(path)
    assert len(table.rows) == 4
    assert table.rows[3] == {"text": "example 3", "label": "b"}


def test_parquet_is_read_with_pyarrow(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows(5)), path)
    table = load(path)
    assert table.rows[4] == {"text": "example 4", "label": "a"}
    assert table.where(4) == f"row 5 of {path}"


def test_malformed_json_line_names_line_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": \n', "utf-8")
    with pytest.raises(BadDataError) as err:
        load(path)
    assert f"line 2 of {path}" in err.value.message
    assert err.value.reason is Reason.BAD_DATA


def test_a_json_line_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [["text", "label"]])
    with pytest.raises(BadDataError, match=r"line 1 of .* is not a JSON object"):
        load(path)


def test_empty_file_is_bad_data(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(BadDataError, match=f"dataset file {path} has no rows"):
        load(path)


def test_missing_label_field_names_field_spec_field_and_row(tmp_path: Path) -> None:
    table = load(write_jsonl(tmp_path / "d.jsonl", [*rows(3), {"text": "no label here"}]))
    with pytest.raises(BadDataError) as err:
        data.classification_data(table, SPEC)
    message = err.value.message
    assert "field 'label' (spec.dataset.labelField) is missing" in message
    assert f"line 4 of {table.path}" in message
    assert "fields present: text" in message


def test_renamed_text_field_is_reported_with_the_configured_name(tmp_path: Path) -> None:
    table = load(write_jsonl(tmp_path / "d.jsonl", rows(4)))
    spec = DatasetSpec(source="pvc://x/y.jsonl", text_field="utterance")
    with pytest.raises(BadDataError, match=r"field 'utterance' \(spec.dataset.textField\)"):
        data.classification_data(table, spec)


@pytest.mark.parametrize("label", [None, "", 1.5, ["a"], {"x": 1}, True])
def test_unusable_labels_are_refused(tmp_path: Path, label: Any) -> None:
    table = load(write_jsonl(tmp_path / "d.jsonl", [*rows(2), {"text": "t", "label": label}]))
    with pytest.raises(BadDataError, match=r"line 3 of .* unusable label"):
        data.classification_data(table, SPEC)


def test_a_single_class_cannot_be_learned(tmp_path: Path) -> None:
    table = load(write_jsonl(tmp_path / "d.jsonl", rows(4, labels=("only",))))
    with pytest.raises(BadDataError, match="single label 'only'"):
        data.classification_data(table, SPEC)


def test_labels_map_to_sorted_ids(tmp_path: Path) -> None:
    table = load(write_jsonl(tmp_path / "d.jsonl", rows(6, labels=("refund", "billing", "cancel"))))
    result = data.classification_data(table, SPEC)
    assert result.labels == ["billing", "cancel", "refund"]
    assert result.label_ids[:3] == [2, 0, 1]


def test_integer_labels_keep_their_numeric_order(tmp_path: Path) -> None:
    table = load(write_jsonl(tmp_path / "d.jsonl", [{"text": "t", "label": n} for n in (10, 2, 1)]))
    assert data.classification_data(table, SPEC).labels == ["1", "2", "10"]


def test_label_unknown_to_the_resumed_checkpoint_is_refused(tmp_path: Path) -> None:
    table = load(write_jsonl(tmp_path / "d.jsonl", rows(4, labels=("a", "b", "c"))))
    with pytest.raises(BadDataError, match=r"line 3 of .*unknown label 'c'"):
        data.classification_data(table, SPEC, known_labels=["a", "b"])


def test_causal_data_is_plain_text_or_prompt_response(tmp_path: Path) -> None:
    plain = load(write_jsonl(tmp_path / "p.jsonl", [{"text": "hello"}, {"text": "world"}]))
    assert data.causal_data(plain, SPEC).responses is None
    pairs = load(write_jsonl(tmp_path / "q.jsonl", [{"text": "q?", "label": "a!"}]))
    assert data.causal_data(pairs, SPEC).responses == ["a!"]
    mixed = load(write_jsonl(tmp_path / "m.jsonl", [{"text": "q?", "label": "a!"}, {"text": "x"}]))
    with pytest.raises(BadDataError, match=r"line 2 .*'label' \(spec.dataset.labelField\)"):
        data.causal_data(mixed, SPEC)


def test_format_comes_from_spec_then_suffix(tmp_path: Path) -> None:
    assert data.detect_format(tmp_path / "a.csv", None) is DatasetFormat.CSV
    assert data.detect_format(tmp_path / "a.txt", "jsonl") is DatasetFormat.JSONL
    with pytest.raises(BadDataError, match=r"spec\.dataset\.format"):
        data.detect_format(tmp_path / "a.txt", None)


def test_folder_resolves_to_its_single_or_train_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "only.jsonl", rows(2))
    assert data.find_data_file(tmp_path) == tmp_path / "only.jsonl"
    write_jsonl(tmp_path / "train.jsonl", rows(2))
    assert data.find_data_file(tmp_path) == tmp_path / "train.jsonl"
    write_jsonl(tmp_path / "train-2.jsonl", rows(2))
    with pytest.raises(BadDataError, match="several data files"):
        data.find_data_file(tmp_path)
    with pytest.raises(BadDataError, match="does not exist"):
        data.find_data_file(tmp_path / "nope")


def test_split_is_seeded_stratified_and_keeps_every_class() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 3
    train, val = data.split_indices(len(labels), labels, 0.2, seed=7)
    assert sorted(train + val) == list(range(len(labels)))
    assert [sum(labels[i] == c for i in val) for c in (0, 1, 2)] == [10, 6, 1]
    assert data.split_indices(len(labels), labels, 0.2, seed=7) == (train, val)
    assert data.split_indices(len(labels), labels, 0.2, seed=8) != (train, val)
    assert data.split_indices(10, None, 0.0, seed=1) == (list(range(10)), [])


class FakeTokenizer:
    """A whitespace tokenizer with the call signature of a Hugging Face one (ids = word lengths)."""

    eos_token_id = 99

    def __call__(self, texts: list[str], **kwargs: Any) -> dict[str, list[list[int]]]:
        special = [] if kwargs.get("add_special_tokens") is False else [1]
        ids = [special + [len(w) for w in t.split()] for t in texts]
        limit = kwargs.get("max_length")
        return {"input_ids": [i[:limit] if limit else i for i in ids]}


def test_causal_prompt_tokens_are_masked_out_of_the_loss() -> None:
    texts = data.CausalData(["what is up", "hi"], ["not much", "yo"])
    examples = data.tokenize_causal(FakeTokenizer(), texts, [0, 1], max_length=6)
    first = examples[0]
    assert first.input_ids == [4, 2, 2, 3, 4, 99]  # the prompt's start gives way to the answer
    assert first.target == [data.IGNORE_INDEX] * 3 + [3, 4, 99]
    assert examples[1].target == [data.IGNORE_INDEX] * 2 + [2, 99]


def test_classification_tokens_truncate_to_max_length() -> None:
    classes = data.ClassificationData(["a bb ccc dddd"], [1], ["x", "y"])
    [example] = data.tokenize_classification(FakeTokenizer(), classes, [0], max_length=3)
    assert example.input_ids == [1, 1, 2]
    assert example.target == 1
