"""Reading, validating, splitting and tokenizing the training data.

Everything that can be wrong with a dataset is found here, before a model is downloaded or a GPU is
touched, and reported as BadData with the file, the line and the spec field involved: a user who
misnamed a column must learn it in seconds, not after an hour of queueing for GPUs.

Rows are read with the standard library (jsonl, csv) or pyarrow (parquet) rather than through
`datasets`: the data of a fine-tuning job fits in memory, and owning the reader is what lets every
error point at a line number.
"""

from __future__ import annotations

import bisect
import csv
import importlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1.finetunejob import DatasetFormat, DatasetSpec
from kubetune.trainer.errors import BadDataError, ConfigError

SUFFIXES: dict[str, DatasetFormat] = {
    ".jsonl": DatasetFormat.JSONL,
    ".json": DatasetFormat.JSONL,
    ".ndjson": DatasetFormat.JSONL,
    ".csv": DatasetFormat.CSV,
    ".parquet": DatasetFormat.PARQUET,
    ".pq": DatasetFormat.PARQUET,
}
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips (prompt tokens, padding)


@dataclass(frozen=True)
class Table:
    """The rows of one data file, with where each row came from (for error messages)."""

    path: Path
    rows: list[dict[str, Any]]
    lines: list[int]
    unit: str  # "line" for jsonl, "row" for csv/parquet

    def where(self, index: int) -> str:
        return f"{self.unit} {self.lines[index]} of {self.path}"


@dataclass(frozen=True)
class ClassificationData:
    texts: list[str]
    label_ids: list[int]
    labels: list[str]  # id -> name


@dataclass(frozen=True)
class CausalData:
    texts: list[str]  # the plain text, or the prompt when responses are present
    responses: list[str] | None


@dataclass(frozen=True)
class ChatData:
    conversations: list[list[dict[str, str]]]  # each a list of {role, content} turns


@dataclass(frozen=True)
class Example:
    """One tokenized example: input ids and its target (a class id, or per-token labels).

    A packed example (several short ones in one sequence) has `position_ids` that restart at 0
    for each example inside it; the model then keeps attention within each of them.
    """

    input_ids: list[int]
    target: int | list[int]
    position_ids: list[int] | None = None


# --------------------------------------------------------------------------- reading


def find_data_file(location: Path) -> Path:
    """A file is used as is; a folder must hold exactly one data file (or one named train.*)."""
    if location.is_file():
        return location
    if not location.exists():
        raise BadDataError(f"dataset {location} (paths.dataset) does not exist")
    candidates = sorted(p for p in location.rglob("*") if p.suffix.lower() in SUFFIXES)
    train = [p for p in candidates if p.stem.lower().startswith("train")]
    if len(train) == 1 or len(candidates) == 1:
        return (train or candidates)[0]
    if not candidates:
        raise BadDataError(f"dataset folder {location} has no .jsonl, .csv or .parquet file")
    names = ", ".join(str(p.relative_to(location)) for p in candidates[:10])
    raise BadDataError(
        f"dataset folder {location} holds several data files ({names}); point "
        "spec.dataset.source at one of them or name the training file train.*"
    )


def detect_format(path: Path, declared: str | None) -> DatasetFormat:
    """spec.dataset.format wins; otherwise the suffix decides."""
    if declared:
        return DatasetFormat(declared)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BadDataError(
            f"cannot tell the format of {path} from its suffix; set spec.dataset.format "
            "to jsonl, csv or parquet"
        )
    return fmt


def read_table(path: Path, fmt: DatasetFormat) -> Table:
    readers: dict[DatasetFormat, Callable[[Path], Table]] = {
        DatasetFormat.JSONL: _read_jsonl,
        DatasetFormat.CSV: _read_csv,
        DatasetFormat.PARQUET: _read_parquet,
    }
    table = readers[fmt](path)
    if not table.rows:
        raise BadDataError(f"dataset file {path} has no rows")
    return table


def _read_jsonl(path: Path) -> Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with _open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadDataError(
                    f"line {number} of {path} is not valid JSON ({exc.msg} at column {exc.colno})"
                ) from exc
            if not isinstance(row, dict):
                raise BadDataError(f"line {number} of {path} is not a JSON object")
            rows.append(row)
            lines.append(number)
    return Table(path, rows, lines, "line")


def _read_csv(path: Path) -> Table:
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        try:
            rows = [dict(row) for row in reader]
        except csv.Error as exc:
            raise BadDataError(f"line {reader.line_num} of {path} is not valid CSV: {exc}") from exc
    for index, row in enumerate(rows):
        if None in row:  # more cells than header columns
            raise BadDataError(f"row {index + 1} of {path} has more cells than the header")
    return Table(path, rows, list(range(1, len(rows) + 1)), "row")


def _read_parquet(path: Path) -> Table:
    try:
        pq = importlib.import_module("pyarrow.parquet")  # optional, heavy, untyped
    except ImportError as exc:
        raise ConfigError(
            f"reading the parquet file {path} needs the 'pyarrow' package, which does not "
            f"import in this image: {exc}"
        ) from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:
        raise BadDataError(f"{path} is not a readable parquet file: {exc}") from exc
    return Table(path, rows, list(range(1, len(rows) + 1)), "row")


def _open_text(path: Path) -> Any:
    try:
        return path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise BadDataError(f"cannot open dataset file {path}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------- validating


def _field_error(
    table: Table, index: int, field: str, spec_name: str, problem: str
) -> BadDataError:
    return BadDataError(
        f"{table.where(index)}: field '{field}' (spec.dataset.{spec_name}) {problem}; "
        f"fields present: {', '.join(sorted(table.rows[index])) or 'none'}"
    )


def _texts(table: Table, field: str, spec_name: str) -> list[str]:
    texts: list[str] = []
    for index, row in enumerate(table.rows):
        value = row.get(field)
        if field not in row:
            raise _field_error(table, index, field, spec_name, "is missing")
        if not isinstance(value, str) or not value.strip():
            raise _field_error(
                table, index, field, spec_name, f"is not a non-empty string: {value!r}"
            )
        texts.append(value)
    return texts


def _label_name(value: Any) -> str | None:
    """Labels are strings or integers; anything else (null, floats, lists) is unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _sorted_labels(names: set[str]) -> list[str]:
    """Integer labels in numeric order (so 0..k-1 keep their ids), names alphabetically."""
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def classification_data(
    table: Table, spec: DatasetSpec, known_labels: Sequence[str] | None = None
) -> ClassificationData:
    """Texts and label ids. `known_labels` (from a checkpoint) pins the label map on resume."""
    texts = _texts(table, spec.text_field, "textField")
    names: list[str] = []
    for index, row in enumerate(table.rows):
        if spec.label_field not in row:
            raise _field_error(table, index, spec.label_field, "labelField", "is missing")
        name = _label_name(row[spec.label_field])
        if name is None:
            problem = (
                f"holds an unusable label {row[spec.label_field]!r} (want a string or integer)"
            )
            raise _field_error(table, index, spec.label_field, "labelField", problem)
        names.append(name)
    labels = list(known_labels) if known_labels else _sorted_labels(set(names))
    if len(labels) < 2:
        raise BadDataError(
            f"{table.path}: field '{spec.label_field}' (spec.dataset.labelField) has a single "
            f"label {labels[0]!r}; classification needs at least two"
        )
    ids = {name: i for i, name in enumerate(labels)}
    for index, name in enumerate(names):
        if name not in ids:
            raise BadDataError(
                f"{table.where(index)}: unknown label {name!r} in field '{spec.label_field}' "
                f"(spec.dataset.labelField); the checkpoint being resumed knows {labels}"
            )
    return ClassificationData(texts, [ids[name] for name in names], labels)


def causal_data(table: Table, spec: DatasetSpec) -> CausalData:
    """Plain text, or prompt/response pairs when the label field holds the response."""
    texts = _texts(table, spec.text_field, "textField")
    if not any(spec.label_field in row for row in table.rows):
        return CausalData(texts, None)
    responses = _texts(table, spec.label_field, "labelField")
    return CausalData(texts, responses)


CHAT_ROLES = ("system", "user", "assistant", "tool")


def chat_data(table: Table, spec: DatasetSpec) -> ChatData:
    """Conversations from `spec.dataset.messagesField`: lists of {role, content} turns with at
    least one assistant turn (the only text the model is trained to produce)."""
    assert spec.messages_field is not None
    field = spec.messages_field
    conversations: list[list[dict[str, str]]] = []
    for index, row in enumerate(table.rows):
        if field not in row:
            raise _field_error(table, index, field, "messagesField", "is missing")
        turns = row[field]
        if not isinstance(turns, list) or not turns:
            raise _field_error(
                table, index, field, "messagesField", "is not a non-empty list of turns"
            )
        conversation: list[dict[str, str]] = []
        for number, turn in enumerate(turns):
            role = turn.get("role") if isinstance(turn, dict) else None
            content = turn.get("content") if isinstance(turn, dict) else None
            if role not in CHAT_ROLES or not isinstance(content, str):
                raise _field_error(
                    table,
                    index,
                    field,
                    "messagesField",
                    f"turn {number} is not {{role: {'|'.join(CHAT_ROLES)}, content: string}}: "
                    f"{turn!r:.200}",
                )
            conversation.append({"role": role, "content": content})
        if not any(t["role"] == "assistant" and t["content"].strip() for t in conversation):
            raise _field_error(
                table, index, field, "messagesField", "has no assistant turn to learn from"
            )
        conversations.append(conversation)
    return ChatData(conversations)


# --------------------------------------------------------------------------- splitting


def split_indices(
    count: int, strata: Sequence[int] | None, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """A seeded train/validation split, stratified by label when labels are given.

    Stratifying keeps every class in the validation set of a small dataset, so accuracy and
    macro-F1 mean the same thing from run to run. Every class keeps at least one training row.
    """
    rng = random.Random(f"kubetune-split:{seed}")
    keys = strata if strata is not None else [0] * count
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    train: list[int] = []
    validation: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        take = min(int(len(members) * fraction + 0.5), len(members) - 1) if fraction > 0 else 0
        validation.extend(members[:take])
        train.extend(members[take:])
    return sorted(train), sorted(validation)


# --------------------------------------------------------------------------- tokenizing


def tokenize_classification(
    tokenizer: Any, data: ClassificationData, indices: Sequence[int], max_length: int
) -> list[Example]:
    texts = [data.texts[i] for i in indices]
    if not texts:
        return []
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [Example(list(ids), data.label_ids[i]) for ids, i in zip(encoded, indices, strict=True)]


def tokenize_causal(
    tokenizer: Any, data: CausalData, indices: Sequence[int], max_length: int
) -> list[Example]:
    """Labels are the input ids (the model shifts them); prompts are masked out of the loss."""
    if not indices:
        return []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = tokenizer([data.texts[i] for i in indices])["input_ids"]
    if data.responses is None:
        plain = [(list(p) + eos)[:max_length] for p in prompts]
        return [Example(ids, list(ids)) for ids in plain]
    responses = tokenizer([data.responses[i] for i in indices], add_special_tokens=False)[
        "input_ids"
    ]
    examples: list[Example] = []
    for prompt, response in zip(prompts, responses, strict=True):
        answer = (list(response) + eos)[: max_length - 1]
        kept_prompt = list(prompt)[-(max_length - len(answer)) :]
        examples.append(Example(kept_prompt + answer, [IGNORE_INDEX] * len(kept_prompt) + answer))
    return examples


def tokenize_chat(
    tokenizer: Any, data: ChatData, indices: Sequence[int], max_length: int
) -> list[Example]:
    """Conversations rendered with the tokenizer's chat template; loss on assistant tokens only.

    Each assistant turn's characters are found by rendering the conversation up to that turn
    twice, with the generation prompt and with the turn itself; tokens whose characters fall in
    such a span keep their label (the template's end-of-turn token too, so the model learns to
    stop), every other token is IGNORE_INDEX. This works with any template that renders a
    conversation prefix by prefix, which needs no `{% generation %}` markers in it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "spec.dataset.messagesField needs a tokenizer with a chat template "
            "(chat_template in tokenizer_config.json or chat_template.jinja); this model's "
            "tokenizer has none"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("spec.dataset.messagesField needs a fast tokenizer (tokenizer.json)")
    examples: list[Example] = []
    for i in indices:
        conversation = data.conversations[i]
        text, spans = _render_chat(tokenizer, conversation)
        encoded = tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=True,
            max_length=max_length,
        )
        ids = list(encoded["input_ids"])
        labels = [
            token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
            for token, (start, _) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        examples.append(Example(ids, labels))
    return examples


def _render_chat(
    tokenizer: Any, conversation: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    def render(turns: list[dict[str, str]], prompt: bool) -> str:
        return str(
            tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
        )

    text = render(conversation, False)
    spans: list[tuple[int, int]] = []
    for k, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        before, through = (
            render(conversation[:k], True) if k else "",
            render(conversation[: k + 1], False),
        )
        if not (text.startswith(before) and text.startswith(through)):
            raise ConfigError(
                "the tokenizer's chat template does not render a conversation prefix by prefix, "
                "so the assistant's turns cannot be told apart for the loss"
            )
        spans.append((len(before), len(through)))
    return text, spans


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Short causal-LM examples packed into sequences of at most `max_length` tokens.

    Best-fit decreasing bins (deterministic), each flattened by transformers'
    `DataCollatorWithFlattening`: concatenated ids, position ids restarting at 0 per example
    (from which the model builds a block-diagonal causal mask: no example sees another), and the
    first label of each example masked, so no token is predicted across a boundary.
    """
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(  # type: ignore[no-untyped-call]
        return_tensors="np", separator_id=IGNORE_INDEX
    )
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in order:
        size = len(examples[index].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, target = free.pop(at)
            bins[target].append(index)
        else:
            room, target = max_length, len(bins)
            bins.append([index])
        if room - size > 0:
            bisect.insort(free, (room - size, target))
    packed: list[Example] = []
    for members in bins:
        features = [
            {"input_ids": examples[i].input_ids, "labels": examples[i].target} for i in members
        ]
        batch = flatten(features)
        packed.append(
            Example(
                batch["input_ids"][0].tolist(),
                batch["labels"][0].tolist(),
                batch["position_ids"][0].tolist(),
            )
        )
    return packed


# --------------------------------------------------------------------------- batching


class BatchPlan:
    """Which examples each rank sees at each micro-batch of each epoch: seeded, length-grouped.

    The plan is a pure function of (seed, epoch, world size), so a restarted process rebuilds the
    exact same batches and resumes at a batch index instead of replaying an iterator. Lengths are
    grouped inside shuffled "mega-batches", so padding stays small while the order stays random;
    the batch holding the longest example runs first, so a batch size that does not fit in memory
    fails at step one rather than hours later.

    A mega-batch is 50 global batches, or fewer so that an epoch has at least 4 of them (the rule of
    Hugging Face's `get_length_grouped_indices`). With a fixed 50, an epoch of up to 50 batches was
    one mega-batch: sorted by length as a whole, so every batch held examples of one or two
    lengths only, and one epoch of MiniLM on the shipped intents data reached about 0.04 less
    held-out accuracy than the same loop on random batches (docs/benchmarks-trainer.md).

    A global batch is `batch_size * world_size` examples, dealt round-robin to the ranks. The epoch
    is padded (by repeating its first examples) to a multiple of the world size so every rank gets
    a non-empty last batch: DDP needs every rank in every step.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, world_size: int, rank: int, seed: int
    ) -> None:
        if not lengths:
            raise BadDataError("no training examples are left after the validation split")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * world_size
        multiple = mega_batch_multiple(len(self.lengths), self.global_batch)
        self.mega_batch = self.global_batch * multiple

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"kubetune-batches:{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order += order[: (-len(order)) % self.world_size]
        grouped: list[int] = []
        for start in range(0, len(order), self.mega_batch):
            chunk = order[start : start + self.mega_batch]
            grouped.extend(sorted(chunk, key=lambda i: -self.lengths[i]))
        batches = [
            grouped[i : i + self.global_batch] for i in range(0, len(grouped), self.global_batch)
        ]
        longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
        first = batches.pop(longest)
        rng.shuffle(batches)
        return [first, *batches]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return [batch[self.rank :: self.world_size] for batch in self.global_batches(epoch)]


MEGA_BATCH_MOST = 50  # global batches per mega-batch, at most
MEGA_BATCHES_LEAST = 4  # mega-batches per epoch, at least (where the epoch has that many batches)


def mega_batch_multiple(examples: int, global_batch: int) -> int:
    """Global batches per mega-batch: 50, or fewer so that the epoch has at least 4 mega-batches
    (1 for an epoch of fewer than 4 batches: random batches, nothing to group)."""
    return max(1, min(MEGA_BATCH_MOST, examples // (global_batch * MEGA_BATCHES_LEAST)))


def eval_batches(
    lengths: Sequence[int], batch_size: int, world_size: int, rank: int
) -> list[list[int]]:
    """This rank's share of the validation set, sorted by length so padding is minimal."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[rank::world_size]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
