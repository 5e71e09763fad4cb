"""write_model_repository: layout, what is (not) packaged, checksums, atomic rewrite.

The checkpoint here is a folder of real files with the names a Hugging Face checkpoint has; the
writer only copies, links and hashes them, so their contents need not be a loadable model (the
e2e tests serve a real one).
"""

from __future__ import annotations

import ast
import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kubetune.api.v1alpha1.modelserver import TritonSpec
from kubetune.serving import repository
from kubetune.serving.repository import (
    WeightsFile,
    combined_checksum,
    read_manifest,
    write_model_repository,
)

LABELS = ["billing", "refund", "shipping"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model = tmp_path / "output"
    model.mkdir()
    config = {
        "architectures": ["BertForSequenceClassification"],
        "id2label": {str(i): label for i, label in enumerate(LABELS)},
        "label2id": {label: i for i, label in enumerate(LABELS)},
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_text("{}")
    (model / "tokenizer_config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights" * 1000)
    # What a Trainer leaves behind and serving must not carry.
    (model / "optimizer.pt").write_bytes(b"o" * 100)
    (model / "training_args.bin").write_bytes(b"t")
    (model / "rng_state_0.pth").write_bytes(b"r")
    (model / "checkpoint-10").mkdir()
    (model / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    return model


def test_layout(checkpoint: Path) -> None:
    repo = checkpoint / "triton-repository"  # inside the model folder, as the trainer does
    model_dir = write_model_repository(checkpoint, repo, "intents", "sequence-classification")
    assert model_dir == repo / "intents"
    assert sorted(p.name for p in repo.iterdir()) == ["intents"]  # no staging leftovers
    assert (model_dir / "config.pbtxt").is_file()
    assert (model_dir / "labels.txt").read_text().splitlines() == LABELS
    hf = model_dir / "1" / "hf"
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    source = (Path(repository.__file__).parent / "triton_model.py").read_text()
    assert (model_dir / "1" / "model.py").read_text() == source


def test_weights_are_hard_linked_on_the_same_filesystem(checkpoint: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(
        checkpoint, tmp_path / "repo", "m", "sequence-classification"
    )
    packaged = model_dir / "1" / "hf" / "model.safetensors"
    assert packaged.stat().st_ino == (checkpoint / "model.safetensors").stat().st_ino


def test_manifest(checkpoint: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(
        checkpoint, tmp_path / "repo", "m", "sequence-classification", max_sequence_length=96
    )
    manifest = read_manifest(model_dir)
    digest = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert manifest.checksum == f"sha256:{digest}"
    assert manifest.weights == [WeightsFile("model.safetensors", digest, 7000)]
    assert manifest.labels == LABELS
    assert manifest.task == "sequence-classification"
    assert manifest.max_sequence_length == 96
    raw = json.loads((model_dir / "1" / "kubetune-serving.json").read_text())
    assert raw["hfDir"] == "hf"


def test_causal_lm_has_no_labels(checkpoint: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(checkpoint, tmp_path / "repo", "gen", "causal-lm")
    assert read_manifest(model_dir).labels is None
    assert not (model_dir / "labels.txt").exists()
    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert [o.name for o in config.output] == ["GENERATED_TEXT"]


def test_triton_spec_reaches_the_config(checkpoint: Path, tmp_path: Path) -> None:
    triton = TritonSpec.model_validate({"maxBatchSize": 4, "dynamicBatching": {"enabled": False}})
    model_dir = write_model_repository(
        checkpoint, tmp_path / "repo", "m", "sequence-classification", triton
    )
    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.max_batch_size == 4
    assert not config.HasField("dynamic_batching")


def test_warmup_file_is_a_serialized_string_tensor(checkpoint: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(
        checkpoint, tmp_path / "repo", "m", "sequence-classification"
    )
    raw = (model_dir / "warmup" / "text").read_bytes()
    (length,) = struct.unpack("<I", raw[:4])
    assert raw[4:].decode() == repository.WARMUP_TEXT
    assert length == len(raw) - 4


def test_rewrite_replaces_the_model(checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model_repository(checkpoint, repo, "m", "sequence-classification")
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "model.safetensors").write_bytes(b"retrained")
    model_dir = write_model_repository(checkpoint, repo, "m", "sequence-classification")
    assert sorted(p.name for p in repo.iterdir()) == ["m"]
    assert (model_dir / "1" / "hf" / "model.safetensors").read_bytes() == b"retrained"
    expected = hashlib.sha256(b"retrained").hexdigest()
    assert read_manifest(model_dir).checksum == f"sha256:{expected}"


def test_sharded_weights_get_one_combined_checksum(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "model-00001-of-00002.safetensors").write_bytes(b"a")
    (checkpoint / "model-00002-of-00002.safetensors").write_bytes(b"b")
    manifest = read_manifest(
        write_model_repository(checkpoint, tmp_path / "repo", "m", "sequence-classification")
    )
    assert [w.name for w in manifest.weights] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert manifest.checksum == combined_checksum(manifest.weights)
    assert manifest.checksum != f"sha256:{manifest.weights[0].sha256}"


def test_adapter_only_checkpoint_is_refused(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    with pytest.raises(ValueError, match="merge"):
        write_model_repository(adapter, tmp_path / "repo", "m", "sequence-classification")
    assert not (tmp_path / "repo" / "m").exists()


def test_checkpoint_without_weights_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        write_model_repository(checkpoint, tmp_path / "repo", "m", "sequence-classification")


def test_python_backend_model_imports_only_what_triton_provides() -> None:
    """model.py runs inside Triton's stub, where kubetune itself is not installed."""
    source = (Path(repository.__file__).parent / "triton_model.py").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy", "torch", "transformers", "triton_python_backend_utils"}
