"""Inside a fresh mount namespace: lay out a pod's filesystem view, then exec its container.

`python -m kubetune.devcluster.podexec SPEC.json` runs under `unshare --mount`, so every mount
below is private to this container: a tmpfs at /kubetune holds the pod's volume mount points, the
volumes are bind-mounted where the container expects them, /etc/hosts is the pod's own (service
and pod names resolve, as cluster DNS would make them), then the container's command replaces this
process. Nothing is changed outside the namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOTS = ("/kubetune", "/var/run/secrets")  # tmpfs'd first so mount points need no host folder


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for root in ROOTS:
        Path(root).mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", "size=16m,mode=755", "kubetune-pod", root)
    for mount in spec["mounts"]:
        source, target = mount["source"], mount["target"]
        if Path(source).is_dir():
            Path(target).mkdir(parents=True, exist_ok=True)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).touch(exist_ok=True)
        _mount("--bind", source, target)
        if mount.get("readOnly"):
            _mount("-o", "remount,bind,ro", target)
    os.chdir(spec.get("workingDir") or "/")
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


if __name__ == "__main__":
    main(sys.argv[1])
