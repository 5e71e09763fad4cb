"""render_config_pbtxt: the text must parse as Triton's own ModelConfig protobuf and say what the
TritonSpec says."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kubetune.api.v1alpha1.modelserver import TritonSpec
from kubetune.serving.repository import InstanceKind, render_config_pbtxt

Config = model_config_pb2.ModelConfig


def parse(text: str) -> model_config_pb2.ModelConfig:
    """Parse with Triton's real schema: a misspelt field or a bad enum fails here."""
    return text_format.Parse(text, Config())


def spec(**wire: object) -> TritonSpec:
    return TritonSpec.model_validate(wire)


def test_defaults_come_from_the_api_model() -> None:
    defaults = TritonSpec()
    config = parse(render_config_pbtxt("intents", "sequence-classification"))
    assert config.name == "intents"
    assert config.backend == "python"
    assert config.max_batch_size == defaults.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert (
        config.dynamic_batching.max_queue_delay_microseconds
        == defaults.dynamic_batching.max_queue_delay_microseconds
    )
    assert list(config.dynamic_batching.preferred_batch_size) == []
    [group] = config.instance_group
    assert group.count == defaults.instance_count
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO


def test_classification_io() -> None:
    config = parse(render_config_pbtxt("intents", "sequence-classification"))
    [text] = config.input
    assert (text.name, text.data_type, list(text.dims)) == (
        "TEXT",
        model_config_pb2.TYPE_STRING,
        [1],
    )
    outputs = {o.name: o for o in config.output}
    assert set(outputs) == {"LABEL", "SCORES"}
    assert outputs["LABEL"].data_type == model_config_pb2.TYPE_STRING
    assert outputs["SCORES"].data_type == model_config_pb2.TYPE_FP32
    assert list(outputs["SCORES"].dims) == [-1]
    assert outputs["SCORES"].label_filename == "labels.txt"
    assert config.parameters["task"].string_value == "sequence-classification"
    assert "max_new_tokens" not in config.parameters


def test_causal_lm_io_and_token_bound() -> None:
    config = parse(render_config_pbtxt("writer", "causal-lm", max_new_tokens=48))
    assert [o.name for o in config.output] == ["GENERATED_TEXT"]
    assert config.output[0].data_type == model_config_pb2.TYPE_STRING
    assert config.parameters["max_new_tokens"].string_value == "48"
    assert int(config.parameters["max_new_tokens_limit"].string_value) >= 48


def test_dynamic_batching_settings() -> None:
    triton = spec(
        maxBatchSize=32,
        dynamicBatching={"maxQueueDelayMicroseconds": 500, "preferredBatchSizes": [8, 16]},
    )
    config = parse(render_config_pbtxt("m", "sequence-classification", triton))
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500


def test_dynamic_batching_off() -> None:
    triton = spec(dynamicBatching={"enabled": False})
    config = parse(render_config_pbtxt("m", "sequence-classification", triton))
    assert not config.HasField("dynamic_batching")
    assert config.max_batch_size == 16


def test_max_batch_size_zero_writes_no_batcher() -> None:
    """Triton refuses a dynamic batcher on a model without a batch dimension."""
    config = parse(render_config_pbtxt("m", "sequence-classification", spec(maxBatchSize=0)))
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")


def test_preferred_batch_size_above_max_is_refused() -> None:
    triton = spec(maxBatchSize=8, dynamicBatching={"preferredBatchSizes": [4, 16]})
    with pytest.raises(ValueError, match=r"\[16\]"):
        render_config_pbtxt("m", "sequence-classification", triton)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (InstanceKind.AUTO, model_config_pb2.ModelInstanceGroup.KIND_AUTO),
        (InstanceKind.CPU, model_config_pb2.ModelInstanceGroup.KIND_CPU),
        (InstanceKind.GPU, model_config_pb2.ModelInstanceGroup.KIND_GPU),
    ],
)
def test_instance_group(kind: InstanceKind, expected: int) -> None:
    text = render_config_pbtxt("m", "causal-lm", spec(instanceCount=3), instance_kind=kind)
    [group] = parse(text).instance_group
    assert (group.count, group.kind) == (3, expected)


def test_warmup_section() -> None:
    config = parse(render_config_pbtxt("m", "sequence-classification"))
    [warmup] = config.model_warmup
    assert warmup.batch_size == 1
    assert warmup.inputs["TEXT"].data_type == model_config_pb2.TYPE_STRING
    assert list(warmup.inputs["TEXT"].dims) == [1]
    assert warmup.inputs["TEXT"].input_data_file == "text"
    assert not parse(
        render_config_pbtxt("m", "sequence-classification", warmup_file=None)
    ).model_warmup


@pytest.mark.parametrize("name", ["", "a/b", "has space", "..", 'quote"'])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        render_config_pbtxt(name, "sequence-classification")


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="translation"):
        render_config_pbtxt("m", "translation")


def test_max_new_tokens_is_bounded() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        render_config_pbtxt("m", "causal-lm", max_new_tokens=100_000)
