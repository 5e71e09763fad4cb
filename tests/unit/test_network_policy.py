"""A ModelServer's NetworkPolicy admits the sources its spec names and nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api.v1alpha1 import ModelServer
from kubetune.builders.common import Owner, Settings
from kubetune.builders.serving import build_network_policy


def _body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "x", "namespace": "ml", "uid": "u"},
        "spec": {"model": {"source": "pvc://m/r"}, **spec},
    }


def policy(settings: Settings | None = None, **network: Any) -> dict[str, Any] | None:
    body = _body(networkPolicy=network)
    return build_network_policy(
        ModelServer.model_validate(body), Owner.from_body(body), settings or Settings()
    )


def test_no_policy_unless_asked() -> None:
    body = _body()
    ms = ModelServer.model_validate(body)
    assert build_network_policy(ms, Owner.from_body(body), Settings()) is None


def test_each_named_source_is_one_peer_on_the_serving_ports_only() -> None:
    built = policy(
        sources=[
            {"namespace": "apps", "podLabels": {"app": "web"}},
            {"namespaceLabels": {"team": "search"}},
            {"podLabels": {"role": "gateway"}},
        ]
    )
    assert built is not None
    spec = built["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/modelserver": "x"}
    }
    (rule,) = spec["ingress"]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}},
            "podSelector": {"matchLabels": {"app": "web"}},
        },
        {"namespaceSelector": {"matchLabels": {"team": "search"}}},
        {"podSelector": {"matchLabels": {"role": "gateway"}}},  # the ModelServer's namespace
    ]
    assert [p["port"] for p in rule["ports"]] == [8000, 8001, 8002]


def test_no_source_admits_nobody_but_the_operator_on_the_http_port() -> None:
    built = policy()
    assert built is not None and built["spec"]["ingress"] == []  # deny all
    in_cluster = policy(Settings(operator_namespace="kubetune-system"))
    assert in_cluster is not None
    assert in_cluster["spec"]["ingress"] == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "kubetune-system"}
                    }
                }
            ],
            "ports": [{"port": 8000, "protocol": "TCP"}],
        }
    ]


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"namespace": "Not_A_Name"}, "namespace"),
        ({"podLabels": {"app": "bad value"}}, "podLabels"),
        ({"pods": {"app": "web"}}, "pods"),
    ],
)
def test_a_source_the_model_refuses_names_the_field(source: dict[str, Any], field: str) -> None:
    """Patterns and unknown keys; the CEL-only rules (a source naming nothing, namespace with
    namespaceLabels) are broken against the API server by test_bad_input (specs.CEL_BREAKS)."""
    with pytest.raises(ValidationError) as err:
        policy(sources=[source])
    (error,) = err.value.errors()
    assert error["loc"][:5] == ("spec", "networkPolicy", "sources", 0, field)
