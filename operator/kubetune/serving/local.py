"""Start and stop the real Triton Inference Server locally, for tests, benchmarks and the demo.

The server is the ``tritonserver`` binary that the PyPI wheel ``nvidia-pytriton`` carries (Triton
2.51 with the python backend; it runs on CPU). Using it directly, outside pytriton, takes three
preparations, all cached outside the repository under ``<cache>/triton/`` and reused, and the
process environment:

- a backends folder: a copy of the wheel's ``tritonserver/backends`` with the python backend stub
  built for the running Python placed in ``backends/python/`` (the stub is Python-specific);
- a numpy overlay: numpy 1.26 installed with ``pip --target``, first on the stub's ``sys.path``.
  Triton 2.51's python backend corrupts string (BYTES) tensors under numpy 2, while the training
  stack needs numpy 2: the overlay gives the stub its own numpy, as the production Triton image
  has its own Python environment;
- a stub environment: the stub embeds Python in isolated mode, which ignores PYTHONPATH, so a
  tiny virtual environment (``pyvenv.cfg`` and a ``.pth`` file listing the overlay, then this
  interpreter's site-packages) is put first on PATH, where the stub's Python finds it;
- the process environment: ``LD_LIBRARY_PATH`` starts with the running interpreter's LIBDIR (the
  stub links ``libpython3.X.so``, which must be this interpreter's, or the venv's extension
  modules fail with undefined symbols), then the wheel's ``nvidia_pytriton.libs``.

The server listens on loopback only, on free ports, with model-control mode ``none`` unless asked
otherwise (the repository API can load arbitrary code; see docs/serving.md).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kubetune.cache import cache_root

PYTRITON_DISTRIBUTION = "nvidia-pytriton"
STUB_NUMPY_VERSION = "1.26.4"
STUB_NAME = "triton_python_backend_stub"
DEFAULT_READY_TIMEOUT = 180.0
LOG_TAIL_LINES = 30
STUB_ENV_FORMAT = "2"  # bump when what prepare_stub_environment writes changes
# The stub embeds Python with an isolated configuration, which leaves LC_CTYPE at "C" and ignores
# PYTHONUTF8: open() would then read text files as ASCII, which torch's inductor templates
# (imported by vLLM) are not. A .pth line starting with "import" runs at start-up.
STUB_LOCALE_LINE = (
    "import locale; locale.setlocale(locale.LC_CTYPE, 'C.UTF-8')  # kubetune: UTF-8 text I/O"
)
# Error lines every CPU-only start prints; they say nothing about why a start failed.
LOG_NOISE = ("CudaDriverHelper has not been initialized",)


class TritonError(RuntimeError):
    """Triton could not be prepared or started; the message carries the server's log tail."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where the wheel keeps the server, its backends, stubs and bundled shared libraries."""

    root: Path
    libs_dir: Path
    version: str

    @property
    def server(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    def stub(self, python_version: str) -> Path:
        return self.root / "python_backend_stubs" / python_version / STUB_NAME


def find_distribution() -> TritonDistribution:
    """Locate the tritonserver of the installed nvidia-pytriton wheel, without importing pytriton
    (whose import pulls in much more than a path lookup needs)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise TritonError(
            "the tritonserver binary comes from the PyPI wheel nvidia-pytriton, which is not "
            "installed in this environment (pip install nvidia-pytriton==0.7.0)"
        )
    package = Path(spec.origin).parent
    dist = TritonDistribution(
        root=package / "tritonserver",
        libs_dir=package.parent / "nvidia_pytriton.libs",
        version=importlib.metadata.version(PYTRITON_DISTRIBUTION),
    )
    if not dist.server.is_file():
        raise TritonError(f"nvidia-pytriton {dist.version} carries no server at {dist.server}")
    return dist


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@contextlib.contextmanager
def _cache_lock(directory: Path) -> Iterator[None]:
    """Serialise cache preparation between processes (parallel test runs, a bench)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tree_digest(folders: Mapping[str, Path]) -> str:
    digest = hashlib.sha256()
    for name, folder in sorted(folders.items()):
        for path in sorted(Path(folder).rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(folder)}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def prepare_backends(
    dist: TritonDistribution | None = None, python_backends: Mapping[str, Path] | None = None
) -> Path:
    """The backends folder with this Python's stub in ``python/``; built once, then reused.

    ``python_backends`` adds python-based backends (``name`` -> a folder with ``model.py``):
    Triton runs a model whose config says ``backend: "<name>"`` through the python backend with
    that ``model.py``, as NVIDIA's vLLM image does for ``backend: "vllm"``. Such a folder is keyed
    by the backends' contents, so an edited backend gets a fresh copy.
    """
    dist = dist or find_distribution()
    version = python_version()
    base = cache_root() / "triton" / dist.version
    extra = dict(python_backends or {})
    for name, folder in extra.items():
        if not (Path(folder) / "model.py").is_file():
            raise TritonError(f"python-based backend {name!r}: {folder} has no model.py")
    suffix = f"-{_tree_digest(extra)}" if extra else ""
    target = base / f"python{version}" / f"backends{suffix}"
    if (target / "python" / STUB_NAME).is_file():
        return target
    stub = dist.stub(version)
    if not stub.is_file():
        available = sorted(p.name for p in (dist.root / "python_backend_stubs").iterdir())
        raise TritonError(
            f"nvidia-pytriton {dist.version} has no python backend stub for Python {version} "
            f"(it has {', '.join(available)})"
        )
    with _cache_lock(base):
        if (target / "python" / STUB_NAME).is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".backends.", dir=base))
        try:
            shutil.copytree(
                dist.backends,
                staging / "backends",
                ignore=shutil.ignore_patterns("__pycache__"),
            )
            shutil.copy2(stub, staging / "backends" / "python" / STUB_NAME)
            (staging / "backends" / "python" / STUB_NAME).chmod(0o755)
            for name, folder in extra.items():
                shutil.copytree(
                    folder,
                    staging / "backends" / name,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            (staging / "backends").rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_numpy_overlay(numpy_version: str = STUB_NUMPY_VERSION) -> Path:
    """A folder holding only numpy ``numpy_version`` for the stub's PYTHONPATH; installed with
    this interpreter's pip the first time (PyPI or the configured find-links), then reused."""
    base = cache_root() / "triton"
    target = base / f"numpy-overlay-{numpy_version}"
    if (target / "numpy" / "__init__.py").is_file():
        return target
    with _cache_lock(base):
        if (target / "numpy" / "__init__.py").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".numpy-overlay.", dir=base))
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--no-compile",
                    "--target",
                    str(staging),
                    f"numpy=={numpy_version}",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise TritonError(
                    f"installing numpy=={numpy_version} for the python backend stub failed:\n"
                    f"{result.stderr[-4000:]}"
                )
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class PythonEnvironment:
    """The interpreter whose packages the python backend stub imports (torch, transformers, or
    vLLM's own stack in a venv of its own): its site-packages, base executable and LIBDIR."""

    prefix: str
    base_executable: Path
    site_packages: tuple[str, ...]
    libdir: str | None
    version: str

    @classmethod
    def current(cls) -> PythonEnvironment:
        paths = sysconfig.get_paths()
        return cls(
            prefix=sys.prefix,
            base_executable=Path(getattr(sys, "_base_executable", sys.executable)).resolve(),
            site_packages=tuple(dict.fromkeys([paths["purelib"], paths["platlib"]])),
            libdir=sysconfig.get_config_var("LIBDIR"),
            version=python_version(),
        )

    @classmethod
    def of(cls, venv: Path) -> PythonEnvironment:
        """Another virtual environment, asked through its own interpreter. It must be the same
        Python version as this one: the stub is built per version and links its libpython."""
        python = Path(venv) / "bin" / "python"
        if not python.is_file():
            raise TritonError(f"{venv} is not a Python environment (no bin/python)")
        probe = (
            "import json, sys, sysconfig; p = sysconfig.get_paths(); print(json.dumps({"
            "'prefix': sys.prefix, 'base': getattr(sys, '_base_executable', sys.executable), "
            "'site': [p['purelib'], p['platlib']], 'libdir': sysconfig.get_config_var('LIBDIR'), "
            "'version': f'{sys.version_info[0]}.{sys.version_info[1]}'}))"
        )
        result = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise TritonError(f"cannot ask {python} for its paths: {result.stderr[-2000:]}")
        data = json.loads(result.stdout)
        if data["version"] != python_version():
            raise TritonError(
                f"{venv} is Python {data['version']}, the stub in use is built for "
                f"{python_version()}"
            )
        return cls(
            prefix=str(data["prefix"]),
            base_executable=Path(data["base"]).resolve(),
            site_packages=tuple(dict.fromkeys(str(x) for x in data["site"])),
            libdir=data["libdir"],
            version=str(data["version"]),
        )


def prepare_stub_environment(
    numpy_overlay: Path, python_env: PythonEnvironment | None = None
) -> Path:
    """A minimal virtual environment that makes the stub's Python see numpy 1.26 first, then
    this interpreter's packages; returns its ``bin`` folder, which goes first on PATH.

    The stub embeds Python in ISOLATED mode: PYTHONPATH and PYTHONHOME are ignored. What it does
    honour is the normal prefix search: with no path to itself it looks up ``python3`` on PATH
    and, finding ``pyvenv.cfg`` next to it, runs as that virtual environment. This environment's
    site-packages holds a single ``.pth`` file listing the numpy overlay and then this
    interpreter's site-packages, so they are added to ``sys.path`` in exactly that order.
    Keyed by this interpreter's prefix: several venvs can share the cache.
    """
    env = python_env or PythonEnvironment.current()
    version = env.version
    entries = [str(numpy_overlay), *(p for p in env.site_packages if p != str(numpy_overlay))]
    base_executable = env.base_executable
    digest = hashlib.sha256(
        "\n".join([STUB_ENV_FORMAT, env.prefix, str(base_executable), *entries]).encode()
    )
    root = cache_root() / "triton" / "stub-env" / digest.hexdigest()[:16]
    bin_dir = root / "bin"
    pth = root / "lib" / f"python{version}" / "site-packages" / "kubetune-stub.pth"
    if pth.is_file():
        return bin_dir
    with _cache_lock(root.parent):
        if pth.is_file():
            return bin_dir
        staging = Path(tempfile.mkdtemp(prefix=".stub-env.", dir=root.parent))
        try:
            (staging / "bin").mkdir()
            (staging / "bin" / "python3").symlink_to(base_executable)
            (staging / "pyvenv.cfg").write_text(
                f"home = {base_executable.parent}\n"
                "include-system-site-packages = false\n"
                f"version = {'.'.join(map(str, sys.version_info[:3]))}\n",
                encoding="utf-8",
            )
            site = staging / "lib" / f"python{version}" / "site-packages"
            site.mkdir(parents=True)
            lines = [*entries, STUB_LOCALE_LINE]
            (site / pth.name).write_text("".join(f"{e}\n" for e in lines), encoding="utf-8")
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return bin_dir


def server_environment(
    dist: TritonDistribution,
    stub_bin: Path,
    base: dict[str, str] | None = None,
    python_env: PythonEnvironment | None = None,
) -> dict[str, str]:
    """The environment tritonserver (and through it the python backend stub) runs with."""
    env = dict(os.environ if base is None else base)
    library_path = [str(dist.libs_dir)]
    libdir = (python_env or PythonEnvironment.current()).libdir
    if libdir:
        library_path.insert(0, str(libdir))
    if existing := env.get("LD_LIBRARY_PATH"):
        library_path.append(existing)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
    env["PATH"] = os.pathsep.join([str(stub_bin), env.get("PATH", os.defpath)])
    # The stub ignores these (isolated mode); dropped so nobody is misled into setting them.
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def free_ports(count: int) -> list[int]:
    """Ports the kernel considers free right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The log's error lines, then its last lines: Triton prints large status tables at exit
    that would push the one line saying why out of a plain tail. Table rows are left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip() and line[:1] not in "|+"]
    errors = [
        line
        for line in kept
        if line.startswith("E") and line[1:5].isdigit() and not any(n in line for n in LOG_NOISE)
    ]
    parts = []
    if errors:
        parts += ["errors:", *errors[-10:], "last lines:"]
    return "\n".join(parts + kept[-lines:])


@dataclass
class TritonServer:
    """A running tritonserver process on loopback."""

    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    repositories: tuple[Path, ...]

    @property
    def http_url(self) -> str:
        """host:port, the form tritonclient.http expects."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    def ready(self) -> bool:
        try:
            url = f"http://{self.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Block until /v2/health/ready answers 200; raise with the log tail if the server dies
        or the timeout passes first."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise TritonError(
                    f"tritonserver exited with code {self.process.returncode} before becoming "
                    f"ready; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise TritonError(
                    f"tritonserver was not ready after {timeout:.0f}s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Triton unloads models and stops its stubs), then SIGKILL the process group
        — the server and the stubs it started — if anything is still there."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


def start_triton(
    repository: Path | Sequence[Path],
    *,
    model_control_mode: str = "none",
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    log_path: Path | None = None,
    exit_on_error: bool = True,
    strict_readiness: bool = True,
    ports: tuple[int, int, int] | None = None,
    log_verbose: int = 0,
    exit_timeout: int = 3,
    extra_args: Sequence[str] = (),
    python_venv: Path | None = None,
    python_backends: Mapping[str, Path] | None = None,
    environment: Mapping[str, str] | None = None,
) -> TritonServer:
    """Start tritonserver on ``repository`` (one folder or several) and wait until it is ready.

    ``exit_on_error=False`` with ``strict_readiness=False`` keeps the server up when a model
    fails to load, which is how a failed model is observed from the outside (smoke test).
    The caller owns the result and must ``stop()`` it; ``running_triton`` does that for you.
    ``python_venv`` makes the stub import from another virtual environment (vLLM's, which pins
    its own torch and transformers), ``python_backends`` adds python-based backends (the vLLM
    backend's folder as ``{"vllm": ...}``), ``environment`` adds variables for the server.
    """
    repositories = (repository,) if isinstance(repository, Path) else tuple(repository)
    if not repositories:
        raise ValueError("at least one model repository is needed")
    for repo in repositories:
        if not Path(repo).is_dir():
            raise TritonError(f"model repository {repo} does not exist")
    if model_control_mode not in {"none", "explicit", "poll"}:
        raise ValueError(f"unknown model control mode {model_control_mode!r}")
    dist = find_distribution()
    backends = prepare_backends(dist, python_backends)
    python_env = PythonEnvironment.of(python_venv) if python_venv is not None else None
    env = server_environment(
        dist, prepare_stub_environment(ensure_numpy_overlay(), python_env), None, python_env
    )
    env.update(environment or {})
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="kubetune-triton-", suffix=".log")
        os.close(handle)
        log_path = Path(name)

    attempts = 1 if ports is not None else 3
    for attempt in range(attempts):
        http_port, grpc_port, metrics_port = ports if ports is not None else free_ports(3)
        command = [
            str(dist.server),
            *(f"--model-repository={Path(r).resolve()}" for r in repositories),
            f"--model-control-mode={model_control_mode}",
            f"--backend-directory={backends}",
            # Each server gets its own shared-memory names, so several can run side by side.
            f"--backend-config=python,shm-region-prefix-name=kubetune_{os.getpid()}_{http_port}",
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-on-error={str(exit_on_error).lower()}",
            f"--strict-readiness={str(strict_readiness).lower()}",
            # Local servers need no long drain: open keep-alive connections would hold it.
            f"--exit-timeout-secs={exit_timeout}",
            f"--log-verbose={log_verbose}",
            *extra_args,
        ]
        with log_path.open("ab" if attempt else "wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stop() reaches the stubs too
            )
        server = TritonServer(
            process, http_port, grpc_port, metrics_port, log_path, tuple(map(Path, repositories))
        )
        try:
            server.wait_ready(ready_timeout)
        except TritonError:
            server.stop()
            port_clash = "address already in use" in server.log_tail().lower()
            if port_clash and attempt + 1 < attempts:
                continue
            raise
        except BaseException:
            server.stop()
            raise
        return server
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def running_triton(
    repository: Path | Sequence[Path],
    *,
    model_control_mode: str = "none",
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    log_path: Path | None = None,
    exit_on_error: bool = True,
    strict_readiness: bool = True,
    extra_args: Sequence[str] = (),
    python_venv: Path | None = None,
    python_backends: Mapping[str, Path] | None = None,
    environment: Mapping[str, str] | None = None,
) -> Iterator[TritonServer]:
    """A ready tritonserver for the duration of the block; always stopped afterwards."""
    server = start_triton(
        repository,
        model_control_mode=model_control_mode,
        ready_timeout=ready_timeout,
        log_path=log_path,
        exit_on_error=exit_on_error,
        strict_readiness=strict_readiness,
        extra_args=extra_args,
        python_venv=python_venv,
        python_backends=python_backends,
        environment=environment,
    )
    try:
        yield server
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kubetune.serving.local REPOSITORY``: serve a repository until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("repository", type=Path, nargs="+", help="model repository folder(s)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-control-mode", default="none", choices=["none", "explicit"])
    args = parser.parse_args(argv)
    server = start_triton(
        args.repository,
        model_control_mode=args.model_control_mode,
        ports=(args.http_port, args.grpc_port, args.metrics_port),
    )
    print(f"triton ready: http {server.http_url}  grpc {server.grpc_url}  {server.metrics_url}")
    print(f"log: {server.log_path}")
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
