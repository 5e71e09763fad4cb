"""Where kubetune keeps what it builds and downloads: never inside the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$KUBETUNE_CACHE`, else `$XDG_CACHE_HOME/kubetune`, else `~/.cache/kubetune` (as in
    hack/venv.sh): binaries, Go caches, venvs, Triton's prepared backends, clusters."""
    if env := os.environ.get("KUBETUNE_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kubetune"
