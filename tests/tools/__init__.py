"""Third-party checkers the tests judge kubetune with, run for real: kube-score, kubeconform,
kstatus (Flux and kpt's health library), Pod Security admission's evaluator and Argo CD's Lua
health scripts. The Go ones are built from the module proxy by `kubetune.devcluster.gotools`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from typing import Any

from kubetune.devcluster.gotools import HelperTool, PublishedTool, ensure_tool


def json_lines(
    tool: PublishedTool | HelperTool, objects: Iterable[dict[str, Any]], *args: str
) -> list[dict[str, Any]]:
    """Feed `objects` to a tool that reads a JSON stream on stdin and prints one JSON object per
    line; return those lines."""
    stdin = "\n".join(json.dumps(obj) for obj in objects)
    result = subprocess.run(
        [str(ensure_tool(tool)), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"{tool.name} failed ({result.returncode}):\n{result.stderr}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
