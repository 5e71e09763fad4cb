"""The real trainer, end to end: accuracy, LoRA, DDP under torchrun, preemption and resume,
bad data, and status reports to a real API server.

Every run is `python -m kubetune.trainer` as a subprocess on the shipped MiniLM checkpoint, as in
a training pod. The slow paths use small subsets of the shipped dataset (1 epoch, 32 tokens).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from kubernetes import client
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from kubetune.api.v1alpha1.finetunejob import DatasetSpec, Progress
from kubetune.api.v1alpha1.trainerconfig import JobRef
from kubetune.devcluster.cluster import LocalCluster
from kubetune.serving.repository import sha256_file
from kubetune.trainer import data
from kubetune.trainer.errors import ExitCode
from kubetune.trainer.reporting import FIELD_MANAGER, StatusWriter

# The harness and run types live in tests/e2e/conftest.py and arrive through fixtures.
TrainerHarness = TrainedClassifier = TrainerRun = Any

DATASET = Path(__file__).resolve().parents[2] / "examples" / "data" / "support-intents.jsonl"

# Six intents: chance is 1/6. Both bars are far above it and below what was measured.
ACCURACY_BAR = 0.9  # the full fine-tune on the held-out 20% (measured: 0.99)
LORA_ACCURACY_BAR = 0.8  # 2 epochs of rank-8 adapters (measured: 0.98)


def subset(path: Path, count: int) -> Path:
    """The first `count` rows of the shipped dataset (it is shuffled, so every intent is in)."""
    lines = DATASET.read_text(encoding="utf-8").splitlines()[:count]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def progress_steps(run: TrainerRun) -> list[int]:
    return [e["step"] for e in run.of("progress")]


def heldout_accuracy(model_dir: Path, max_length: int, seed: int = 42, split: float = 0.2) -> float:
    """Accuracy of an exported model, loaded with plain transformers, on the trainer's own
    validation split (recomputed from the seed), cut at the run's `maxSeqLength` as the
    trainer's evaluation was."""
    table = data.read_table(DATASET, data.detect_format(DATASET, None))
    classes = data.classification_data(table, DatasetSpec(source="pvc://d/x.jsonl"))
    _, val = data.split_indices(len(table.rows), classes.label_ids, split, seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    texts = [classes.texts[i] for i in val]
    with torch.no_grad():
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        predicted = model(**batch).logits.argmax(-1).tolist()
    names = [model.config.id2label[p] for p in predicted]
    truth = [classes.labels[classes.label_ids[i]] for i in val]
    return sum(n == t for n, t in zip(names, truth, strict=True)) / len(val)


# ---------------------------------------------------------------------------- the real fine-tune


def test_full_finetune_reaches_high_accuracy(trained_classifier: TrainedClassifier) -> None:
    metrics = trained_classifier.metrics
    assert metrics["accuracy"] >= ACCURACY_BAR, metrics
    assert metrics["macro_f1"] >= ACCURACY_BAR - 0.05, metrics
    events = trained_classifier.events
    [started] = [e for e in events if e["event"] == "started"]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert started["totalSteps"] == 3 * math.ceil(started["trainExamples"] / 16)
    assert steps == list(range(1, started["totalSteps"] + 1))
    losses = [e["loss"] for e in events if e["event"] == "progress"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # the loss really went down
    assert len([e for e in events if e["event"] == "eval"]) == 3  # once per epoch
    last = [e for e in events if e["event"] == "progress"][-1]
    assert last["percent"] == 100
    assert last["etaSeconds"] == 0
    assert last["samplesPerSecond"] > 0


def test_export_is_a_plain_checkpoint_with_label_map_and_metadata(
    trained_classifier: TrainedClassifier,
) -> None:
    out = trained_classifier.output_dir
    config = json.loads((out / "config.json").read_text())
    labels = trained_classifier.labels
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert config["label2id"] == {name: i for i, name in enumerate(labels)}
    meta = json.loads((out / "kubetune-model.json").read_text())
    assert meta["task"] == "sequence-classification"
    assert meta["labels"] == labels
    assert meta["metrics"] == trained_classifier.metrics
    assert meta["weightsSha256"] == "sha256:" + sha256_file(out / "model.safetensors")
    assert (trained_classifier.triton_repository / "support-intents" / "config.pbtxt").is_file()
    # The exported model, loaded by plain transformers, scores what the trainer reported.
    assert heldout_accuracy(out, 64) == pytest.approx(trained_classifier.metrics["accuracy"])


# ---------------------------------------------------------------------------- LoRA


def test_lora_learns_and_its_merged_export_loads_without_peft(
    trainer: TrainerHarness, tmp_path: Path
) -> None:
    config = trainer.write_config(
        tmp_path,
        DATASET,
        {
            "method": "lora",
            "lora": {"rank": 8, "alpha": 16, "merge": True},
            "hyperparameters": {
                "learningRate": 5e-3,
                "warmupRatio": 0.1,
                "maxSeqLength": 32,
                "epochs": 2,
                # fp32 so that "merged reproduces the adapter" is exact on every CPU: with
                # auto, a CPU with native bf16 (AVX512-BF16, AMX) loads the base in bf16, and
                # merging rounds W + BA to bf16, which flipped one near-tie of 108 (0.963 vs
                # 0.972) on an EPYC. bf16 LoRA is covered by the QLoRA tests below.
                "precision": "fp32",
            },
        },
        # A job to report to, but no API server: it must warn and train on.
        job={"name": "lora-run", "namespace": "default"},
        reporting={"toApiServer": True},
    )
    run = trainer.run(config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any("no API server" in e["message"] for e in run.of("warning"))
    losses = [e["loss"] for e in run.of("progress")]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert run.metrics["accuracy"] >= LORA_ACCURACY_BAR, run.metrics
    out = run.output_dir
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "kubetune-model.json").read_text())["loraMerged"] is True
    # Merged weights reproduce the adapter model's own evaluation.
    assert heldout_accuracy(out, 32) == pytest.approx(run.metrics["accuracy"])


# ---------------------------------------------------------------------------- causal LM


def tiny_gpt2(
    folder: Path, tokenizer_dir: Path, width: int = 32, layers: int = 2, positions: int = 64
) -> Path:
    """A 2-layer GPT-2 with random weights and the MiniLM tokenizer: a real causal LM that
    trains in seconds (nothing is downloaded)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=2 if width < 256 else 4,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def intent_pairs(path: Path, rows: int = 160) -> Path:
    """The first `rows` utterances as prompts, their intent's name as the answer (JSON lines)."""
    lines = DATASET.read_text(encoding="utf-8").splitlines()[:rows]
    pairs = [json.loads(line) for line in lines]
    path.write_text(
        "".join(json.dumps({"prompt": r["text"], "answer": r["label"]}) + "\n" for r in pairs),
        encoding="utf-8",
    )
    return path


def causal_config(
    trainer: TrainerHarness, tmp_path: Path, spec: dict[str, Any], width: int = 32
) -> Path:
    """Intent names as responses to the utterances: a prompt/response causal-LM task."""
    dataset = intent_pairs(tmp_path / "pairs.jsonl")
    base = {
        "task": "causal-lm",
        "dataset": {"textField": "prompt", "labelField": "answer"},
        "hyperparameters": {"epochs": 2, "batchSize": 8},
        "output": {"triton": True},
    }
    config = trainer.write_config(
        tmp_path, dataset, deep_merge(base, spec), job={"name": "intent-writer", "namespace": "x"}
    )
    raw = json.loads(config.read_text())
    raw["paths"]["model"] = str(tiny_gpt2(tmp_path / "gpt2", trainer.model_dir, width))
    config.write_text(json.dumps(raw))
    return config


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        is_dict = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if is_dict else value
    return merged


def test_causal_lm_learns_the_responses(trainer: TrainerHarness, tmp_path: Path) -> None:
    """Full fine-tune of a causal LM on prompt/response pairs; loss only on the responses."""
    run = trainer.run(causal_config(trainer, tmp_path, {"hyperparameters": {"learningRate": 5e-3}}))
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [e["loss"] for e in run.of("progress")]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    metrics = run.metrics
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["perplexity"] < 0.1 * 30522  # far below a uniform guess over the vocabulary
    meta = json.loads((run.output_dir / "kubetune-model.json").read_text())
    assert meta["task"] == "causal-lm"
    assert meta["labels"] is None
    pbtxt = run.output_dir / "triton-repository" / "intent-writer" / "config.pbtxt"
    assert "GENERATED_TEXT" in pbtxt.read_text()


def test_unmerged_adapter_stays_an_adapter_and_triton_gets_a_merged_copy(
    trainer: TrainerHarness, tmp_path: Path
) -> None:
    """spec.lora.merge false: the output holds the adapter; the serving side never imports
    peft, so the Triton repository gets a merged copy that plain transformers loads."""
    spec = {
        "method": "lora",
        "lora": {"rank": 4, "alpha": 8, "merge": False},
        "hyperparameters": {"learningRate": 1e-2, "epochs": 1},
    }
    run = trainer.run(causal_config(trainer, tmp_path, spec))
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.output_dir
    assert (out / "adapter_config.json").is_file()
    meta = json.loads((out / "kubetune-model.json").read_text())
    assert (meta["loraMerged"], meta["servable"]) == (False, False)
    assert meta["weights"][0]["file"].startswith("adapter_model")
    served = out / "triton-repository" / "intent-writer" / "1" / "hf"
    assert not (served / "adapter_config.json").exists()
    assert not (out / ".merged-for-triton").exists()
    model = AutoModelForCausalLM.from_pretrained(served)
    assert isinstance(model, GPT2LMHeadModel)


# ---------------------------------------------------------------------------- DDP


def test_two_processes_under_torchrun_agree_on_global_batch_steps(
    trainer: TrainerHarness, tmp_path: Path
) -> None:
    """batch_size is per process: 2 processes take ceil(n / (8 x 2)) steps per epoch."""
    config = trainer.write_config(
        tmp_path,
        subset(tmp_path / "train.jsonl", 150),
        {"hyperparameters": {"batchSize": 8, "epochs": 2, "learningRate": 1e-4}},
    )
    run = trainer.run(config, nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    started = sorted(run.of("started"), key=lambda e: e["rank"])
    assert [e["rank"] for e in started] == [0, 1]
    n_train = started[0]["trainExamples"]
    expected = math.ceil(n_train / (8 * 2)) * 2
    assert {e["totalSteps"] for e in started} == {expected}
    assert {e["globalBatch"] for e in started} == {16}
    finished = run.of("finished")
    assert sorted(e["rank"] for e in finished) == [0, 1]
    assert {(e["step"], e["totalSteps"]) for e in finished} == {(expected, expected)}
    assert progress_steps(run) == list(range(1, expected + 1))  # rank 0 alone reports
    assert len(run.of("exported")) == 1  # and exports
    assert (run.output_dir / "kubetune-model.json").is_file()


# ---------------------------------------------------------------------------- preemption, resume


def test_kill_preempt_and_resume_finish_like_an_uninterrupted_run(
    trainer: TrainerHarness, tmp_path: Path
) -> None:
    """SIGKILL after a periodic checkpoint, then SIGTERM (which checkpoints), then a clean
    finish: each restart resumes right after the saved step, and the run ends with the same
    step count and the same weights as one that was never interrupted."""
    dataset = subset(tmp_path / "train.jsonl", 150)  # 120 for training: 15 steps of 8
    spec = {
        "hyperparameters": {"batchSize": 8, "learningRate": 1e-4},
        "checkpointing": {"enabled": True, "everySteps": 4, "keepLast": 2},
    }
    # The reference writes no checkpoints: writing them must not change the training either.
    plain = {**spec, "checkpointing": {"enabled": False}}
    reference = trainer.run(trainer.write_config(tmp_path / "reference", dataset, plain))
    assert reference.returncode == 0, reference.stderr[-3000:]
    total = reference.of("started")[0]["totalSteps"]
    config = trainer.write_config(tmp_path / "interrupted", dataset, spec)

    # 1. SIGKILL once a periodic checkpoint exists: whatever was in flight is lost.
    proc = trainer.start(config)
    seen = trainer.read_until(proc, lambda e: e["event"] == "checkpoint" and e["step"] >= 4)
    proc.kill()
    killed = trainer.finish(proc, config, seen)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in killed.checkpoints_dir.glob("step-*"))
    saved = int(checkpoints[-1].removeprefix("step-"))

    # 2. Restart: resumes after the last complete checkpoint; SIGTERM mid-way checkpoints.
    proc = trainer.start(config)
    seen = trainer.read_until(proc, lambda e: e["event"] == "progress" and e["step"] >= saved + 3)
    proc.send_signal(signal.SIGTERM)
    preempted = trainer.finish(proc, config, seen)
    assert preempted.of("resumed")[0]["step"] == saved
    assert progress_steps(preempted)[0] == saved + 1
    assert preempted.returncode == ExitCode.PREEMPTED, preempted.stderr[-3000:]
    [stop] = preempted.of("preempted")
    stopped_at = preempted.of("checkpoint")[-1]["step"]
    assert saved + 3 <= stopped_at < total
    assert preempted.termination_log.read_text().startswith("Preempted: stopped by SIGTERM")
    assert f"step {stopped_at}/{total}" in stop["message"]

    # 3. Restart again: resumes at the SIGTERM checkpoint and finishes.
    resumed = trainer.run(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.of("resumed")[0]["step"] == stopped_at
    assert progress_steps(resumed) == list(range(stopped_at + 1, total + 1))
    assert resumed.of("finished")[0]["totalSteps"] == total
    assert resumed.of("finished")[0]["step"] == total
    assert len(list(resumed.checkpoints_dir.glob("step-*"))) == 2  # keepLast

    # Exact data position, optimizer and RNG restore: bit-identical weights to the run that was
    # never interrupted (same machine, same threads: CPU kernels are deterministic here).
    ref_meta = json.loads((reference.output_dir / "kubetune-model.json").read_text())
    new_meta = json.loads((resumed.output_dir / "kubetune-model.json").read_text())
    assert new_meta["weightsSha256"] == ref_meta["weightsSha256"]
    assert resumed.metrics == reference.metrics
    assert new_meta["trainedSteps"] == ref_meta["trainedSteps"] == total

    # 4. A restart whose data grew a label the checkpoint does not know fails before training.
    with dataset.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "where do I leave feedback", "label": "feedback"}) + "\n")
    grown = trainer.run(config)
    assert grown.returncode == ExitCode.BAD_DATA
    [failed] = grown.of("failed")
    assert "unknown label 'feedback'" in failed["message"]
    assert str(dataset) in failed["message"]
    assert not grown.of("progress")


# ---------------------------------------------------------------------------- bad input


BAD_DATA = {
    "missing-label": (
        '{"text": "hi", "label": "a"}\n{"text": "no label"}\n',
        ["field 'label' (spec.dataset.labelField) is missing", "line 2 of"],
    ),
    "empty-file": ("", ["has no rows"]),
    "malformed-line": (
        '{"text": "hi", "label": "a"}\n{"text": "broken", "label": \n',
        ["line 2 of", "is not valid JSON"],
    ),
    "unusable-label": (
        '{"text": "hi", "label": "a"}\n{"text": "x", "label": null}\n',
        ["line 2 of", "unusable label None"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_fails_before_training_naming_field_and_file(
    trainer: TrainerHarness, tmp_path: Path, case: str
) -> None:
    content, phrases = BAD_DATA[case]
    dataset = tmp_path / f"{case}.jsonl"
    dataset.write_text(content, encoding="utf-8")
    run = trainer.run(trainer.write_config(tmp_path, dataset))
    assert run.returncode == ExitCode.BAD_DATA, run.stderr[-2000:]
    [failed] = run.of("failed")
    assert failed["reason"] == "BadData"
    for phrase in [str(dataset), *phrases]:
        assert phrase in failed["message"]
    first_line = run.termination_log.read_text().splitlines()[0]
    assert first_line == f"BadData: {failed['message']}"
    assert not run.of("started")  # nothing was trained
    assert not run.output_dir.exists()


def test_missing_model_is_model_not_found(trainer: TrainerHarness, tmp_path: Path) -> None:
    config = trainer.write_config(tmp_path, subset(tmp_path / "d.jsonl", 20))
    raw = json.loads(config.read_text())
    raw["paths"]["model"] = str(tmp_path / "no-such-model")
    config.write_text(json.dumps(raw))
    run = trainer.run(config)
    assert run.returncode == ExitCode.MODEL_NOT_FOUND
    assert run.termination_log.read_text().startswith(
        f"ModelNotFound: model folder {tmp_path / 'no-such-model'} (paths.model) does not exist"
    )


# ---------------------------------------------------------------------------- status reporting


GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
TRAINER_STATUS_FIELDS = {"f:progress", "f:lastCheckpoint", "f:output"}


@pytest.fixture
def finetunejobs(api_client: client.ApiClient, crds: None) -> client.CustomObjectsApi:
    """FineTuneJobs on the real local API server (the session's CRDs, see tests/cluster_fixtures).

    The operator may be running (an earlier test of the session started it): the jobs made here
    are suspended so it starts no pods, and assertions never depend on what it writes.
    """
    return client.CustomObjectsApi(api_client)


def create_suspended_job(api: client.CustomObjectsApi, namespace: str, name: str) -> str:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/minilm"},
            "dataset": {"source": "pvc://datasets/train.jsonl"},
            "output": {"uri": "pvc://models/out"},
            "runPolicy": {"suspend": True},
        },
    }
    created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    # Status exists before the trainer writes, as in a cluster (the operator sets the phase
    # first): the API server then credits the schema's defaulted counters to that writer.
    phase = {"status": {"phase": "Suspended"}}
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, phase, field_manager="stand-in-operator"
    )
    return str(created["metadata"]["uid"])


def fields_written_by_the_trainer(obj: dict[str, Any]) -> set[str] | None:
    """The status fields the API server attributes to the trainer's field manager."""
    for entry in obj["metadata"].get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and entry.get("subresource") == "status":
            return set(entry["fieldsV1"].get("f:status", {}))
    return None


@pytest.mark.cluster
def test_progress_checkpoint_and_output_reach_the_finetunejob_status(
    trainer: TrainerHarness,
    tmp_path: Path,
    cluster: LocalCluster,
    namespace: str,
    finetunejobs: client.CustomObjectsApi,
) -> None:
    """Merge patches on the status subresource write progress, lastCheckpoint and output —
    and, by the API server's own field ownership records, nothing else (never phase or
    conditions, which the operator owns)."""
    name = "status-run"
    uid = create_suspended_job(finetunejobs, namespace, name)
    config = trainer.write_config(
        tmp_path,
        subset(tmp_path / "train.jsonl", 60),
        {"checkpointing": {"enabled": True, "everySteps": 2}},
        job={"name": name, "namespace": namespace, "uid": uid},
        reporting={"toApiServer": True, "minIntervalSeconds": 0.5},
    )
    run = trainer.run(config, extra_env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert not run.of("warning"), run.of("warning")
    obj = finetunejobs.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name)
    assert fields_written_by_the_trainer(obj) == TRAINER_STATUS_FIELDS
    status = obj["status"]
    total = run.of("started")[0]["totalSteps"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == total
    assert status["progress"]["percent"] == 100
    assert status["progress"]["evalMetrics"]["accuracy"] == run.metrics["accuracy"]
    assert status["progress"]["lastHeartbeat"].endswith("Z")
    assert status["lastCheckpoint"]["step"] == total
    assert status["lastCheckpoint"]["path"].endswith(f"step-{total:08d}")
    assert status["output"] == {"modelUri": "pvc://models/out", "metrics": run.metrics}


@pytest.mark.cluster
def test_status_writes_never_touch_a_recreated_namesake(
    cluster: LocalCluster,
    namespace: str,
    finetunejobs: client.CustomObjectsApi,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A FineTuneJob deleted and created again under the same name (a new run) is never
    written by the old run's trainer: the writer compares UIDs and stops reporting."""
    name = "recreated"
    create_suspended_job(finetunejobs, namespace, name)
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    stale = JobRef(name=name, namespace=namespace, uid="00000000-0000-4000-8000-000000000000")
    writer = StatusWriter(stale, min_interval=0.0)
    writer.submit({"progress": Progress(step=1, total_steps=10).to_wire()})
    writer.close()
    assert "was deleted and created again" in capsys.readouterr().out
    assert not writer.enabled
    obj = finetunejobs.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name)
    assert fields_written_by_the_trainer(obj) is None


# ---------------------------------------------------------------------------- FSDP

# FSDP reduce-scatters what DDP all-reduces: the same sums in another order, so fp32 results
# agree to rounding, which compounds a little over the steps. Measured over 8 steps of the tiny
# GPT-2: losses equal at the 4 decimals progress events carry, weights within 4e-6; the bounds
# leave room for other CPUs' kernels and thread counts.
FSDP_LOSS_RTOL = 1e-4


def sharded_causal_config(
    trainer: TrainerHarness, tmp_path: Path, sharding: str, method: str, **extra: Any
) -> Path:
    """The tiny GPT-2 on the prompt/response pairs, fp32 (the comparison is about sharding,
    not autocast), 1 epoch of 8 global steps on 2 processes."""
    spec: dict[str, Any] = {
        "method": method,
        "hyperparameters": {
            "epochs": 1,
            "batchSize": 8,
            "learningRate": 5e-3,
            "precision": "fp32",
            "sharding": sharding,
        },
        "output": {"triton": False},
        **extra,
    }
    if method == "lora":
        spec["lora"] = {"rank": 4, "alpha": 8, "targetModules": ["c_attn", "c_fc"]}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return causal_config(trainer, tmp_path, spec)


def kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def per_step_losses(run: TrainerRun) -> list[float]:
    return [e["loss"] for e in run.of("progress")]


@pytest.fixture(scope="module")
def fsdp_reference(trainer: TrainerHarness, tmp_path_factory: pytest.TempPathFactory) -> TrainerRun:
    """An uninterrupted 2-process FSDP full fine-tune (no checkpoints) that two tests compare
    with: DDP's losses, and a killed-and-resumed FSDP run's weights."""
    workdir = tmp_path_factory.mktemp("fsdp-reference")
    run = trainer.run(sharded_causal_config(trainer, workdir, "fsdp", "full"), nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_trains_like_ddp(
    trainer: TrainerHarness,
    tmp_path: Path,
    fsdp_reference: TrainerRun,
    method: str,
) -> None:
    """Two processes, sharded with FSDP2 or replicated with DDP, on the same data: the same
    per-step losses and evaluation within FSDP_LOSS_RTOL, and exports that load with plain
    transformers and hold the same weights."""
    runs = {}
    for sharding in ("none", "fsdp"):
        if sharding == "fsdp" and method == "full":
            runs[sharding] = fsdp_reference
            continue
        config = sharded_causal_config(trainer, tmp_path / sharding, sharding, method)
        runs[sharding] = trainer.run(config, nproc=2)
        assert runs[sharding].returncode == 0, runs[sharding].stderr[-3000:]
    ddp, fsdp = runs["none"], runs["fsdp"]
    assert {e["sharding"] for e in fsdp.of("started")} == {"fsdp"}
    assert {e["sharding"] for e in ddp.of("started")} == {"ddp"}
    assert len(per_step_losses(fsdp)) == len(per_step_losses(ddp)) == 8
    assert per_step_losses(fsdp) == pytest.approx(per_step_losses(ddp), rel=FSDP_LOSS_RTOL)
    assert fsdp.metrics["loss"] == pytest.approx(ddp.metrics["loss"], rel=FSDP_LOSS_RTOL)
    assert per_step_losses(fsdp)[-1] < per_step_losses(fsdp)[0]  # it trained
    sharded = AutoModelForCausalLM.from_pretrained(fsdp.output_dir).state_dict()
    replicated = AutoModelForCausalLM.from_pretrained(ddp.output_dir).state_dict()
    assert sharded.keys() == replicated.keys()
    gap = max(float((sharded[k] - replicated[k]).abs().max()) for k in sharded)
    assert gap < 1e-4, gap  # the weights, gathered once at export, are DDP's
    assert len(fsdp.of("exported")) == 1


def test_fsdp_killed_and_resumed_from_sharded_checkpoints_ends_identical(
    trainer: TrainerHarness, tmp_path: Path, fsdp_reference: TrainerRun
) -> None:
    """SIGKILL of both processes after a sharded checkpoint, then a restart: it resumes at the
    saved step, ends with the same step count, and its weights are bit-identical to the
    uninterrupted run's (the same reductions in the same order on the same threads; DCP
    restores the optimizer shards and every rank's RNG)."""
    extra = {"checkpointing": {"enabled": True, "everySteps": 3, "keepLast": 2}}
    config = sharded_causal_config(trainer, tmp_path, "fsdp", "full", **extra)
    proc = trainer.start(config, nproc=2)
    seen = trainer.read_until(proc, lambda e: e["event"] == "checkpoint" and e["step"] >= 3)
    kill_tree(proc.pid)  # torchrun and both workers at once, as when a node fails
    killed = trainer.finish(proc, config, seen)
    saved = max(e["step"] for e in killed.of("checkpoint"))
    shards = sorted((killed.checkpoints_dir / f"step-{saved:08d}" / "sharded").iterdir())
    assert {p.name for p in shards} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}

    resumed = trainer.run(config, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.of("resumed")[0]["step"] == saved
    total = fsdp_reference.of("started")[0]["totalSteps"]
    assert progress_steps(resumed) == list(range(saved + 1, total + 1))
    assert {e["step"] for e in resumed.of("finished")} == {total}
    ref_meta = json.loads((fsdp_reference.output_dir / "kubetune-model.json").read_text())
    new_meta = json.loads((resumed.output_dir / "kubetune-model.json").read_text())
    assert new_meta["weightsSha256"] == ref_meta["weightsSha256"]
    assert resumed.metrics == fsdp_reference.metrics


# ---------------------------------------------------------------------------- memory


def long_texts(path: Path, rows: int, per_row: int) -> Path:
    """Plain-text rows of `per_row` utterances each: sequences long enough that the saved
    activations, not the weights, dominate a step's memory."""
    texts = [json.loads(line)["text"] for line in DATASET.read_text(encoding="utf-8").splitlines()]
    lines = [
        json.dumps({"text": " ".join(texts[i * per_row : (i + 1) * per_row])}) + "\n"
        for i in range(rows)
    ]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_activation_checkpointing_lowers_the_measured_peak_and_changes_no_loss(
    trainer: TrainerHarness, tmp_path: Path
) -> None:
    """The same two steps (batch 8 x 128 tokens) with and without activationCheckpointing: the
    trainer's measured peak (resident set high-water mark while the loop runs) is lower by
    much of what 8 blocks save for the backward pass (~27 MB each here), and the losses are
    the same: recomputation replays the same dropout masks."""
    dataset = long_texts(tmp_path / "long.jsonl", rows=16, per_row=8)
    # 8 blocks of width 256 (14M parameters, half of them the embedding).
    model = tiny_gpt2(tmp_path / "gpt2", trainer.model_dir, width=256, layers=8, positions=128)
    peaks, losses = {}, {}
    for checkpointing in (False, True):
        spec = {
            "task": "causal-lm",
            "dataset": {"validationSplit": 0.0},
            "hyperparameters": {
                "batchSize": 8,
                "maxSeqLength": 128,
                "precision": "fp32",
                "activationCheckpointing": checkpointing,
            },
        }
        config = trainer.write_config(tmp_path / f"ac-{checkpointing}", dataset, spec)
        raw = json.loads(config.read_text())
        raw["paths"]["model"] = str(model)
        config.write_text(json.dumps(raw))
        run = trainer.run(config)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.of("started")[0]["activationCheckpointing"] is checkpointing
        [finished] = run.of("finished")
        peaks[checkpointing] = finished["peakMemoryBytes"]
        losses[checkpointing] = [e["loss"] for e in run.of("progress")]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    saved = peaks[False] - peaks[True]
    assert saved > 64 * 2**20, peaks  # at least 64 MiB of the ~200 MiB the blocks keep


# ---------------------------------------------------------------------------- QLoRA


def test_qlora_trains_adapters_over_a_4bit_base_and_exports_them_merged_in_bf16(
    trainer: TrainerHarness, tmp_path: Path
) -> None:
    """method qlora on CPU (bitsandbytes' CPU backend runs NF4): every linear layer of the
    base is a 4-bit Linear4bit while training, only the adapters train, the loss falls, and
    the export is a plain bf16 checkpoint (no quantisation config, no adapter files) in which
    exactly the targeted weights moved away from the base."""
    spec = {
        "method": "qlora",
        "lora": {"rank": 4, "alpha": 8, "targetModules": ["c_attn", "c_fc"], "merge": True},
        "hyperparameters": {"learningRate": 1e-2, "epochs": 2, "precision": "bf16"},
        "output": {"triton": False},
    }
    # Width 64: bitsandbytes' CPU kernel packs NF4 in blocks of 64 input features.
    run = trainer.run(causal_config(trainer, tmp_path, spec, width=64))
    assert run.returncode == 0, run.stderr[-3000:]
    [started] = run.of("started")
    assert (started["method"], started["precision"]) == ("qlora", "bfloat16")
    assert started["quantizedLayers"] == 8  # every linear layer of both blocks (4 each)
    # rank-4 adapters only: (64 + 192) x 4 + (64 + 256) x 4 per block
    assert started["trainableParameters"] == 2 * ((64 + 192) * 4 + (64 + 256) * 4)
    # Rank-4 adapters over a frozen random base move the loss a little (measured: 10.26 -> 9.78).
    losses = per_step_losses(run)
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3
    out = run.output_dir
    exported = json.loads((out / "config.json").read_text())
    assert exported["dtype"] == "bfloat16"
    assert "quantization_config" not in exported
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.bfloat16)
    moved = {
        name for name, weight in base.state_dict().items() if not torch.equal(merged[name], weight)
    }
    targeted = {
        f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")
    }
    assert moved == targeted
    assert all(merged[name].dtype == torch.bfloat16 for name in targeted)


def test_qlora_under_ddp_on_two_processes_trains_the_same_adapters_everywhere(
    trainer: TrainerHarness, tmp_path: Path
) -> None:
    """method qlora with nodes x processes > 1 (two processes, gloo on CPU): DDP over the
    adapters of a 4-bit base on every rank. Both ranks quantise the same base, train the same
    rank-4 adapters (DDP averages their gradients), agree on the global-batch steps, and rank 0
    exports one merged bf16 checkpoint in which exactly the targeted weights moved."""
    spec = {
        "method": "qlora",
        "lora": {"rank": 4, "alpha": 8, "targetModules": ["c_attn", "c_fc"], "merge": True},
        "hyperparameters": {
            "learningRate": 1e-2,
            "epochs": 2,
            "batchSize": 4,
            "precision": "bf16",
            "sharding": "none",
        },
        "output": {"triton": False},
    }
    run = trainer.run(causal_config(trainer, tmp_path, spec, width=64), nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    started = run.of("started")
    assert sorted(e["rank"] for e in started) == [0, 1]
    for event in started:
        assert (event["worldSize"], event["sharding"], event["method"]) == (2, "ddp", "qlora")
        assert event["quantizedLayers"] == 8
        assert event["trainableParameters"] == 2 * ((64 + 192) * 4 + (64 + 256) * 4)
        assert event["globalBatch"] == 8
    total = started[0]["totalSteps"]
    assert progress_steps(run) == list(range(1, total + 1))
    losses = per_step_losses(run)
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3
    assert len(run.of("exported")) == 1
    out = run.output_dir
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.bfloat16)
    moved = {
        name for name, weight in base.state_dict().items() if not torch.equal(merged[name], weight)
    }
    assert moved == {
        f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")
    }
