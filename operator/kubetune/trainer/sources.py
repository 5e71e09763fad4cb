"""Getting the model and the data onto local disk: a folder, `hf://` or `s3://`.

The operator mounts PVCs and resolves them to local paths, so by the time the trainer runs a
location is either a local path or a URI it must download. Download errors are turned into the
failure classes here, where it is still known whether the model or the data was being fetched.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kubetune.api.contract import DATASET, MODEL, credentials
from kubetune.trainer.errors import (
    AccessDeniedError,
    BadDataError,
    ConfigError,
    ModelNotFoundError,
    TrainerError,
)

CACHE_ENV = "KUBETUNE_CACHE_DIR"
DATA_PATTERNS = ["*.jsonl", "*.json", "*.ndjson", "*.csv", "*.parquet", "*.pq"]


def cache_dir(uri: str) -> Path:
    """A stable per-URI download folder, so a restarted pod on the same node reuses it."""
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "kubetune-cache")
    return root / hashlib.sha256(uri.encode()).hexdigest()[:16]


def fetch_model(location: str, revision: str | None) -> Path:
    """A local folder holding the checkpoint (config.json and weights)."""
    if location.startswith("hf://"):
        path = _hf_snapshot(location.removeprefix("hf://"), revision, "model", None, MODEL)
    elif location.startswith("s3://"):
        path = _s3_download(location, "model", MODEL)
    else:
        path = _local(location, "model")
    if not path.is_dir():
        raise ModelNotFoundError(f"model folder {path} (paths.model) does not exist")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model folder {path} (paths.model) has no config.json: not a Hugging Face checkpoint"
        )
    return path


def fetch_dataset(location: str) -> Path:
    """A local data file or folder. hf://[datasets/]org/name[/file] names a hub dataset."""
    if location.startswith("hf://"):
        parts = location.removeprefix("hf://").removeprefix("datasets/").split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
        return _hf_snapshot(repo, None, "dataset", filename, DATASET)
    if location.startswith("s3://"):
        return _s3_download(location, "dataset", DATASET)
    return _local(location, "dataset")


def _local(location: str, what: str) -> Path:
    for scheme in ("pvc://", "gs://", "http://", "https://"):
        if location.startswith(scheme):
            raise ConfigError(
                f"paths.{what} is {location}: the trainer reads local paths, hf:// and s3://; "
                f"the operator must mount {scheme} sources and pass their local path"
            )
    return Path(location.removeprefix("file://"))


# --------------------------------------------------------------------------- Hugging Face hub


def _hf_snapshot(
    repo: str, revision: str | None, repo_type: str, filename: str | None, role: str
) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    token = credentials(role, os.environ).get("HF_TOKEN") or None
    try:
        if filename:
            return Path(
                hf_hub_download(repo, filename, repo_type=repo_type, revision=revision, token=token)
            )
        patterns = DATA_PATTERNS if repo_type == "dataset" else None
        return Path(
            snapshot_download(
                repo, repo_type=repo_type, revision=revision, token=token, allow_patterns=patterns
            )
        )
    except Exception as exc:
        raise _hf_error(exc, repo, revision, repo_type) from exc


def _hf_error(exc: Exception, repo: str, revision: str | None, repo_type: str) -> TrainerError:
    """The hub answers 401 both for a private repository and for one that does not exist."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    field = "spec.model.source" if repo_type == "model" else "spec.dataset.source"
    missing: type[TrainerError] = ModelNotFoundError if repo_type == "model" else BadDataError
    if "GatedRepoError" in names:
        return AccessDeniedError(f"hf://{repo} ({field}) is gated: the HF_TOKEN has no access")
    if "RevisionNotFoundError" in names:
        return missing(f"revision {revision!r} of hf://{repo} (spec.model.revision) does not exist")
    if "RepositoryNotFoundError" in names:
        return missing(
            f"hf://{repo} ({field}) was not found on the hub (or it is private and HF_TOKEN is "
            "missing or has no access)"
        )
    if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names:
        return missing(f"hf://{repo} ({field}) is not in the local cache and the hub is offline")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return AccessDeniedError(f"the hub refused hf://{repo} ({field}): HTTP {status}")
    return TrainerError(f"downloading hf://{repo} ({field}) failed: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- S3


def s3_client(role: str) -> Any:
    """A boto3 S3 client with the credentials of one location (spec.<location>.secretRef);
    without them, boto3's own chain (an IAM role for the pod's ServiceAccount, for example)."""
    try:
        boto3 = importlib.import_module("boto3")  # optional: only images that read s3://
    except ImportError as exc:
        raise ConfigError(
            "an s3:// source needs the 'boto3' package, which is not installed in the trainer "
            "image (pip install boto3)"
        ) from exc
    given = credentials(role, os.environ)
    return boto3.client(
        "s3",
        endpoint_url=given.get("AWS_ENDPOINT_URL") or None,
        aws_access_key_id=given.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=given.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=given.get("AWS_SESSION_TOKEN"),
    )


def _s3_download(uri: str, what: str, role: str) -> Path:
    """Downloads one object, or every object under a prefix, into the URI's cache folder."""
    client = s3_client(role)
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    target = cache_dir(uri)
    field = f"spec.{what}.source"
    try:
        keys = _s3_keys(client, bucket, key)
        if not keys:
            raise (ModelNotFoundError if what == "model" else BadDataError)(
                f"nothing found at {uri} ({field})"
            )
        for obj in keys:
            relative = obj[len(key) :].lstrip("/") or Path(obj).name
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj, str(dest))
    except TrainerError:
        raise
    except Exception as exc:
        raise _s3_error(exc, uri, what) from exc
    single = len(keys) == 1 and keys[0] == key
    return target / Path(key).name if single else target


def _s3_error(exc: Exception, uri: str, what: str) -> Exception:
    field = f"spec.{what}.source"
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or (
        type(exc).__name__ == "NoCredentialsError"
    ):
        return AccessDeniedError(f"S3 refused {uri} ({field}): {exc}")
    if code in ("NoSuchBucket", "NoSuchKey", "404"):
        missing = ModelNotFoundError if what == "model" else BadDataError
        return missing(f"{uri} ({field}) does not exist: {exc}")
    return exc


# --------------------------------------------------------------------------- pre-flight probes


def probe_model_config(location: str, revision: str | None) -> dict[str, Any]:
    """The model's config.json alone, without the weights: it proves that the source exists and
    that the credentials open it, and it is all the memory planner needs."""
    if location.startswith("hf://"):
        path = _hf_snapshot(location.removeprefix("hf://"), revision, "model", "config.json", MODEL)
    elif location.startswith("s3://"):
        path = _s3_download(location.rstrip("/") + "/config.json", "model", MODEL)
    else:
        folder = _local(location, "model")
        if not folder.is_dir():
            raise ModelNotFoundError(f"model folder {folder} (paths.model) does not exist")
        path = folder / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(
                f"model folder {folder} (paths.model) has no config.json: not a Hugging Face "
                "checkpoint"
            )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"the model's config.json ({location}) is unreadable: {exc}"
        ) from exc
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"the model's config.json ({location}) is not a JSON object")
    return config


def probe_dataset(location: str) -> Path | None:
    """A local dataset's path (the caller validates its rows); for hf:// and s3:// only that
    the data exists and the credentials open it, from metadata (nothing is downloaded)."""
    if location.startswith("hf://"):
        parts = location.removeprefix("hf://").removeprefix("datasets/").split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
        from huggingface_hub import HfApi

        try:
            token = credentials(DATASET, os.environ).get("HF_TOKEN") or None
            info = HfApi(token=token).dataset_info(repo)
        except Exception as exc:
            raise _hf_error(exc, repo, None, "dataset") from exc
        files = [sibling.rfilename for sibling in info.siblings or []]
        if filename and filename not in files:
            raise BadDataError(f"hf://{repo} (spec.dataset.source) has no file {filename}")
        return None
    if location.startswith("s3://"):
        client = s3_client(DATASET)
        bucket, _, key = location.removeprefix("s3://").partition("/")
        try:
            keys = _s3_keys(client, bucket, key)
        except Exception as exc:
            raise _s3_error(exc, location, "dataset") from exc
        if not keys:
            raise BadDataError(f"nothing found at {location} (spec.dataset.source)")
        return None
    return _local(location, "dataset")


def _s3_keys(client: Any, bucket: str, key: str) -> list[str]:
    paginator = client.get_paginator("list_objects_v2")
    keys: list[str] = []
    for page in paginator.paginate(Bucket=bucket, Prefix=key):
        keys.extend(obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
    exact = [k for k in keys if k == key]
    return exact or keys
