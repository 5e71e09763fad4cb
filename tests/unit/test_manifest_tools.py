"""Every manifest kubetune generates, judged by tools no one here wrote.

- kube-score (github.com/zegl/kube-score) on the children of every golden case (what the
  builders produce for one resource, scored together, so a Service is matched with its pods) and
  on `helm template` of the chart: no CRITICAL finding that is not in ACCEPTED, with its reason.
- kubeconform (github.com/yannh/kubeconform), strictly, against the cluster version's schemas
  (from the kubernetes-validate wheel) and the project's CRDs (converted by kubeconform's own
  script): the generated children, the chart, the golden inputs and the examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.devcluster.binaries import ensure_binaries
from tests.tools.helm import Helm
from tests.tools.manifests import Finding, Kubeconform, kube_score, kubeconform_for

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "unit" / "golden"
EXAMPLES = REPO / "examples"

# The CRITICAL findings kubetune accepts, as "check Kind name container" (shell wildcards; "-" is
# the pod or object as a whole; " | " between alternatives), each with why. An entry that no
# longer matches anything fails the test too, so the list shrinks when a finding is fixed.
ACCEPTED = {
    # -- the children the builders generate
    "container-image-pull-policy * * *": (
        "Images are versioned tags (the operator's settings, spec.image, spec.triton.image, the "
        "chart's image.tag), so IfNotPresent pulls each version once; Always would make every "
        "pod start depend on a registry round trip and break clusters that preload images "
        "(air-gapped GPU clusters, the dev cluster's real node). "
        "The chart's image.pullPolicy can say Always."
    ),
    "container-ephemeral-storage-request-and-limit Job *-train trainer": (
        "Scratch use (the Hugging Face cache, downloads) scales with the model, which the spec "
        "does not size; a fixed ephemeral-storage limit would evict large models mid-run. The "
        "memory-backed /dev/shm carries a sizeLimit from the spec."
    ),
    "container-ephemeral-storage-request-and-limit Deployment * fetch-model": (
        "The fetched Triton model repository is as large as the model, which the spec does not "
        "size; a fixed limit would evict large models."
    ),
    "container-ephemeral-storage-request-and-limit Deployment * triton": (
        "Triton reads the fetched repository (above) and writes only /tmp; the pod's limit "
        "would have to cover the repository's emptyDir too."
    ),
    "container-security-context-user-group-id * * *": (
        "uid/gid 1000 is the user the images are built for (images/*/Dockerfile; NVIDIA's "
        "Triton base image ships triton-server as 1000; the chart's podSecurityContext can "
        "change the operator's). The pods run as non-root with every capability dropped and "
        "pass Pod Security 'restricted'; above 10000 means rebuilding the images."
    ),
    "pod-networkpolicy Job *-train -": (
        "kubetune generates no NetworkPolicy for training pods yet: workers reach each other on "
        "the rendezvous port and reach the API server, hubs and object stores the spec names "
        "(issue 12's network-policy item); the namespace's own policies apply."
    ),
    "pod-networkpolicy Deployment small - | pod-networkpolicy Deployment chat -": (
        "A ModelServer's NetworkPolicy is opt-in (spec.networkPolicy names the sources that may "
        "connect; ms-autoscaled has one), as its clients are unknown to the operator."
    ),
    "service-targets-pod Service *-workers -": (
        "The headless rendezvous Service selects batch.kubernetes.io/job-name, which the Job "
        "controller adds to the pods it creates; kube-score sees only the pod template."
    ),
    "container-resources Job tiny-train trainer": (
        "CPU and memory come from the spec (resources.cpu, resources.memory) and are set as "
        "requests and limits when given (ftj-lora-multinode); kubetune adds no defaults of its "
        "own, so a job without them gets the namespace's LimitRange."
    ),
    "container-resources Deployment small * | container-resources Deployment chat *": (
        "As for training: Triton's (and the fetcher's) CPU and memory are the spec's, set when "
        "given (ms-autoscaled sets both, ms-vllm-tp memory only)."
    ),
    # -- the chart
    "container-resources Deployment kt-kubetune operator": (
        "No CPU limit on purpose (values.yaml): the start-up burst, the first list of every "
        "watched kind, is not throttled; the CPU request and the memory limit are set."
    ),
    "pod-probes Deployment kt-kubetune -": (
        "The only Service selecting the operator is its metrics Service, which carries no "
        "traffic but Prometheus' scrapes, and those should reach every replica, the standbys "
        "too: a readiness probe would gate nothing. The liveness probe restarts a replica whose "
        "kopf health fails."
    ),
    "pod-networkpolicy Deployment kt-kubetune -": (
        "The operator only dials out (the API server, whose address differs per cluster) and "
        "serves its probes and metrics; the chart leaves policies to the cluster."
    ),
}


def golden_children() -> dict[str, list[dict[str, Any]]]:
    """The children of each golden case (the golden test proves the builders produce these)."""
    return {
        path.name.removesuffix(".expected.yaml"): list(yaml.safe_load_all(path.read_text()))
        for path in sorted(GOLDEN.glob("*.expected.yaml"))
    }


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    ensure_binaries()  # warm: nothing to do (make test builds the control plane first)
    return Helm.in_folder(tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def chart(helm: Helm) -> list[dict[str, Any]]:
    return helm.template()


@pytest.fixture(scope="module")
def kubeconform(tmp_path_factory: pytest.TempPathFactory) -> Kubeconform:
    return kubeconform_for(sorted((REPO / "crds").glob("*.yaml")), tmp_path_factory.mktemp("s"))


def test_kube_score_finds_nothing_critical_that_is_not_explained(
    chart: list[dict[str, Any]],
) -> None:
    sources = {**golden_children(), "chart": chart}
    findings: list[Finding] = []
    for docs in sources.values():
        findings += kube_score(docs)
    unexplained = [str(f) for f in findings if not any(f.matches(p) for p in ACCEPTED)]
    assert unexplained == []
    stale = [p for p in ACCEPTED if not any(f.matches(p) for f in findings)]
    assert stale == []


def test_kube_score_reports_a_critical_finding_when_a_manifest_has_one() -> None:
    """The pipeline above really reports: a privileged container is CRITICAL to kube-score."""
    (job,) = [d for d in golden_children()["ftj-lora-multinode"] if d["kind"] == "Job"]
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    findings = kube_score([job])
    privileged = [f for f in findings if f.check == "container-security-context-privileged"]
    assert [(f.kind, f.name, f.container) for f in privileged] == [
        ("Job", "intents-train", "trainer")
    ]
    assert not any(f.matches(p) for f in privileged for p in ACCEPTED)


def test_kubeconform_validates_children_chart_and_examples(
    kubeconform: Kubeconform, chart: list[dict[str, Any]]
) -> None:
    docs = [doc for children in golden_children().values() for doc in children] + chart
    for path in sorted(GOLDEN.glob("*.input.yaml")) + sorted(EXAMPLES.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    results = kubeconform.validate(docs)
    assert [
        f"{r['kind']} {r['name']}: {r.get('msg')}" for r in results if r["status"] != "statusValid"
    ] == []
    kinds = {r["kind"] for r in results}
    assert {"FineTuneJob", "ModelServer", "Job", "Deployment", "CustomResourceDefinition"} <= kinds
    assert len(results) == len(docs)


@pytest.mark.parametrize(
    ("kind", "field", "patch", "words"),
    [
        ("Job", "spec.completions", {"spec": {"completions": "two"}}, "completions"),
        (
            "Job",
            "spec.template.spec.unknownField",
            {"spec": {"template": {"spec": {"hostPid": True}}}},
            "hostPid",
        ),
        ("FineTuneJob", "spec.resources.nodes", {"spec": {"resources": {"nodes": 0}}}, "nodes"),
        ("FineTuneJob", "spec.task", {"spec": {"task": "regression"}}, "task"),
        ("FineTuneJob", "spec.output.bucket", {"spec": {"output": {"bucket": "x"}}}, "bucket"),
        (
            "ModelServer",
            "spec.service.httpPort",
            {"spec": {"service": {"httpPort": 70000}}},
            "httpPort",
        ),
    ],
)
def test_kubeconform_refuses_a_manifest_the_schemas_do_not_allow(
    kubeconform: Kubeconform, kind: str, field: str, patch: dict[str, Any], words: str
) -> None:
    """The schemas are really in use: one wrong field makes the manifest invalid, named."""
    sources = {
        "Job": golden_children()["ftj-lora-multinode"],
        "FineTuneJob": [yaml.safe_load((GOLDEN / "ftj-lora-multinode.input.yaml").read_text())],
        "ModelServer": [yaml.safe_load((GOLDEN / "ms-autoscaled.input.yaml").read_text())],
    }
    (doc,) = [d for d in sources[kind] if d["kind"] == kind]
    _merge(doc, patch)
    (result,) = kubeconform.validate([doc])
    assert result["status"] == "statusInvalid", (field, result)
    assert words in result["msg"], (field, result["msg"])


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
