"""Where the trainer's config comes from: `--config PATH`, `$KUBETUNE_TRAINER_CONFIG`, or the
ConfigMap the operator mounts at /etc/kubetune/config.json.

The file is parsed with the very models the operator rendered it from (TrainerConfig), so a field
the operator writes and the trainer does not know is an error here, not a silent default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from kubetune.api.v1alpha1.trainerconfig import TrainerConfig
from kubetune.trainer.errors import ConfigError

CONFIG_ENV = "KUBETUNE_TRAINER_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/kubetune/config.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer",
        description="Fine-tune a model as a FineTuneJob's training process (see docs/trainer.md).",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["train", "preflight"],
        default="train",
        help="train (default), or preflight: check sources and plan memory, without GPUs",
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"TrainerConfig JSON file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )
    return parser.parse_args(argv)


def config_path(cli_value: str | None) -> Path:
    """The flag wins over the environment, which wins over the operator's mount point."""
    return Path(cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: Path) -> TrainerConfig:
    """Reads and validates the config; the error names the file and the offending fields."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the trainer config {path}: {exc.strerror or exc}") from exc
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid trainer config {path}: {problems}") from exc
