"""Bad input, generated: property-based specs against the real API server with the CRDs installed.

Every spec the typed API refuses (one thing broken in a full, valid spec: a type, a bound, a
length, a pattern, an enum, a list size, a required or an unknown field, or a CEL rule) is
refused by the API server too, with a message that names the field. The requests are
server-side dry runs with strict field validation (what `kubectl apply` sends), so a thousand
cost seconds; the operator runs meanwhile and must not crash (its fixture checks its log), and
nothing is created.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster_fixtures import OperatorProcess
from tests.tools.specs import Broken, cel_breaks, invalid_specs

pytestmark = pytest.mark.cluster

PLURALS = {"FineTuneJob": "finetunejobs", "ModelServer": "modelservers"}
EXAMPLES_PER_KIND = 600


def _refusal(api: client.CustomObjectsApi, namespace: str, broken: Broken) -> str:
    """The API server's message for a dry-run create of the broken spec (fails if accepted)."""
    with pytest.raises(ApiException) as refused:
        api.create_namespaced_custom_object(
            "kubetune.io",
            "v1alpha1",
            namespace,
            PLURALS[broken.kind],
            broken.body("bad"),
            dry_run="All",
            field_validation="Strict",
        )
    # 400: strict decoding (an unknown field); 422: schema and CEL validation.
    assert refused.value.status in (400, 422), (broken.what, refused.value.body)
    return str(json.loads(refused.value.body)["message"])


@pytest.mark.parametrize("kind", sorted(PLURALS))
def test_every_spec_the_model_refuses_is_refused_by_the_api_server_naming_the_field(
    kind: str, api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    api = client.CustomObjectsApi(api_client)
    tried: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES_PER_KIND,
        deadline=None,
        database=None,
        derandomize=True,  # the same specs on every run: CI failures reproduce
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(invalid_specs(kind))
    def refused(broken: Broken) -> None:
        message = _refusal(api, namespace, broken)
        assert broken.field in message, (broken.what, message)
        tried[json.dumps(broken.spec, sort_keys=True)] += 1

    refused()
    for broken in cel_breaks(kind):
        message = _refusal(api, namespace, broken)
        assert broken.field in message, (broken.what, message)
        tried[json.dumps(broken.spec, sort_keys=True)] += 1
    print(f"{kind}: {len(tried)} distinct invalid specs refused")
    assert len(tried) >= 500
    # Nothing was created, and the operator is still there.
    objects: dict[str, Any] = api.list_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, PLURALS[kind]
    )
    assert objects["items"] == []
    assert operator.alive()
