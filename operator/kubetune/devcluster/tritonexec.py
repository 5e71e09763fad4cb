"""`python -m kubetune.devcluster.tritonexec ARGS...`: what `tritonserver ARGS...` means on the
local node. Runs the real server from the nvidia-pytriton wheel, prepared by kubetune.serving.local
(backends with this Python's stub, the numpy overlay, the library path), with the pod's arguments.
"""

from __future__ import annotations

import os
import sys

from kubetune.serving.local import (
    ensure_numpy_overlay,
    find_distribution,
    prepare_backends,
    prepare_stub_environment,
    server_environment,
)


def main(argv: list[str]) -> None:
    dist = find_distribution()
    backends = prepare_backends(dist)
    env = server_environment(dist, prepare_stub_environment(ensure_numpy_overlay()))
    command = [
        str(dist.server),
        *argv,
        f"--backend-directory={backends}",
        "--allow-gpu-metrics=false",
    ]
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
