"""Argo CD's health check for kubetune's kinds: the Lua scripts that docs/install.md tells users
to put in `argocd-cm`, run by a real Lua 5.1 interpreter (lupa; Argo CD's gopher-lua implements
Lua 5.1) on the object as Argo CD hands it over (the JSON object as a Lua table, arrays 1-based,
numbers as Lua numbers), returning what Argo CD reads: `hs.status` and `hs.message`."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import lupa.lua51 as lua
import yaml

INSTALL_DOC = Path(__file__).resolve().parents[2] / "docs" / "install.md"
KEY = "resource.customizations.health.kubetune.io_{kind}"
# What Argo CD accepts as a health status (gitops-engine's health.HealthStatusCode).
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


@cache
def health_scripts() -> dict[str, str]:
    """kind -> Lua script, from the `argocd-cm` data block in docs/install.md."""
    blocks = re.findall(r"```yaml\n(.*?)```", INSTALL_DOC.read_text(), flags=re.DOTALL)
    for block in blocks:
        if KEY.format(kind="") in block:
            data = yaml.safe_load(block)["data"]
            return {
                kind: data[KEY.format(kind=kind)]
                for kind in ("FineTuneJob", "ModelServer")
                if KEY.format(kind=kind) in data
            }
    raise AssertionError(f"no Argo CD health scripts in {INSTALL_DOC}")


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) of Argo CD's health check for a FineTuneJob or ModelServer object."""
    script = health_scripts()[obj["kind"]]
    runtime = lua.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    hs = runtime.execute(script)
    if hs is None:
        raise AssertionError(f"the {obj['kind']} health script returned nothing")
    status, message = hs["status"], hs["message"]
    if status not in STATUSES:
        raise AssertionError(f"Argo CD rejects the health status {status!r}")
    return str(status), str(message or "")
