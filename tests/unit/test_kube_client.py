"""kube.Kube.from_environment: one pooled connection per handler thread, so that no thread that
finds the pool empty opens (and then drops) a connection of its own."""

from __future__ import annotations

from pathlib import Path

import yaml

from kubetune.kube import POOL_SIZE, Kube


def _kubeconfig(path: Path) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return str(path)


def test_the_pool_holds_a_connection_for_every_handler_thread(tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path / "kubeconfig")
    many = Kube.from_environment(config, threads=POOL_SIZE * 2)
    assert many.api_client.configuration.connection_pool_maxsize == POOL_SIZE * 2
    few = Kube.from_environment(config, threads=4)
    assert few.api_client.configuration.connection_pool_maxsize == POOL_SIZE
