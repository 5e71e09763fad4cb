"""builders.drift: a child is written only when the live object differs from the desired one."""

from __future__ import annotations

import copy
from typing import Any

from kubetune.builders.drift import differs

DESIRED: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "s", "namespace": "ns", "labels": {"a": "1"}},
    "spec": {
        "clusterIP": "None",
        "ports": [{"name": "rdzv", "port": 29500}],
        "selector": {"a": "1"},
        "template": {"resources": {"limits": {"cpu": "0.5", "memory": "1Gi"}}, "volumes": {}},
    },
}


def _live() -> dict[str, Any]:
    live = copy.deepcopy(DESIRED)
    live["metadata"] |= {"uid": "u", "resourceVersion": "7", "labels": {"a": "1", "extra": "x"}}
    live["spec"]["ports"][0]["protocol"] = "TCP"  # a server default
    live["spec"]["template"]["resources"]["limits"] = {"cpu": "500m", "memory": "1Gi"}
    del live["spec"]["template"]["volumes"]  # an empty map the server drops
    live["status"] = {"loadBalancer": {}}
    return live


def test_defaults_extra_fields_and_equal_quantities_are_no_difference() -> None:
    assert not differs(DESIRED, _live())


def test_a_changed_or_missing_field_or_list_item_is_a_difference() -> None:
    edited = _live()
    edited["spec"]["selector"]["a"] = "2"
    assert differs(DESIRED, edited)
    dropped = _live()
    del dropped["metadata"]["labels"]["a"]
    assert differs(DESIRED, dropped)
    more_ports = _live()
    more_ports["spec"]["ports"].append({"name": "other", "port": 1})
    assert differs(DESIRED, more_ports)
    bigger = _live()
    bigger["spec"]["template"]["resources"]["limits"]["memory"] = "2Gi"
    assert differs(DESIRED, bigger)


def test_types_are_not_confused() -> None:
    assert differs({"port": 8000}, {"port": "8000"})
    assert differs({"flag": True}, {"flag": "true"})
    assert differs({"name": "abc"}, {"name": "abd"})
