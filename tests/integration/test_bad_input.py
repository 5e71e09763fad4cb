"""Bad input, generated: property-based specs against the real API server with the CRDs installed.

- Every spec the typed API refuses (one thing broken in a full, valid spec: a type, a bound, a
  length, a pattern, an enum, a list size, a required or an unknown field, or a CEL rule) is
  refused by the API server too, with a message that names the field. The operator runs
  meanwhile and must not crash (its fixture checks its log), and nothing is created.
- Every spec the API server accepts builds children it accepts too, and pods that Pod Security
  "restricted" admits: what passes `kubectl apply` never ends as a half-built set of children.

All requests are server-side dry runs with strict field validation (what `kubectl apply` sends),
so a thousand of them cost seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import urllib3
from hypothesis import given, reject
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from tests.cluster_fixtures import OperatorProcess
from tests.tools.specs import Broken, cel_breaks, children, examples, invalid_specs, valid_specs

pytestmark = pytest.mark.cluster

PLURALS = {"FineTuneJob": "finetunejobs", "ModelServer": "modelservers"}
EXAMPLES_PER_KIND = 520
VALID_EXAMPLES_PER_KIND = 150
DEADLINE_SECONDS = 20  # a dry run takes milliseconds; the server's own deadline is 60 s
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


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

    @examples(EXAMPLES_PER_KIND)
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


def _dry_run(api: dynamic.DynamicClient, namespace: str, obj: dict[str, Any]) -> str | None:
    """None when the API server would create `obj` in `namespace`, else its message. An
    overloaded server's 429/503 answers are asked again (they judge nothing); a request that
    runs into the server's deadline (504) is a finding, not load: it is what a child with a
    quantity of "1e2147483647" does to the API server, on every retry of the operator."""
    resource = api.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    for _ in range(5):
        try:
            resource.create(
                body=obj,
                namespace=namespace,
                query_params=[("dryRun", "All"), ("fieldValidation", "Strict")],
                _request_timeout=DEADLINE_SECONDS,
            )
        except ApiException as err:
            if err.status in (429, 503):
                continue
            return f"{obj['kind']}: {json.loads(err.body)['message']}"
        except urllib3.exceptions.TimeoutError:
            return f"{obj['kind']}: no answer in {DEADLINE_SECONDS}s"
        return None
    raise AssertionError(f"the API server was overloaded for {obj['kind']} {obj['metadata']}")


def _as_pod(template: dict[str, Any]) -> dict[str, Any]:
    """The pod a controller would create from the template. Its ServiceAccount and
    PriorityClass are dropped: admission looks them up, and the dry run created neither."""
    spec = {k: v for k, v in template["spec"].items() if k not in ("serviceAccountName",)}
    spec.pop("priorityClassName", None)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "generated", "labels": template["metadata"].get("labels", {})},
        "spec": spec,
    }


@pytest.mark.parametrize("kind", sorted(PLURALS))
def test_every_spec_the_api_server_accepts_builds_children_it_accepts(
    kind: str, api_client: client.ApiClient, namespace: str, crds: None
) -> None:
    core = client.CoreV1Api(api_client)
    core.patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})
    api = dynamic.DynamicClient(api_client)
    accepted = Counter[str]()

    @examples(VALID_EXAMPLES_PER_KIND)
    @given(valid_specs(kind))
    def builds(spec: dict[str, Any]) -> None:
        body = {"apiVersion": "kubetune.io/v1alpha1", "kind": kind, "metadata": {"name": "x"}}
        if _dry_run(api, namespace, {**body, "spec": spec}) is not None:
            reject()  # refused at apply time: the first test's business
        accepted[json.dumps(spec, sort_keys=True)] += 1
        built = children(kind, spec, namespace)
        refused = [_dry_run(api, namespace, _unowned(c)) for c in built]
        refused += [
            _dry_run(api, namespace, _as_pod(c["spec"]["template"]))
            for c in built
            if "template" in c.get("spec", {})
        ]
        assert [message for message in refused if message] == []

    builds()
    assert len(accepted) >= VALID_EXAMPLES_PER_KIND // 2


def _unowned(obj: dict[str, Any]) -> dict[str, Any]:
    """A child without its owner reference (the owner is not created by a dry run)."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}
    return {**obj, "metadata": meta}
