"""Container images for the local node, built with buildah (no Docker engine, no registry).

Each image is built from its folder under images/ and kept as an OCI archive in the cache
(`<cache>/images/<name>-<key>.tar`), where the key is a hash of everything that went into it: the
Dockerfile, the files of its build context, the build arguments and the base image's own key. An
image is rebuilt only when that key changes; loading it into a node's containerd is `ctr images
import` of the archive.

buildah keeps its own storage under the cache too (`<cache>/buildah`), never the machine's
/var/lib/containers.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.cache import cache_root

REPO = Path(__file__).resolve().parents[3]
IMAGES = REPO / "images"
REGISTRY = "kubetune.local"


class ImageError(RuntimeError):
    """An image could not be built or loaded; the message carries the tool's last lines."""


@dataclass(frozen=True)
class Image:
    """A built image: its reference (as pods name it) and the OCI archive that holds it."""

    name: str
    ref: str
    archive: Path

    @property
    def published_ref(self) -> str | None:
        """The name the operator and the chart use by default (`ghcr.io/kubetune/NAME:VERSION`);
        a node that loads this image tags it so, and pods find it with no registry."""
        if self.name not in PUBLISHED:
            return None
        from kubetune import __version__

        return f"ghcr.io/kubetune/{self.name}:{__version__}"


PUBLISHED = ("operator", "trainer", "triton")


@dataclass
class ImageSpec:
    """How to build one image: its folder under images/, build arguments, files made first."""

    name: str
    build_args: dict[str, str] = field(default_factory=dict)
    # Extra inputs of the key that are not files of the context (the Debian suite, say).
    extra_key: str = ""
    # Paths of the repository the Dockerfile COPYs (the build context is the repository root,
    # as for `docker build -f images/NAME/Dockerfile .`); none: the image's own folder.
    inputs: tuple[str, ...] = ()
    # The Dockerfile in the image's folder: a local variant of an upstream one, say.
    dockerfile: str = "Dockerfile"
    # Folders of `inputs` left out of the context (and so of the key).
    exclude: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        return IMAGES / self.name

    def files(self) -> list[tuple[str, Path]]:
        """(path in the build context, file) for every input, sorted."""
        if not self.inputs:
            found = [(str(p.relative_to(self.folder)), p) for p in self.folder.rglob("*")]
        else:
            found = [(self.dockerfile, self.folder / self.dockerfile)]
            for item in self.inputs:
                path = REPO / item
                paths = [path] if path.is_file() else list(path.rglob("*"))
                found += [
                    (str(p.relative_to(REPO)), p)
                    for p in paths
                    if not any(p.is_relative_to(REPO / x) for x in self.exclude)
                ]
        return sorted(
            (name, p)
            for name, p in found
            # Not sources: bytecode, the metadata an editable install (hack/cli.sh) leaves, and
            # hidden folders such as the import-linter cache `make lint` writes into operator/
            # (it changed every image's key on every run, so CI rebuilt them all each time).
            if p.is_file()
            and "__pycache__" not in p.parts
            and not any(part.endswith(".egg-info") for part in p.parts)
            and not any(part.startswith(".") for part in Path(name).parts)
        )


def _say(message: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def host_ca_bundle() -> str:
    return os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"


def _buildah_env() -> dict[str, str]:
    # buildah keeps `RUN --mount=type=cache` folders (pip's downloads) under $TMPDIR.
    tmp = cache_root() / "buildah" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def _storage_args() -> list[str]:
    root = cache_root() / "buildah"
    return [
        f"--root={root / 'storage'}",
        f"--runroot={root / 'run'}",
        "--storage-driver=overlay",
    ]


def _run(argv: list[str], what: str, stream: bool = False) -> str:
    """Runs a build tool; on failure the error names the step and shows its last lines."""
    if stream:
        # Long steps (a Dockerfile build) print their own progress: pass it through, prefixed.
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=_buildah_env(),
        )
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
        proc.wait()
        output = "\n".join(lines)
        code = proc.returncode
    else:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, errors="replace", env=_buildah_env()
        )
        output, code = done.stdout + done.stderr, done.returncode
    if code != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise ImageError(f"{what} failed (exit {code}): {' '.join(argv[:3])} ...\n{tail}")
    return output


def _hash_inputs(spec: ImageSpec) -> str:
    digest = hashlib.sha256()
    for name, path in spec.files():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for key, value in sorted(spec.build_args.items()):
        digest.update(f"arg {key}={value}\0".encode())
    digest.update(spec.extra_key.encode())
    return digest.hexdigest()[:16]


@contextmanager
def _lock(name: str) -> Iterator[None]:
    """One build of an image at a time on this machine (a test run and `make demo`, say)."""
    path = cache_root() / "images" / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _in_storage(ref: str) -> bool:
    done = subprocess.run(
        ["buildah", *_storage_args(), "inspect", "--type", "image", ref],
        check=False,
        capture_output=True,
        env=_buildah_env(),
    )
    return done.returncode == 0


def build(
    spec: ImageSpec, prepare: Callable[[Path], None] | None = None, export: bool = True
) -> Image:
    """The image of `spec`, built with `buildah bud` when its key is not in the cache yet.

    `prepare` writes artifacts made on the host into a copy of the context before the build (the
    pause binary): the key covers their sources, which are files of the context. `export`
    False: the image is a base that only other builds use (no node loads it), kept in buildah's
    storage alone, with no archive (an export of the ML base takes minutes and gigabytes).
    """
    key = _hash_inputs(spec)
    ref = f"{REGISTRY}/{spec.name}:{key}"
    archive = cache_root() / "images" / f"{spec.name}-{key}.tar"

    def built() -> bool:
        return archive.exists() or (not export and _in_storage(ref))

    if built():
        return Image(spec.name, ref, archive)
    with _lock(spec.name):
        if built():
            return Image(spec.name, ref, archive)
        _say(f"building image {spec.name} ({ref}) with buildah")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"kubetune-{spec.name}-") as tmp:
            context = Path(tmp) / "context"
            for name, path in spec.files():
                (context / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, context / name)
            if prepare is not None:
                prepare(context)
            argv = [
                "buildah",
                *_storage_args(),
                "bud",
                "--isolation=chroot",
                "--layers",
                # A failed step's working container goes too (by default buildah
                # keeps it: gigabytes of half-installed packages for the ML images).
                "--force-rm",
                # Builds reach the package registries as the host does: through its network and
                # its CA bundle (mounted for the build only, never written into an image).
                "--network=host",
                f"--volume={host_ca_bundle()}:/etc/ssl/certs/ca-certificates.crt:ro",
                f"--tag={ref}",
                *(f"--build-arg={k}={v}" for k, v in sorted(spec.build_args.items())),
                f"--file={context / spec.dockerfile}",
                str(context),
            ]
            _run(argv, f"building image {spec.name}", stream=True)
            if export:
                partial = archive.with_suffix(".partial")
                partial.unlink(missing_ok=True)
                _say(f"exporting image {spec.name} to {archive.name}")
                _run(
                    ["buildah", *_storage_args(), "push", ref, f"oci-archive:{partial}:{ref}"],
                    f"exporting image {spec.name}",
                )
                partial.rename(archive)
        _prune(spec.name, archive, ref)
        _say(f"image {spec.name} built in {time.monotonic() - started:.0f}s")
    return Image(spec.name, ref, archive)


def _being_loaded(archive: Path) -> bool:
    """True while a node loads the archive (node.import_image holds a shared lock on it)."""
    try:
        with archive.open("rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False
    return False


# Versions of an image whose archives are kept: this build's and the one before it. Another run
# on this machine (a test run of other code, `make demo` of a checkout) built the one before and
# may not have loaded it into its cluster yet: images are loaded on first use.
KEEP_VERSIONS = 2


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned meanwhile by another run
        return 0.0


def stale_archives(archive: Path, found: Iterable[Path]) -> list[Path]:
    """The archives of other versions of `archive`'s image beyond the newest KEEP_VERSIONS."""
    others = sorted((p for p in found if p != archive), key=_mtime, reverse=True)
    return others[KEEP_VERSIONS - 1 :]


def _prune(name: str, archive: Path, ref: str) -> None:
    """Older builds of the same image are of no further use: their archives and their layers in
    buildah's storage go (images are large; the disk is shared), all but the newest
    KEEP_VERSIONS and any archive a node is loading."""
    kept = {archive}
    for old in stale_archives(archive, archive.parent.glob(f"{name}-*.tar")):
        if not _being_loaded(old):
            old.unlink(missing_ok=True)
        else:
            kept.add(old)
    kept |= set(archive.parent.glob(f"{name}-*.tar"))
    keep_refs = {f"{REGISTRY}/{p.stem.replace(f'{name}-', f'{name}:', 1)}" for p in kept}
    listed = _run(
        ["buildah", *_storage_args(), "images", "--format", "{{.Name}}:{{.Tag}}"],
        "listing buildah's images",
    )
    stale = [
        r
        for r in listed.split()
        if r.startswith(f"{REGISTRY}/{name}:") and r != ref and r not in keep_refs
    ]
    if stale:
        _run(["buildah", *_storage_args(), "rmi", *stale], f"removing old {name} images")
    try:
        _run(["buildah", *_storage_args(), "rmi", "--prune"], "pruning buildah's unused layers")
    except ImageError as err:
        # Another image's build (its own lock) is using intermediate layers right now: those are
        # not unused; what this prune could not remove goes with the next one.
        if "image is in use by a container" not in str(err):
            raise


def pause_image() -> Image:
    """The pod sandbox image: images/pause/pause.c compiled static with the host's gcc."""

    def compile_pause(context: Path) -> None:
        _run(
            ["gcc", "-static", "-O2", "-s", "-o", str(context / "pause"), str(context / "pause.c")],
            "compiling pause",
        )

    return build(ImageSpec("pause"), compile_pause)


SUITE = "bookworm"


def base_image() -> Image:
    """Debian bookworm with Python 3.11 (images/base/packages.txt), made by mmdebstrap."""
    packages_file = IMAGES / "base" / "packages.txt"
    packages = [
        line.strip()
        for line in packages_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def bootstrap(context: Path) -> None:
        _say(f"mmdebstrap: Debian {SUITE} with {', '.join(packages)} (about a minute)")
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                "--quiet",
                SUITE,
                str(context / "rootfs.tar"),
            ],
            "making the Debian base (mmdebstrap)",
        )

    return build(ImageSpec("base", extra_key=SUITE), bootstrap)


# What the images that install kubetune COPY. pyproject.toml names README.md as the package's
# readme: the images get a one-line one (package_readme), so editing the README rebuilds nothing.
PACKAGE_INPUTS = ("pyproject.toml", "operator")
# The local cluster's code (`kubetune dev ...`) runs on the host, never in a pod: left out of the
# images, so working on the node or the demo rebuilds none of them.
PACKAGE_EXCLUDE = ("operator/kubetune/devcluster",)


def package_readme(context: Path) -> None:
    (context / "README.md").write_text("kubetune: see the project's README.\n", encoding="utf-8")


def ml_image() -> Image:
    """images/ml: the local base of the trainer and Triton images (the ML stack, no kubetune code),
    keyed by requirements.lock only, so code changes never rebuild it. Not exported: they are
    built FROM it in buildah's storage, and their archives carry its layers to the nodes."""
    base = base_image()
    spec = ImageSpec(
        "ml",
        {"BASE_IMAGE": base.ref},
        extra_key=base.ref,
        inputs=("requirements.lock",),
    )
    return build(spec, export=False)


def triton_image() -> Image:
    """The local ModelServer image (images/triton/local.Dockerfile): the nvidia-pytriton wheel's
    tritonserver on the ML base. Upstream builds use images/triton/Dockerfile on NVIDIA's image."""
    base = ml_image()
    spec = ImageSpec(
        "triton",
        {"BASE_IMAGE": base.ref},
        extra_key=base.ref,
        inputs=PACKAGE_INPUTS,
        exclude=PACKAGE_EXCLUDE,
        dockerfile="local.Dockerfile",
    )
    return build(spec, package_readme)


# The images that run torch: built on the ML base, so they share its layers on a node.
ML_IMAGES = ("trainer", "triton")


def kubetune_image(name: str) -> Image:
    """images/NAME (operator, trainer) built on the local Debian base, or for the images of
    ML_IMAGES on the ML base (ml_image); triton is triton_image()."""
    if name == "triton":
        return triton_image()
    if name in ML_IMAGES:
        # DEPS=base: the ML base has every dependency, kubetune is installed alone.
        base, args = ml_image(), {"DEPS": "base"}
    else:
        base, args = base_image(), {}
    spec = ImageSpec(
        name,
        {"BASE_IMAGE": base.ref, **args},
        extra_key=base.ref,
        inputs=PACKAGE_INPUTS,
        exclude=PACKAGE_EXCLUDE,
    )
    return build(spec, package_readme)
