"""The ModelServer pod's init container: fetch the model and write the Triton repository.

``python -m kubetune.serving.fetch --source=... --dest=/models --model-name=... [Triton settings]``

The source is a local folder (a PVC mounted read-only), ``s3://bucket/prefix`` or
``hf://org/name[@revision]``, holding either a Hugging Face checkpoint or a model repository
that kubetune wrote (a FineTuneJob's output folder, its ``triton-repository``, or a model folder
inside one). Both are (re)packaged with ``write_model_repository`` so the ModelServer's own name
and Triton settings apply, whatever the trainer used. A kubetune repository's weights are checked
against its manifest first: a corrupted copy fails here, in the init container, with a clear
message instead of being re-hashed as if it were good. A Triton repository kubetune did not write
is copied unchanged (its config.pbtxt is the author's).

On success the served model's name, task and checksum go to the termination message, where the
operator reads them into ``status.served`` without exec'ing into the pod.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1.finetunejob import Task
from kubetune.api.v1alpha1.modelserver import TritonSpec
from kubetune.serving.repository import (
    HF_SUBDIR,
    MANIFEST_NAME,
    MODEL_VERSION,
    InstanceKind,
    read_manifest,
    sha256_file,
    write_model_repository,
)

TRITON_SUBDIR = "triton-repository"
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


class FetchError(RuntimeError):
    """The model cannot be fetched or packaged; the message says why, for a person."""


def _kubetune_model_folders(folder: Path) -> list[Path]:
    """Model folders (``<m>/1/kubetune-serving.json``) at ``folder`` or one level below."""
    if (folder / str(MODEL_VERSION) / MANIFEST_NAME).is_file():
        return [folder]
    return sorted(p.parent.parent for p in folder.glob(f"*/{MODEL_VERSION}/{MANIFEST_NAME}"))


def verified_checkpoint(model_folder: Path) -> Path:
    """The ``hf`` checkpoint inside a kubetune model folder, after checking every weights file
    against the manifest."""
    manifest = read_manifest(model_folder)
    hf_dir = model_folder / str(MODEL_VERSION) / HF_SUBDIR
    for weights in manifest.weights:
        path = hf_dir / weights.name
        if not path.is_file():
            raise FetchError(f"{path} is missing: the model repository is incomplete")
        if sha256_file(path) != weights.sha256:
            raise FetchError(
                f"{path} does not match the checksum recorded when it was packaged "
                f"({weights.sha256}): the copy is corrupted or was modified"
            )
    return hf_dir


def resolve(folder: Path) -> tuple[str, Path, Task | None]:
    """What the folder holds: ("checkpoint", dir, task from a manifest or None), or
    ("foreign-repository", dir, None) for a Triton repository kubetune did not write."""
    if not folder.is_dir():
        raise FetchError(f"model source {folder} does not exist or is not a folder")
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return "checkpoint", folder, None
    for candidate in (folder / TRITON_SUBDIR, folder):
        if not candidate.is_dir():
            continue
        models = _kubetune_model_folders(candidate)
        if len(models) > 1:
            names = ", ".join(m.name for m in models)
            raise FetchError(
                f"{candidate} holds several models ({names}); point the source at one of them"
            )
        if models:
            return "checkpoint", verified_checkpoint(models[0]), read_manifest(models[0]).task
    if any(folder.glob("*/config.pbtxt")) or (folder / "config.pbtxt").is_file():
        return "foreign-repository", folder, None
    raise FetchError(
        f"{folder} holds neither a Hugging Face checkpoint (config.json) nor a Triton model "
        "repository (<model>/config.pbtxt)"
    )


def download(source: str, work: Path) -> Path:
    """Bring an s3:// or hf:// source into ``work``; a local path is used in place."""
    if source.startswith("s3://"):
        try:
            boto3: Any = importlib.import_module("boto3")
        except ImportError as exc:
            raise FetchError(f"fetching {source} needs boto3 in the fetcher image") from exc
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        prefix = prefix.strip("/")
        client = boto3.client("s3")
        target = work / "s3"
        found = False
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix) :].lstrip("/")
                if not relative or relative.endswith("/"):
                    continue
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(path))
                found = True
        if not found:
            raise FetchError(f"nothing found under {source}")
        return target
    if source.startswith("hf://"):
        repo_id, _, revision = source.removeprefix("hf://").partition("@")
        try:
            hub: Any = importlib.import_module("huggingface_hub")
        except ImportError as exc:
            raise FetchError(f"fetching {source} needs huggingface_hub") from exc
        return Path(
            hub.snapshot_download(
                repo_id=repo_id, revision=revision or None, local_dir=str(work / "hf")
            )
        )
    if "://" in source:
        raise FetchError(
            f"unsupported source {source!r}: a pvc:// source is mounted into the pod and passed "
            "as its path; s3:// and hf:// are downloaded"
        )
    return Path(source)


def fetch(
    source: str,
    dest: Path,
    *,
    model_name: str,
    task: Task | None,
    triton: TritonSpec,
    gpus: int,
    work: Path,
) -> dict[str, Any]:
    """Package ``source`` into the repository ``dest``; return what the termination message
    records."""
    kind, folder, packaged_task = resolve(download(source, work))
    if kind == "foreign-repository":
        if not (folder / model_name / "config.pbtxt").is_file():
            names = ", ".join(sorted(p.parent.name for p in folder.glob("*/config.pbtxt")))
            raise FetchError(
                f"the Triton repository at {source} has no model {model_name!r} (it has "
                f"{names or 'none'}): set spec.model.name to the model to serve"
            )
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        return {"modelName": model_name, "source": source, "packaged": False}
    chosen = packaged_task or task
    if chosen is None:
        raise FetchError(f"{source} is a plain checkpoint: the task must be given (--task)")
    model_dir = write_model_repository(
        folder,
        dest,
        model_name,
        chosen,
        triton,
        instance_kind=InstanceKind.CPU if gpus == 0 else InstanceKind.GPU,
    )
    manifest = read_manifest(model_dir)
    return {
        "modelName": model_name,
        "task": str(manifest.task),
        "checksum": manifest.checksum,
        "source": source,
        "packaged": True,
    }


def _bool(value: str) -> bool:
    if value.lower() in {"true", "1", "yes"}:
        return True
    if value.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubetune.serving.fetch", description=__doc__)
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--task", choices=[t.value for t in Task])
    parser.add_argument("--max-batch-size", type=int, default=TritonSpec().max_batch_size)
    parser.add_argument("--instance-count", type=int, default=TritonSpec().instance_count)
    parser.add_argument("--dynamic-batching", type=_bool, default=True)
    default_delay = TritonSpec().dynamic_batching.max_queue_delay_microseconds
    parser.add_argument("--max-queue-delay-us", type=int, default=default_delay)
    parser.add_argument("--preferred-batch-size", type=int, action="append", default=[])
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--termination-log", type=Path, default=DEFAULT_TERMINATION_LOG)
    return parser.parse_args(argv)


def _write_termination_message(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):  # not in a pod: stdout/stderr carry it anyway
        path.write_text(text[-4000:], encoding="utf-8")  # the kubelet keeps at most 4 KiB


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        triton = TritonSpec.model_validate(
            {
                "maxBatchSize": args.max_batch_size,
                "instanceCount": args.instance_count,
                "dynamicBatching": {
                    "enabled": args.dynamic_batching,
                    "maxQueueDelayMicroseconds": args.max_queue_delay_us,
                    "preferredBatchSizes": args.preferred_batch_size,
                },
            }
        )
        with tempfile.TemporaryDirectory(prefix="kubetune-fetch-") as work:
            result = fetch(
                args.source,
                args.dest,
                model_name=args.model_name,
                task=Task(args.task) if args.task else None,
                triton=triton,
                gpus=args.gpus,
                work=Path(work),
            )
    except (FetchError, ValueError, OSError) as exc:
        message = f"ModelFetchFailed: {exc}"
        print(message, file=sys.stderr)
        _write_termination_message(args.termination_log, message)
        return 1
    text = json.dumps(result, sort_keys=True)
    print(text)
    _write_termination_message(args.termination_log, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
