"""NVIDIA's perf_analyzer, Triton's own load generator, for the autoscaling test and the serving
benchmark: installed by hack/perf-analyzer.sh (the tritonclient 2.50.0 wheel's binary, in an
environment of its own under the cache) and driven with kubetune's classifier input (TEXT)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "hack" / "perf-analyzer.sh"


def perf_analyzer() -> str:
    """The perf_analyzer command (a wrapper with its CUDA runtime on the library path),
    installed first when missing (seconds)."""
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"installing perf_analyzer failed:\n{done.stderr}")
    return done.stdout.strip()


def text_input(folder: Path, texts: list[str]) -> Path:
    """perf_analyzer's --input-data file: one single-text request per text, in turn."""
    path = folder / "perf-analyzer-input.json"
    path.write_text(json.dumps({"data": [{"TEXT": [text]} for text in texts]}))
    return path


def command(model: str, url: str, data: Path, concurrency: int, *extra: str) -> list[str]:
    """perf_analyzer on `model` at `url` (HTTP) with `concurrency` closed-loop clients sending
    the texts of `data`, batch 1 (one text per request, as a client sends them)."""
    return [
        perf_analyzer(),
        "-m",
        model,
        "-u",
        url,
        "-i",
        "http",
        "--concurrency-range",
        str(concurrency),
        "--shape",
        "TEXT:1",
        "--input-data",
        str(data),
        *extra,
    ]
