"""The model-delivery init container of a ModelServer pod: `python -m kubetune.serving.fetch`.

Brings the model from its source into the model repository Triton reads (an emptyDir), packaged
with the ModelServer's own Triton settings, and writes the weights' checksum as the container's
termination message so the operator can say exactly which model is served:

- a Hugging Face checkpoint (a folder with config.json) is packaged for Triton;
- a repository kubetune wrote (a model folder whose version holds `hf/`) is re-packaged from that
  checkpoint under this server's model name and settings;
- any other Triton repository is copied as it is.

Sources: a local folder (a mounted PVC), `s3://bucket/prefix` (boto3, credentials from the
environment: the Secret is mounted into this container only) or `hf://org/name` (huggingface_hub,
HF_TOKEN from the environment).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.api.contract import write_termination_file
from kubetune.api.v1alpha1.modelserver import DynamicBatching, Runtime, TritonSpec, VllmSpec
from kubetune.serving.repository import (
    HF_SUBDIR,
    MODEL_VERSION,
    read_manifest,
    sha256_file,
    write_model_repository,
    write_vllm_repository,
)

DEFAULT_TERMINATION_LOG = "/dev/termination-log"


class FetchError(RuntimeError):
    """The model could not be brought in; the message says which source and why."""


def download(source: str, scratch: Path) -> Path:
    """A local folder holding what `source` names."""
    if source.startswith("s3://"):
        try:
            import boto3  # type: ignore[import-not-found, import-untyped, unused-ignore]
        except ImportError as err:
            raise FetchError("s3:// sources need boto3 in the fetcher image") from err
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
        target = scratch / "s3"
        paginator = s3.get_paginator("list_objects_v2")
        count = 0
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                rel = item["Key"][len(prefix) :].lstrip("/")
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(dest))
                count += 1
        if not count:
            raise FetchError(f"{source}: no objects under this prefix")
        return target
    if source.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo, _, revision = source.removeprefix("hf://").partition("@")
        return Path(
            snapshot_download(repo, revision=revision or None, token=os.environ.get("HF_TOKEN"))
        )
    path = Path(source)
    if not path.exists():
        raise FetchError(f"{source}: no such folder (is the volume mounted and the path right?)")
    return path


def _kubetune_models(folder: Path) -> list[Path]:
    """Model folders of a repository kubetune wrote: <model>/<version>/hf/config.json."""
    return sorted(p.parents[2] for p in folder.glob("*/*/hf/config.json"))


@dataclass(frozen=True)
class VllmDelivery:
    """The vLLM runtime's settings for ``deliver``: engine arguments, GPUs, adapters."""

    spec: VllmSpec = field(default_factory=VllmSpec)
    tensor_parallel_size: int = 1
    lora_adapters: dict[str, Path] = field(default_factory=dict)


def deliver(
    source: Path,
    dest: Path,
    model_name: str,
    task: str,
    triton: TritonSpec,
    vllm: VllmDelivery | None = None,
) -> str:
    """Package `source` into `dest`; returns the served weights' checksum (or 'unknown').
    With ``vllm`` the repository is written for Triton's vLLM backend."""
    dest.mkdir(parents=True, exist_ok=True)

    def package(checkpoint: Path, model_task: str) -> str:
        if vllm is None:
            out = write_model_repository(checkpoint, dest, model_name, model_task, triton)
        else:
            out = write_vllm_repository(
                checkpoint,
                dest,
                model_name,
                vllm.spec,
                tensor_parallel_size=vllm.tensor_parallel_size,
                lora_adapters=vllm.lora_adapters,
            )
        return read_manifest(out).checksum

    if (source / "config.json").is_file():
        return package(source, task if task != "auto" else _task_of(source))
    models = _kubetune_models(source)
    if len(models) == 1:
        manifest = read_manifest(models[0])
        return package(verified_checkpoint(models[0]), str(manifest.task))
    if list(source.glob("*/config.pbtxt")):
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return "unknown"
    raise FetchError(
        f"{source} is neither a Hugging Face checkpoint (config.json) nor a Triton repository "
        "(<model>/config.pbtxt)"
    )


def verified_checkpoint(model_folder: Path) -> Path:
    """The checkpoint inside a kubetune repository, after checking its weights against the
    checksums recorded when it was packaged: a corrupted copy is refused, not re-hashed."""
    manifest = read_manifest(model_folder)
    hf_dir = model_folder / str(MODEL_VERSION) / HF_SUBDIR
    for weights in manifest.weights:
        path = hf_dir / weights.name
        if not path.is_file():
            raise FetchError(f"{path} is missing: the model repository is incomplete")
        if sha256_file(path) != weights.sha256:
            raise FetchError(
                f"{path} does not match the checksum recorded when it was packaged: the copy "
                "is corrupted or was modified"
            )
    return hf_dir


def _task_of(checkpoint: Path) -> str:
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    archs = " ".join(config.get("architectures") or [])
    return "causal-lm" if "CausalLM" in archs else "sequence-classification"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--task", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--dynamic-batching", default="true")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--preferred-batch-size", type=int, action="append", default=[])
    parser.add_argument("--runtime", default=str(Runtime.PYTHON), choices=[str(r) for r in Runtime])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--vllm", default="{}", help="spec.vllm as JSON")
    parser.add_argument(
        "--lora-adapter", action="append", default=[], help="NAME=SOURCE of an unmerged adapter"
    )
    args = parser.parse_args(argv)
    triton = TritonSpec(
        max_batch_size=args.max_batch_size,
        instance_count=args.instance_count,
        dynamic_batching=DynamicBatching(
            enabled=args.dynamic_batching == "true",
            max_queue_delay_microseconds=args.max_queue_delay_us,
            preferred_batch_sizes=args.preferred_batch_size,
        ),
    )
    term = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", DEFAULT_TERMINATION_LOG))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            local = download(args.source, Path(scratch) / "model")
            vllm = None
            if args.runtime == Runtime.VLLM:
                adapters = {}
                for item in args.lora_adapter:
                    name, sep, adapter_source = item.partition("=")
                    if not sep or not name:
                        raise FetchError(f"--lora-adapter {item!r}: expected NAME=SOURCE")
                    adapters[name] = download(adapter_source, Path(scratch) / "lora" / name)
                vllm = VllmDelivery(
                    spec=VllmSpec.model_validate_json(args.vllm),
                    tensor_parallel_size=args.tensor_parallel_size,
                    lora_adapters=adapters,
                )
            checksum = deliver(local, args.dest, args.model_name, args.task, triton, vllm)
    except (FetchError, ValueError, OSError) as err:
        message = f"ModelFetchFailed: {err}"
        print(message, file=sys.stderr)
        write_termination_file(term, message)
        return 2
    write_termination_file(term, f"checksum: {checksum}")
    print(f"model {args.model_name!r} delivered to {args.dest} (checksum {checksum})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
