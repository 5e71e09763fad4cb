"""Shared fixtures: one real local control plane per test session, one namespace per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from kubetune.devcluster.cluster import LocalCluster, running_cluster

pytest_plugins = ["tests.cluster_fixtures"]


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A fresh local cluster (real etcd, apiserver, controller-manager, scheduler) whose nodes
    kwok simulates: the control plane's behaviour at any scale. The tests whose pods really run
    use the session's real-node cluster (`real_node`, tests/cluster_fixtures.py)."""
    with running_cluster(f"pytest-{os.getpid()}") as local:
        yield local


@pytest.fixture(scope="session")
def api_client(cluster: LocalCluster) -> client.ApiClient:
    return config.new_client_from_config(str(cluster.kubeconfig))


@pytest.fixture
def namespace(api_client: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own, so tests never see each other's objects."""
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:6]}"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
