"""The Dockerfiles, read as text (no Docker here): what can be checked without building them.

Each image must end as a non-root user whose uid is the one the pods' security context asks for,
start something (ENTRYPOINT/CMD in exec form), build from a pinned base, copy only paths that
exist, and import at build time only modules that exist — so a renamed module or a moved file
fails here rather than in a registry build.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kubetune.builders.common import NON_ROOT_UID
from kubetune.devcluster import images

REPO = Path(__file__).resolve().parents[2]
IMAGES = ("operator", "trainer", "triton")


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""

    instructions: list[tuple[str, str]] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        parsed = cls()
        logical = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            logical += line[:-1] + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            keyword, _, rest = logical.partition(" ")
            parsed.instructions.append((keyword.upper(), rest.strip()))
            if keyword.upper() == "ARG" and "=" in rest:
                name, _, value = rest.strip().partition("=")
                parsed.args[name] = value
            logical = ""
        assert not logical, "the Dockerfile ends inside a continued line"
        return parsed

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} instruction"
        return found[-1]


def dockerfile(image: str) -> Dockerfile:
    return Dockerfile.parse((REPO / "images" / image / "Dockerfile").read_text())


@pytest.mark.parametrize("image", IMAGES)
def test_the_image_runs_as_the_pods_non_root_uid(image: str) -> None:
    user = dockerfile(image).last("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit(), f"USER {user!r} must be numeric"
    assert int(uid) == NON_ROOT_UID != 0
    assert not gid or int(gid) == NON_ROOT_UID


@pytest.mark.parametrize("image", IMAGES)
def test_the_image_starts_something_in_exec_form(image: str) -> None:
    parsed = dockerfile(image)
    for keyword in ("ENTRYPOINT", "CMD"):
        command = json.loads(parsed.last(keyword))  # shell form is not JSON: signals would be lost
        assert isinstance(command, list) and command and all(isinstance(a, str) for a in command)


@pytest.mark.parametrize("image", IMAGES)
def test_the_base_image_is_pinned(image: str) -> None:
    parsed = dockerfile(image)
    # Every stage (a build stage and the final one) starts from the pinned BASE_IMAGE default.
    for base in parsed.all("FROM"):
        ref = re.sub(r"\$\{(\w+)\}", lambda m: parsed.args[m.group(1)], base.split()[0])
        name, _, tag = ref.rpartition(":")
        assert name and "/" not in tag, f"{ref} has no tag"
        assert tag != "latest"


@pytest.mark.parametrize("image", IMAGES)
def test_copied_paths_exist_in_the_build_context(image: str) -> None:
    # Copies out of an earlier stage (COPY --from=build) are not from the context.
    copies = [c for c in dockerfile(image).all("COPY") if not c.startswith("--from=")]
    assert copies
    for copy in copies:
        *sources, _dest = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository root"


@pytest.mark.parametrize("image", IMAGES)
def test_build_time_imports_name_existing_modules(image: str) -> None:
    imported: list[str] = []
    for run in dockerfile(image).all("RUN"):
        for statement in re.findall(r'-c "import ([^";]+)', run):
            imported.extend(name.strip() for name in statement.split(","))
    kubetune = [name for name in imported if name.startswith("kubetune")]
    assert kubetune, "each image checks at build time that its kubetune entry points import"
    for module in kubetune:
        path = REPO / "operator" / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module


def test_the_chart_runs_the_operator_as_the_images_uid() -> None:
    values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    uid = int(dockerfile("operator").last("USER").partition(":")[0])
    assert values["podSecurityContext"]["runAsUser"] == uid
    assert values["podSecurityContext"]["runAsNonRoot"] is True


def test_the_previous_version_of_an_image_is_kept_and_older_ones_are_stale(tmp_path: Path) -> None:
    """Another run on this machine may still load the version before this build's."""
    archives = [tmp_path / f"trainer-{key}.tar" for key in ("a", "b", "c", "d")]
    for age, path in enumerate(archives):
        path.write_bytes(b"")
        os.utime(path, (1000.0 + age, 1000.0 + age))  # a oldest, d newest
    built = tmp_path / "trainer-new.tar"
    built.write_bytes(b"")
    # d is kept (another run may load it); c, b and a go, newest first.
    assert images.stale_archives(built, [*archives, built]) == archives[2::-1]


def test_hidden_folders_under_the_package_are_no_image_input() -> None:
    """`make lint` writes import-linter's cache into operator/: it must not change the keys."""
    hidden = REPO / "operator" / f".cache-{os.getpid()}"
    hidden.mkdir()
    try:
        (hidden / "data.json").write_text("{}")
        spec = images.ImageSpec(
            "operator", inputs=images.PACKAGE_INPUTS, exclude=images.PACKAGE_EXCLUDE
        )
        names = [name for name, _ in spec.files()]
        assert names and not [n for n in names if "/." in f"/{n}"]
    finally:
        (hidden / "data.json").unlink()
        hidden.rmdir()
