"""The helm binary the control plane build caches, with folders of its own (never the user's)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.devcluster.binaries import binaries_dir

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"


@dataclass
class Helm:
    env: dict[str, str]

    @classmethod
    def in_folder(cls, home: Path) -> Helm:
        return cls(
            {
                "PATH": "/usr/bin:/bin",
                "HOME": str(home),
                "HELM_CACHE_HOME": str(home / "cache"),
                "HELM_CONFIG_HOME": str(home / "config"),
                "HELM_DATA_HOME": str(home / "data"),
            }
        )

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(binaries_dir() / "helm"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    def template(self, *sets: str, namespace: str = "kubetune-system") -> list[dict[str, Any]]:
        args = [arg for s in sets for arg in ("--set", s)]
        out = self.run("template", "kt", str(CHART), "--namespace", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]
