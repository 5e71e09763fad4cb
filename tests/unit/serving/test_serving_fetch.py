"""The ModelServer init container (kubetune.serving.fetch), run through its command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kubetune.serving import fetch
from kubetune.serving.repository import read_manifest, write_model_repository


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model = tmp_path / "output"
    model.mkdir()
    config = {"id2label": {"0": "billing", "1": "refund"}}
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    return model


def run(tmp_path: Path, source: Path | str, *extra: str) -> tuple[int, str]:
    log = tmp_path / "termination-log"
    code = fetch.main(
        [
            f"--source={source}",
            f"--dest={tmp_path / 'models'}",
            "--model-name=served",
            f"--termination-log={log}",
            *extra,
        ]
    )
    return code, log.read_text()


def config_of(tmp_path: Path) -> model_config_pb2.ModelConfig:
    text = (tmp_path / "models" / "served" / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_plain_checkpoint_with_the_modelserver_settings(checkpoint: Path, tmp_path: Path) -> None:
    code, message = run(
        tmp_path,
        checkpoint,
        "--task=sequence-classification",
        "--max-batch-size=8",
        "--instance-count=2",
        "--dynamic-batching=true",
        "--max-queue-delay-us=100",
        "--preferred-batch-size=4",
        "--preferred-batch-size=8",
        "--gpus=1",
    )
    assert code == 0
    config = config_of(tmp_path)
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    [group] = config.instance_group
    assert (group.count, group.kind) == (2, model_config_pb2.ModelInstanceGroup.KIND_GPU)
    recorded = json.loads(message)
    manifest = read_manifest(tmp_path / "models" / "served")
    assert recorded == {
        "checksum": manifest.checksum,
        "modelName": "served",
        "packaged": True,
        "source": str(checkpoint),
        "task": "sequence-classification",
    }


def test_finetunejob_output_is_repackaged_under_the_served_name(
    checkpoint: Path, tmp_path: Path
) -> None:
    """The trainer's repository carries the job's name and default settings; the ModelServer's
    name and settings win, and the task comes from the manifest."""
    write_model_repository(checkpoint, checkpoint / "triton-repository", "job-1", "causal-lm")
    code, _ = run(
        tmp_path, checkpoint / "triton-repository", "--dynamic-batching=false", "--gpus=0"
    )
    assert code == 0
    config = config_of(tmp_path)
    assert config.name == "served"
    assert not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert read_manifest(tmp_path / "models" / "served").task == "causal-lm"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["served"]


def test_corrupted_repository_fails_in_the_init_container(checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = write_model_repository(checkpoint, repo, "job-1", "sequence-classification")
    weights = model / "1" / "hf" / "model.safetensors"
    weights.unlink()
    weights.write_bytes(b"garbage")
    code, message = run(tmp_path, repo)
    assert code == 1
    assert message.startswith("ModelFetchFailed:")
    assert "corrupted" in message
    assert not (tmp_path / "models" / "served").exists()


def test_plain_checkpoint_needs_a_task(checkpoint: Path, tmp_path: Path) -> None:
    code, message = run(tmp_path, checkpoint)
    assert code == 1
    assert "--task" in message


def test_foreign_triton_repository_is_copied_unchanged(tmp_path: Path) -> None:
    repo = tmp_path / "foreign"
    (repo / "served" / "1").mkdir(parents=True)
    (repo / "served" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    (repo / "served" / "1" / "model.onnx").write_bytes(b"onnx")
    code, message = run(tmp_path, repo)
    assert code == 0
    assert json.loads(message)["packaged"] is False
    copied = tmp_path / "models" / "served" / "config.pbtxt"
    assert copied.read_text() == 'backend: "onnxruntime"\n'


def test_foreign_repository_must_hold_the_served_model(tmp_path: Path) -> None:
    repo = tmp_path / "foreign"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    code, message = run(tmp_path, repo)
    assert code == 1
    assert "has no model 'served' (it has other)" in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [("pvc://claim/path", "mounted"), ("/does/not/exist", "does not exist")],
)
def test_bad_sources_are_explained(tmp_path: Path, source: str, expected: str) -> None:
    code, message = run(tmp_path, source, "--task=causal-lm")
    assert code == 1
    assert expected in message
