"""Config parsing: the same typed models as the operator, and errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    config_path,
    load_config,
    parse_args,
)
from kubetune.trainer.errors import ConfigError, Reason


def minimal() -> dict[str, Any]:
    return {
        "spec": {
            "model": {"source": "hf://org/model"},
            "dataset": {"source": "pvc://data/train.jsonl"},
            "output": {"uri": "pvc://out/model"},
        },
        "paths": {"model": "/m", "dataset": "/d.jsonl", "output": "/o", "checkpoints": "/c"},
    }


def test_flag_beats_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert config_path(None) == Path(DEFAULT_CONFIG_PATH)
    monkeypatch.setenv(CONFIG_ENV, "/env/config.json")
    assert config_path(None) == Path("/env/config.json")
    assert config_path(parse_args(["--config", "/flag.json"]).config) == Path("/flag.json")


def test_camel_case_config_parses_with_defaults(tmp_path: Path) -> None:
    raw = minimal()
    raw["spec"]["hyperparameters"] = {"batchSize": 8, "maxSeqLength": 64}
    raw["reporting"] = {"toApiServer": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    config = load_config(path)
    assert config.spec.hyperparameters.batch_size == 8
    assert config.spec.hyperparameters.epochs == 1
    assert config.spec.checkpointing.every_steps == 200
    assert not config.reporting.to_api_server
    assert config.job is None


def test_unknown_field_is_an_error_naming_file_and_field(tmp_path: Path) -> None:
    raw = minimal()
    raw["spec"]["hyperparameters"] = {"batchSise": 8}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in err.value.message
    assert "spec.hyperparameters.batchSise" in err.value.message
    assert err.value.reason is Reason.OTHER


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read the trainer config {tmp_path}/none.json"):
        load_config(tmp_path / "none.json")
