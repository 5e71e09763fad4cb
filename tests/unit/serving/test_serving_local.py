"""The launcher's environment preparation, and the smoke test's behaviour without a server."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from kubetune.serving import local
from kubetune.serving.smoketest import smoke_test


def test_the_wheel_carries_a_server_and_a_stub_for_this_python() -> None:
    dist = local.find_distribution()
    assert os.access(dist.server, os.X_OK)
    assert dist.stub(local.python_version()).is_file()
    assert dist.libs_dir.is_dir()


def test_stub_environment_puts_the_numpy_overlay_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run Python the way the stub does (isolated, found on PATH as `python3`): the overlay's
    numpy must win over the venv's, and the venv's packages must still import."""
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    overlay = tmp_path / "overlay"
    (overlay / "numpy").mkdir(parents=True)
    (overlay / "numpy" / "__init__.py").write_text("__version__ = 'from-the-overlay'\n")
    bin_dir = local.prepare_stub_environment(overlay)
    assert bin_dir.is_relative_to(tmp_path / "cache" / "triton")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    probe = "import numpy, pytest, sys; print(numpy.__version__); print(sys.prefix)"
    result = subprocess.run(
        ["python3", "-I", "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    version, prefix = result.stdout.split()
    assert version == "from-the-overlay"
    assert Path(prefix) == bin_dir.parent
    # Prepared once, then reused.
    assert local.prepare_stub_environment(overlay) == bin_dir


def test_server_environment_library_and_program_paths(tmp_path: Path) -> None:
    dist = local.find_distribution()
    base = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "PYTHONPATH": "/elsewhere"}
    env = local.server_environment(dist, tmp_path / "bin", base)
    libdir = sysconfig.get_config_var("LIBDIR")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, str(dist.libs_dir), "/opt/lib"]
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert "PYTHONPATH" not in env
    assert env["HF_HUB_OFFLINE"] == "1"


def test_missing_repository_is_reported(tmp_path: Path) -> None:
    with pytest.raises(local.TritonError, match="does not exist"):
        local.start_triton(tmp_path / "nowhere")


def test_smoke_test_reports_an_unreachable_server() -> None:
    [port] = local.free_ports(1)
    result = smoke_test(f"http://127.0.0.1:{port}", "intents", "hello", None, timeout=2)
    assert not result.ok
    assert result.error is not None
    assert "cannot reach Triton" in result.error
    assert "failed" in result.message


def test_smoke_test_module_does_not_import_torch() -> None:
    """The operator imports it; torch must stay out of the operator's process."""
    code = "import sys, kubetune.serving.smoketest; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(local.__file__).parents[2])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
