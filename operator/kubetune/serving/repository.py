"""Package a Hugging Face checkpoint as a Triton model repository (python backend).

The layout written for a model named ``m``::

    <repository>/m/config.pbtxt          Triton's model configuration (render_config_pbtxt)
    <repository>/m/labels.txt            class names, one a line (classification only)
    <repository>/m/warmup/text           the warm-up request Triton sends before reporting ready
    <repository>/m/1/model.py            the python-backend model (kubetune.serving.triton_model)
    <repository>/m/1/kubetune-serving.json   task, labels, weights checksum (the manifest)
    <repository>/m/1/hf/...              the checkpoint: config, tokenizer, weights

This module does file I/O only (no torch): the trainer calls it at the end of a fine-tune, and the
operator side may call it to package a plain checkpoint. The repository is assembled in a
temporary folder next to its destination and renamed into place, so a reader never sees half a
model and writing the same model twice simply replaces it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1.finetunejob import Task
from kubetune.api.v1alpha1.modelserver import TritonSpec, VllmSpec

TEXT_INPUT = "TEXT"
STREAM_INPUT = "STREAM"
LABEL_OUTPUT = "LABEL"
SCORES_OUTPUT = "SCORES"
GENERATED_OUTPUT = "GENERATED_TEXT"

MODEL_VERSION = 1
HF_SUBDIR = "hf"
MANIFEST_NAME = "kubetune-serving.json"
MANIFEST_FORMAT = "kubetune.io/serving-manifest/v1"
LABELS_FILE = "labels.txt"
WARMUP_DIR = "warmup"
WARMUP_FILE = "text"
WARMUP_TEXT = "kubetune warm-up request"
MODEL_SOURCE = "triton_model.py"
VLLM_ENGINE_ARGS = "model.json"  # what Triton's vLLM backend reads from the version folder
VLLM_LORA_ARGS = "multi_lora.json"  # adapter name -> folder, read when enable_lora is true
# Triton's vLLM backend's tensors (it auto-completes optional ones; these are the ones we use).
VLLM_TEXT_INPUT = "text_input"
VLLM_STREAM_INPUT = "stream"
VLLM_SAMPLING_INPUT = "sampling_parameters"
VLLM_EXCLUDE_INPUT = "exclude_input_in_output"
VLLM_TEXT_OUTPUT = "text_output"

DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_LIMIT = 256

MODEL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_.-]+$")

# Files a Trainer leaves next to a checkpoint that serving never needs (optimizer state can be
# twice the model's size). Only top-level regular files are copied, so checkpoint-* folders and a
# repository written inside the model folder are skipped anyway.
TRAINING_STATE_FILES = frozenset(
    {"optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "trainer_state.json"}
)
TRAINING_STATE_PATTERN = re.compile(r"^rng_state(_\d+)?\.pth$")
WEIGHTS_PATTERN = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


class InstanceKind(StrEnum):
    """Where Triton places the model instances.

    AUTO lets Triton decide: one group of ``count`` instances on every visible GPU, or on the CPU
    when the pod has none. It is the default because the same repository then serves on a GPU
    node and on a CPU-only test machine unchanged; CPU pins the CPU even when a GPU is visible.
    """

    AUTO = "KIND_AUTO"
    CPU = "KIND_CPU"
    GPU = "KIND_GPU"


@dataclass(frozen=True)
class WeightsFile:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ServingManifest:
    """What ``kubetune-serving.json`` records, typed for the readers on the operator side."""

    model_name: str
    task: Task
    labels: list[str] | None
    checksum: str
    weights: list[WeightsFile]
    max_sequence_length: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "modelName": self.model_name,
            "task": str(self.task),
            "labels": self.labels,
            "checksum": self.checksum,
            "weights": [{"file": w.name, "sha256": w.sha256, "size": w.size} for w in self.weights],
            "maxSequenceLength": self.max_sequence_length,
            "hfDir": HF_SUBDIR,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServingManifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a kubetune serving manifest (format {data.get('format')!r})")
        return cls(
            model_name=str(data["modelName"]),
            task=Task(data["task"]),
            labels=list(data["labels"]) if data.get("labels") is not None else None,
            checksum=str(data["checksum"]),
            weights=[WeightsFile(w["file"], w["sha256"], int(w["size"])) for w in data["weights"]],
            max_sequence_length=data.get("maxSequenceLength"),
        )


def _quote(value: str) -> str:
    """A protobuf text-format string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _check_model_name(model_name: str) -> None:
    if not MODEL_NAME_PATTERN.match(model_name) or model_name in {".", ".."}:
        raise ValueError(
            f"model name {model_name!r} is not a valid Triton model name ([a-zA-Z0-9_.-]+)"
        )


def render_config_pbtxt(
    model_name: str,
    task: Task | str,
    triton: TritonSpec | None = None,
    *,
    instance_kind: InstanceKind = InstanceKind.AUTO,
    labels_file: str | None = LABELS_FILE,
    warmup_file: str | None = WARMUP_FILE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """Triton's config.pbtxt for a kubetune python-backend model.

    The input is one string per request row (``TEXT``, dims [1]); with ``maxBatchSize`` > 0 Triton
    adds the batch dimension, so concurrent requests can be merged by the dynamic batcher into one
    ``execute`` call. ``maxBatchSize`` 0 turns batching off entirely (Triton refuses a dynamic
    batcher then, so none is written). Invalid combinations raise ValueError here rather than at
    model load inside a pod, where they would only show as a crash-looping server.
    """
    _check_model_name(model_name)
    task = Task(task)
    spec = triton if triton is not None else TritonSpec()
    batching = spec.max_batch_size > 0
    dynamic = spec.dynamic_batching
    if batching and dynamic.enabled:
        too_big = [s for s in dynamic.preferred_batch_sizes if s < 1 or s > spec.max_batch_size]
        if too_big:
            raise ValueError(
                f"preferred batch sizes {too_big} must lie between 1 and maxBatchSize "
                f"({spec.max_batch_size})"
            )
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must lie between 1 and {MAX_NEW_TOKENS_LIMIT}")

    lines = [
        f"name: {_quote(model_name)}",
        'backend: "python"',
        f"max_batch_size: {spec.max_batch_size}",
    ]
    if task is Task.CAUSAL_LM:
        # Decoupled: the model answers through response senders, one response per decoding
        # step for a request whose optional STREAM input is true (generate_stream, gRPC
        # streaming), one final response otherwise (generate, gRPC infer).
        lines += ["model_transaction_policy {", "  decoupled: true", "}"]
    lines += [
        "input [",
        "  {",
        f"    name: {_quote(TEXT_INPUT)}",
        "    data_type: TYPE_STRING",
        "    dims: [ 1 ]",
        "  }" + ("," if task is Task.CAUSAL_LM else ""),
    ]
    if task is Task.CAUSAL_LM:
        lines += [
            "  {",
            f"    name: {_quote(STREAM_INPUT)}",
            "    data_type: TYPE_BOOL",
            "    dims: [ 1 ]",
            "    optional: true",
            "  }",
        ]
    lines += [
        "]",
        "output [",
    ]
    if task is Task.SEQUENCE_CLASSIFICATION:
        lines += [
            "  {",
            f"    name: {_quote(LABEL_OUTPUT)}",
            "    data_type: TYPE_STRING",
            "    dims: [ 1 ]",
            "  },",
            "  {",
            f"    name: {_quote(SCORES_OUTPUT)}",
            "    data_type: TYPE_FP32",
            "    dims: [ -1 ]",
        ]
        if labels_file is not None:
            lines.append(f"    label_filename: {_quote(labels_file)}")
        lines.append("  }")
    else:
        lines += [
            "  {",
            f"    name: {_quote(GENERATED_OUTPUT)}",
            "    data_type: TYPE_STRING",
            "    dims: [ 1 ]",
            "  }",
        ]
    lines.append("]")

    if batching and dynamic.enabled:
        lines.append("dynamic_batching {")
        if dynamic.preferred_batch_sizes:
            sizes = ", ".join(str(s) for s in dynamic.preferred_batch_sizes)
            lines.append(f"  preferred_batch_size: [ {sizes} ]")
        lines.append(f"  max_queue_delay_microseconds: {dynamic.max_queue_delay_microseconds}")
        lines.append("}")

    lines += [
        "instance_group [",
        "  {",
        f"    count: {spec.instance_count}",
        f"    kind: {instance_kind.value}",
        "  }",
        "]",
    ]

    parameters = {"task": str(task)}
    if task is Task.CAUSAL_LM:
        parameters["max_new_tokens"] = str(max_new_tokens)
        parameters["max_new_tokens_limit"] = str(MAX_NEW_TOKENS_LIMIT)
    for key, value in parameters.items():
        lines.append(
            f"parameters: {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}"
        )

    if warmup_file is not None:
        # Triton sends this request to every instance before the model (and, with strict
        # readiness, the server) reports ready: it exercises the whole path — string tensors
        # through shared memory, tokenizer, forward — so a broken stub fails the load, not the
        # first user request.
        lines += [
            "model_warmup [",
            "  {",
            '    name: "kubetune-warmup"',
            "    batch_size: 1",
            "    inputs {",
            f"      key: {_quote(TEXT_INPUT)}",
            "      value {",
            "        data_type: TYPE_STRING",
            "        dims: [ 1 ]",
            f"        input_data_file: {_quote(warmup_file)}",
            "      }",
            "    }",
            "  }",
            "]",
        ]
    return "\n".join(lines) + "\n"


def weights_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files (single or sharded, safetensors or pickled), sorted."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and WEIGHTS_PATTERN.match(p.name))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def combined_checksum(files: list[WeightsFile]) -> str:
    """One checksum for all weights: the file's own sha256 when there is one file (so it matches
    ``sha256sum model.safetensors``), else the sha256 of the sorted ``<sha256>  <name>`` lines."""
    if len(files) == 1:
        return f"sha256:{files[0].sha256}"
    lines = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def _labels(config: dict[str, Any]) -> list[str]:
    id2label = config.get("id2label")
    if not id2label:
        num = int(config.get("num_labels", 2))
        return [f"LABEL_{i}" for i in range(num)]
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link when source and destination share a filesystem (no second copy of the
    weights), copy otherwise. A checkpoint rewritten in place later would change the linked file
    too: the checksum in the manifest, verified at load, turns that into a clear load error."""
    try:
        os.link(source, destination)
    except OSError as exc:
        if exc.errno not in {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP}:
            raise
        shutil.copy2(source, destination)


def model_source() -> str:
    """The python-backend model's source, shipped as a module of this package."""
    return (resources.files("kubetune.serving") / MODEL_SOURCE).read_text(encoding="utf-8")


def serialize_string_tensor(values: list[str]) -> bytes:
    """Triton's raw BYTES layout (4-byte little-endian length, then the bytes), used for the
    warm-up data file."""
    out = bytearray()
    for value in values:
        raw = value.encode("utf-8")
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def write_model_repository(
    model_dir: Path,
    repository_dir: Path,
    model_name: str,
    task: Task | str,
    triton: TritonSpec | None = None,
    *,
    instance_kind: InstanceKind = InstanceKind.AUTO,
    max_sequence_length: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    warmup: bool = True,
) -> Path:
    """Write ``<repository_dir>/<model_name>`` from the checkpoint in ``model_dir``; return it.

    ``model_dir`` must hold a full checkpoint (``config.json``, tokenizer, weights): a LoRA
    adapter has to be merged first, since the serving side loads plain transformers models and
    never imports peft. ``repository_dir`` may lie inside ``model_dir`` (the trainer writes
    ``<output>/triton-repository``); only top-level files of ``model_dir`` are packaged.
    """
    _check_model_name(model_name)
    task = Task(task)
    model_dir = Path(model_dir)
    repository_dir = Path(repository_dir)
    hf_config, weights = _checkpoint(model_dir)
    labels = _labels(hf_config) if task is Task.SEQUENCE_CLASSIFICATION else None

    config_text = render_config_pbtxt(
        model_name,
        task,
        triton,
        instance_kind=instance_kind,
        labels_file=LABELS_FILE if labels is not None else None,
        warmup_file=WARMUP_FILE if warmup else None,
        max_new_tokens=max_new_tokens,
    )

    def fill(staging: Path, version_dir: Path) -> None:
        (version_dir / "model.py").write_text(model_source(), encoding="utf-8")
        (staging / "config.pbtxt").write_text(config_text, encoding="utf-8")
        if labels is not None:
            (staging / LABELS_FILE).write_text("".join(f"{x}\n" for x in labels), "utf-8")
        if warmup:
            (staging / WARMUP_DIR).mkdir()
            (staging / WARMUP_DIR / WARMUP_FILE).write_bytes(serialize_string_tensor([WARMUP_TEXT]))

    return _assemble(
        model_dir, repository_dir, model_name, task, labels, max_sequence_length, weights, fill
    )


def _checkpoint(model_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """The checkpoint's config.json and weight files; a clear error for anything else."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        if (model_dir / "adapter_config.json").is_file():
            raise ValueError(
                f"{model_dir} holds a LoRA adapter, not a full checkpoint: merge it into the base "
                "model (peft's merge_and_unload) before packaging it for Triton"
            )
        raise ValueError(f"{model_dir} is not a Hugging Face checkpoint: config.json is missing")
    weights = weights_files(model_dir)
    if not weights:
        raise ValueError(f"{model_dir} holds no weights (model*.safetensors / pytorch_model*.bin)")
    return json.loads(config_path.read_text(encoding="utf-8")), weights


def _link_checkpoint(model_dir: Path, hf_dir: Path) -> None:
    """The checkpoint's top-level files without training state, linked (or copied)."""
    hf_dir.mkdir(parents=True)
    for source in sorted(model_dir.iterdir()):
        if not source.is_file() or source.name in TRAINING_STATE_FILES:
            continue
        if TRAINING_STATE_PATTERN.match(source.name):
            continue
        _link_or_copy(source, hf_dir / source.name)


def _assemble(
    model_dir: Path,
    repository_dir: Path,
    model_name: str,
    task: Task,
    labels: list[str] | None,
    max_sequence_length: int | None,
    weights: list[Path],
    fill: Callable[[Path, Path], None],
) -> Path:
    """Build ``<repository_dir>/<model_name>`` in a hidden staging folder — the checkpoint under
    ``1/hf``, the manifest, then what ``fill(staging, version_dir)`` adds — and rename it into
    place (replacing an older copy), so a reader never sees half a model."""
    repository_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_name}.", dir=repository_dir))
    try:
        version_dir = staging / str(MODEL_VERSION)
        _link_checkpoint(model_dir, version_dir / HF_SUBDIR)
        files = [WeightsFile(p.name, sha256_file(p), p.stat().st_size) for p in weights]
        manifest = ServingManifest(
            model_name=model_name,
            task=task,
            labels=labels,
            checksum=combined_checksum(files),
            weights=files,
            max_sequence_length=max_sequence_length,
        )
        (version_dir / MANIFEST_NAME).write_text(
            json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8"
        )
        fill(staging, version_dir)
        staging.chmod(0o755)

        destination = repository_dir / model_name
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{model_name}.old.", dir=repository_dir))
            destination.rename(retired / model_name)
            staging.rename(destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


# --- the vLLM runtime: a repository for Triton's vLLM backend -----------------------------------


def render_vllm_config_pbtxt(model_name: str, *, report_metrics: bool = True) -> str:
    """config.pbtxt for Triton's vLLM backend (``backend: "vllm"``, a python-based backend).

    Decoupled transaction policy: the backend answers each request from vLLM's event loop, one
    response per generated chunk when the request asks to ``stream``. No Triton batching
    (``max_batch_size: 0``): vLLM batches continuously itself. One ``KIND_MODEL`` instance: the
    engine takes every GPU the container sees (tensor parallelism), Triton places nothing.
    ``REPORT_CUSTOM_METRICS`` exports vLLM's own metrics (``vllm:*``) on Triton's metrics port.
    """
    _check_model_name(model_name)
    tensors = [
        (VLLM_TEXT_INPUT, "TYPE_STRING", False),
        (VLLM_STREAM_INPUT, "TYPE_BOOL", True),
        (VLLM_SAMPLING_INPUT, "TYPE_STRING", True),
        (VLLM_EXCLUDE_INPUT, "TYPE_BOOL", True),
    ]
    lines = [
        f"name: {_quote(model_name)}",
        'backend: "vllm"',
        "max_batch_size: 0",
        "model_transaction_policy {",
        "  decoupled: true",
        "}",
        "input [",
    ]
    for index, (name, data_type, optional) in enumerate(tensors):
        lines += [
            "  {",
            f"    name: {_quote(name)}",
            f"    data_type: {data_type}",
            "    dims: [ 1 ]",
            *(["    optional: true"] if optional else []),
            "  }" + ("," if index + 1 < len(tensors) else ""),
        ]
    lines += [
        "]",
        "output [",
        "  {",
        f"    name: {_quote(VLLM_TEXT_OUTPUT)}",
        "    data_type: TYPE_STRING",
        "    dims: [ -1 ]",
        "  }",
        "]",
        "instance_group [",
        "  {",
        "    count: 1",
        "    kind: KIND_MODEL",
        "  }",
        "]",
        f"parameters: {{ key: {_quote('task')} value: {{ string_value: "
        f"{_quote(str(Task.CAUSAL_LM))} }} }}",
        f"parameters: {{ key: {_quote('REPORT_CUSTOM_METRICS')} value: {{ string_value: "
        f"{_quote(str(report_metrics).lower())} }} }}",
    ]
    return "\n".join(lines) + "\n"


def vllm_engine_args(
    model_path: str,
    vllm: VllmSpec | None = None,
    *,
    tensor_parallel_size: int = 1,
    lora_adapters: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """model.json: vLLM's AsyncEngineArgs from the ModelServer's spec.vllm and its GPUs."""
    spec = vllm if vllm is not None else VllmSpec()
    if tensor_parallel_size < 1:
        raise ValueError("tensor_parallel_size must be at least 1")
    args: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "max_num_seqs": spec.max_num_seqs,
        "dtype": str(spec.dtype),
        "enforce_eager": spec.enforce_eager,
        "disable_log_stats": False,  # the engine's stats feed the vllm:* metrics
    }
    if spec.max_model_len is not None:
        args["max_model_len"] = spec.max_model_len
    if lora_adapters:
        args |= {
            "enable_lora": True,
            "max_lora_rank": spec.max_lora_rank,
            "max_loras": len(lora_adapters),
        }
    return args


def _attention_heads(config: Mapping[str, Any]) -> int | None:
    for key in ("num_attention_heads", "n_head", "num_heads"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def _position_limit(config: Mapping[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def _check_adapter(name: str, folder: Path, max_rank: int) -> None:
    _check_model_name(name)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"LoRA adapter {name!r}: {folder} holds no adapter_config.json")
    rank = json.loads(config_path.read_text(encoding="utf-8")).get("r")
    if isinstance(rank, int) and rank > max_rank:
        raise ValueError(
            f"LoRA adapter {name!r} has rank {rank}, above spec.vllm.maxLoraRank ({max_rank})"
        )


def write_vllm_repository(
    model_dir: Path,
    repository_dir: Path,
    model_name: str,
    vllm: VllmSpec | None = None,
    *,
    tensor_parallel_size: int = 1,
    lora_adapters: Mapping[str, Path] | None = None,
    max_sequence_length: int | None = None,
) -> Path:
    """Write ``<repository_dir>/<model_name>`` for Triton's vLLM backend; return it.

    Layout: ``config.pbtxt`` (render_vllm_config_pbtxt), ``1/model.json`` (the engine's
    arguments, naming the checkpoint by its absolute path, so the repository must be read where
    it was written: the pod's emptyDir has one mount path for both containers),
    ``1/multi_lora.json`` and ``1/lora/<name>/`` for unmerged LoRA adapters, ``1/hf`` and the
    manifest as for the python backend. What vLLM would refuse at start-up inside a pod is refused
    here, naming the spec field: a tensor-parallel size that does not divide the attention heads,
    a max model length above the model's position table, an adapter above the rank limit.
    """
    _check_model_name(model_name)
    spec = vllm if vllm is not None else VllmSpec()
    model_dir = Path(model_dir)
    repository_dir = Path(repository_dir).resolve()
    hf_config, weights = _checkpoint(model_dir)
    archs = " ".join(hf_config.get("architectures") or [])
    if "CausalLM" not in archs and "LMHead" not in archs:
        raise ValueError(
            f"runtime vllm serves causal LMs; {model_dir} is a {archs or 'model of unknown kind'} "
            "(use spec.runtime: python)"
        )
    heads = _attention_heads(hf_config)
    if heads is not None and heads % tensor_parallel_size:
        raise ValueError(
            f"spec.resources.gpus: a tensor-parallel size of {tensor_parallel_size} must divide "
            f"the model's {heads} attention heads"
        )
    limit = _position_limit(hf_config)
    if spec.max_model_len is not None and limit is not None and spec.max_model_len > limit:
        raise ValueError(
            f"spec.vllm.maxModelLen ({spec.max_model_len}) exceeds the model's {limit} positions"
        )
    adapters = dict(lora_adapters or {})
    for name, folder in adapters.items():
        _check_adapter(name, Path(folder), spec.max_lora_rank)

    final_version = repository_dir / model_name / str(MODEL_VERSION)
    lora_paths = {name: str(final_version / "lora" / name) for name in adapters}
    engine = vllm_engine_args(
        str(final_version / HF_SUBDIR),
        spec,
        tensor_parallel_size=tensor_parallel_size,
        lora_adapters=lora_paths,
    )

    def fill(staging: Path, version_dir: Path) -> None:
        (staging / "config.pbtxt").write_text(render_vllm_config_pbtxt(model_name), "utf-8")
        (version_dir / VLLM_ENGINE_ARGS).write_text(json.dumps(engine, indent=2) + "\n", "utf-8")
        if adapters:
            for name, folder in adapters.items():
                _link_checkpoint(Path(folder), version_dir / "lora" / name)
            (version_dir / VLLM_LORA_ARGS).write_text(
                json.dumps(lora_paths, indent=2) + "\n", "utf-8"
            )

    return _assemble(
        model_dir,
        repository_dir,
        model_name,
        Task.CAUSAL_LM,
        None,
        max_sequence_length,
        weights,
        fill,
    )


def read_manifest(model_repository_dir: Path, version: int = MODEL_VERSION) -> ServingManifest:
    """The manifest of ``<repository>/<model>`` (pass the model's folder)."""
    path = Path(model_repository_dir) / str(version) / MANIFEST_NAME
    return ServingManifest.from_json(json.loads(path.read_text(encoding="utf-8")))
