"""Third-party Go tools that the tests judge kubetune with, built from the Go module proxy.

Two sorts, both cached outside the repository and keyed by what they are built from:

- published commands, pinned here by module version (`go install PACKAGE@VERSION`, or a build as
  the requirement of a throwaway module where the proxy refuses the version list): kube-score,
  kubeconform, Kueue's manager, kube-router, Prometheus and prometheus-adapter (the monitoring
  stack of the autoscaling test, `devcluster.monitoring`);
- small mains of the repository's own (`hack/gotools/<name>`) around libraries that ship no
  command for offline objects: `kstatus` (sigs.k8s.io/cli-utils' status.Compute, how Flux and kpt
  read health) and `podsecurity` (k8s.io/pod-security-admission's evaluator, what the API
  server's PodSecurity admission runs). Their cache key is a hash of their sources, go.mod and
  go.sum, so an edit rebuilds them.

The Go module and build caches are the control plane's (`cache_root()/go`), so the Kubernetes
packages that build compiled already are reused. `python -m kubetune.devcluster.gotools` builds
them all, showing each step (`make tools`; `make test` runs it before pytest, whose capture would
hide the progress of a cold build).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kubetune.cache import cache_root

# hack/gotools in a checkout (kubetune is run from its source tree: operator/ is on PYTHONPATH).
HELPERS_MODULE = Path(__file__).resolve().parents[3] / "hack" / "gotools"


@dataclass(frozen=True)
class PublishedTool:
    """A command published as a Go module, installed at a pinned version."""

    name: str
    module: str
    command: str  # the main package, relative to the module
    version: str
    # Extra `go install` flags (version ldflags, build tags), part of the cache key's meaning but
    # pinned with the version, so the key stays name-version.
    flags: tuple[str, ...] = ()

    @property
    def package(self) -> str:
        return f"{self.module}/{self.command}"

    @property
    def key(self) -> str:
        if not self.flags:
            return f"{self.name}-{self.version}"
        digest = hashlib.sha256("\0".join(self.flags).encode()).hexdigest()[:8]
        return f"{self.name}-{self.version}-{digest}"

    @property
    def built_name(self) -> str:
        """What `go install` names the binary: the main package's folder (cmd/adapter: adapter)."""
        return Path(self.command).name

    def build(self, out: Path, env: dict[str, str]) -> list[str]:
        env["GOBIN"] = str(out)
        return ["go", "install", "-v", *self.flags, f"{self.package}@{self.version}"]


@dataclass(frozen=True)
class RequiredTool(PublishedTool):
    """A published command built as a requirement of a throwaway module (in its cache folder)
    instead of `go install PACKAGE@VERSION`: for modules whose version list the proxy refuses
    (403), which `go install` reads for deprecation notices. The throwaway module requires the
    tool's module alone, so the build list is the one the tool's own go.mod pins."""

    def build(self, out: Path, env: dict[str, str]) -> list[str]:
        (out.parent / "go.mod").write_text(
            f"module kubetune.local/build/{self.name}\n\ngo 1.26\n\n"
            f"require {self.module} {self.version}\n"
        )
        return [
            "go",
            "build",
            "-v",
            "-mod=mod",
            *self.flags,
            "-o",
            str(out / self.built_name),
            self.package,
        ]


@dataclass(frozen=True)
class HelperTool:
    """A main package of hack/gotools, built with that module's go.mod and go.sum."""

    name: str

    @property
    def built_name(self) -> str:
        return self.name

    @property
    def key(self) -> str:
        digest = hashlib.sha256()
        sources = [HELPERS_MODULE / "go.mod", HELPERS_MODULE / "go.sum"]
        sources += sorted((HELPERS_MODULE / self.name).glob("*.go"))
        for source in sources:
            digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
        return f"{self.name}-{digest.hexdigest()[:16]}"

    def build(self, out: Path, env: dict[str, str]) -> list[str]:
        # -mod=readonly: the committed go.sum is the pin; a missing entry fails instead of
        # silently resolving something else.
        return ["go", "build", "-v", "-mod=readonly", "-o", str(out / self.name), f"./{self.name}"]


KUBE_SCORE = PublishedTool("kube-score", "github.com/zegl/kube-score", "cmd/kube-score", "v1.20.0")
KUBECONFORM = PublishedTool(
    "kubeconform", "github.com/yannh/kubeconform", "cmd/kubeconform", "v0.8.0"
)
# The network-policy controller alone (--run-firewall), on the real node: it enforces the
# NetworkPolicies the operator generates (tests/integration/test_network_policy_enforced.py).
# v2.1.0 is the only version the module proxy serves.
KUBE_ROUTER = PublishedTool(
    "kube-router", "github.com/cloudnativelabs/kube-router/v2", "cmd/kube-router", "v2.1.0"
)

# Kueue's manager (job queueing with quota), run against the local cluster by the integration
# tests; its CRDs are in the module's config/components/crd (module_dir). A heavy build (minutes
# cold on 2 cores): cached like the others, by version.
KUEUE = PublishedTool("kueue", "sigs.k8s.io/kueue", "cmd/kueue", "v0.17.0")

# The peer that bench/bench_scale.py measures kubetune against (not used by the tests).
TRAINING_OPERATOR = PublishedTool(
    "training-operator.v1",  # `go install` names the binary after its package's folder
    "github.com/kubeflow/training-operator",
    "cmd/training-operator.v1",
    "v1.8.1",
)

# The Prometheus server. Its module's versions are v0.3MM.P for Prometheus 3.MM.P. Without the
# `builtinassets` build tag the web UI is served from the module's web/ui folder instead of
# compiled-in assets (which are generated by npm and not in the module): nothing here uses the UI,
# the HTTP API and the scraper are the same. `remove_all_sd` with `enable_kubernetes_sd` leaves
# out the cloud service discoveries (AWS, Azure, GCE, ... the bulk of the build: 48 min on two
# busy cores with them), keeping Kubernetes, file, HTTP and static targets. The ldflags give
# `prometheus --version` and the prometheus_build_info series the release they come from.
PROMETHEUS = PublishedTool(
    "prometheus",
    "github.com/prometheus/prometheus",
    "cmd/prometheus",
    "v0.316.0",
    flags=(
        "-tags=remove_all_sd,enable_kubernetes_sd",
        "-ldflags",
        "-X github.com/prometheus/common/version.Version=3.16.0",
    ),
)
# The custom metrics API server the documented HPA rules run in (kubernetes-sigs/prometheus-adapter;
# v0.12.0 is the latest release the module proxy serves; its version list is refused).
PROMETHEUS_ADAPTER = RequiredTool(
    "prometheus-adapter", "sigs.k8s.io/prometheus-adapter", "cmd/adapter", "v0.12.0"
)
KSTATUS = HelperTool("kstatus")
PODSECURITY = HelperTool("podsecurity")

ALL_TOOLS: tuple[PublishedTool | HelperTool, ...] = (
    KUBE_SCORE,
    KUBECONFORM,
    KUBE_ROUTER,
    KSTATUS,
    PODSECURITY,
    KUEUE,
    PROMETHEUS,
    PROMETHEUS_ADAPTER,
)


def go_env() -> dict[str, str]:
    """The environment for `go`: the control plane's module and build caches."""
    env = dict(os.environ)
    env.update(
        GOMODCACHE=env.get("GOMODCACHE") or str(cache_root() / "go" / "mod"),
        GOCACHE=env.get("GOCACHE") or str(cache_root() / "go" / "build"),
        GOFLAGS="-buildvcs=false",
    )
    return env


def module_dir(tool: PublishedTool) -> Path:
    """The tool's module source in the Go module cache (downloaded when missing), for what it
    ships beside its command: kubeconform's scripts/openapi2jsonschema.py converts CRDs."""
    cache_root().mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{tool.module}@{tool.version}"],
        env=go_env(),
        cwd=cache_root(),
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(json.loads(result.stdout)["Dir"])


def tool_path(tool: PublishedTool | HelperTool) -> Path:
    return cache_root() / "tools" / tool.key / tool.name


def ensure_tool(tool: PublishedTool | HelperTool, log: bool = True) -> Path:
    """The tool's binary, built first when this version is not cached (seconds to minutes)."""
    target = tool_path(tool)
    if os.access(target, os.X_OK):
        return target
    if shutil.which("go") is None:
        raise RuntimeError(f"building {tool.name} needs the Go toolchain (go) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time per tool and version: parallel test runs wait for the first.
    with (target.parent / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(target, os.X_OK):
            return target
        env = go_env()
        # Built into a folder of its own, then moved: a half-written binary is never found.
        out = target.parent / ".building"
        shutil.rmtree(out, ignore_errors=True)
        command = tool.build(out, env)
        started = time.monotonic()
        if log:
            print(f"kubetune: building {tool.name} into {target.parent}", file=sys.stderr)
            print(f"kubetune: $ {' '.join(command)}", file=sys.stderr, flush=True)
        subprocess.run(
            command,
            env=env,
            cwd=HELPERS_MODULE if isinstance(tool, HelperTool) else target.parent,
            check=True,
            stdout=sys.stderr if log else subprocess.DEVNULL,
            stderr=sys.stderr if log else subprocess.DEVNULL,
        )
        (out / tool.built_name).replace(target)
        out.rmdir()
        if log:
            print(
                f"kubetune: {tool.name} built in {time.monotonic() - started:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    return target


def main() -> None:
    for tool in ALL_TOOLS:
        print(ensure_tool(tool))


if __name__ == "__main__":
    main()
