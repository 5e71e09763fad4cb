"""Chat data (assistant-only loss through the tokenizer's chat template) and packing (short
examples in one sequence, attention kept within each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from kubetune.api.v1alpha1.finetunejob import DatasetSpec
from kubetune.devcluster.demo import minilm_checkpoint
from kubetune.trainer import data
from kubetune.trainer.errors import BadDataError, ConfigError
from kubetune.trainer.loop import collate

# The ChatML template (Qwen's and many others'), set on the shipped tokenizer: the MiniLM
# checkpoint ships none, and nothing may be downloaded.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPEC = DatasetSpec(source="pvc://d/chat.jsonl", messages_field="messages")
CONVERSATION = [
    {"role": "system", "content": "you answer billing questions"},
    {"role": "user", "content": "why was i charged twice"},
    {"role": "assistant", "content": "a duplicate payment was refunded"},
    {"role": "user", "content": "when"},
    {"role": "assistant", "content": "within five days"},
]


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_checkpoint())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def table_of(tmp_path: Path, rows: list[Any]) -> data.Table:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return data.read_table(path, data.detect_format(path, None))


def test_only_assistant_tokens_carry_labels(tmp_path: Path, chat_tokenizer: Any) -> None:
    chats = data.chat_data(table_of(tmp_path, [{"messages": CONVERSATION}]), SPEC)
    (example,) = data.tokenize_chat(chat_tokenizer, chats, [0], max_length=256)
    target = example.target
    assert isinstance(target, list) and len(target) == len(example.input_ids)
    trained = [t for t in target if t != data.IGNORE_INDEX]
    assert chat_tokenizer.decode(trained) == (
        "a duplicate payment was refunded <|im_end|> within five days <|im_end|>"
    )
    ignored = [i for i, t in zip(example.input_ids, target, strict=True) if t == data.IGNORE_INDEX]
    text = chat_tokenizer.decode(ignored)
    assert "why was i charged twice" in text and "billing" in text
    assert "refunded" not in text and "five" not in text
    # the whole conversation, as the template renders it, is the input
    rendered = chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example.input_ids == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_truncation_keeps_labels_aligned(tmp_path: Path, chat_tokenizer: Any) -> None:
    chats = data.chat_data(table_of(tmp_path, [{"messages": CONVERSATION}]), SPEC)
    (full,) = data.tokenize_chat(chat_tokenizer, chats, [0], max_length=256)
    (short,) = data.tokenize_chat(chat_tokenizer, chats, [0], max_length=24)
    assert len(short.input_ids) == 24
    assert short.input_ids == full.input_ids[:24]
    assert isinstance(short.target, list) and isinstance(full.target, list)
    assert short.target == full.target[:24]


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "is not a non-empty list of turns"),
        ([], "is not a non-empty list of turns"),
        ([{"role": "robot", "content": "x"}], "turn 0 is not"),
        ([{"role": "user", "content": 3}], "turn 0 is not"),
        ([{"role": "user", "content": "hi"}], "has no assistant turn"),
    ],
)
def test_bad_conversations_name_line_and_field(tmp_path: Path, messages: Any, problem: str) -> None:
    table = table_of(tmp_path, [{"messages": CONVERSATION}, {"messages": messages}])
    with pytest.raises(BadDataError) as caught:
        data.chat_data(table, SPEC)
    assert f"line 2 of {table.path}" in str(caught.value)
    assert "spec.dataset.messagesField" in str(caught.value)
    assert problem in str(caught.value)


def test_a_tokenizer_without_a_template_is_refused(tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_checkpoint())
    chats = data.chat_data(table_of(tmp_path, [{"messages": CONVERSATION}]), SPEC)
    with pytest.raises(ConfigError, match="chat template"):
        data.tokenize_chat(tokenizer, chats, [0], max_length=64)


# ---------------------------------------------------------------------------- packing


def tiny_causal_lm(kind: str) -> Any:
    torch.manual_seed(0)
    if kind == "llama":
        config: Any = transformers.LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    model.config.use_cache = False  # as the trainer trains: a KV cache turns packed masks off
    return model.eval()


def test_with_a_kv_cache_packed_examples_would_see_each_other() -> None:
    """Why the trainer turns the cache off: with one, transformers ignores the boundaries in
    the position ids and the second example attends to the first."""
    model = tiny_causal_lm("llama")
    model.config.use_cache = True
    first, second = examples([5, 4])
    packed = data.pack([first, second], max_length=9)
    batch = collate(packed, pad_id=0, multiple=1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=torch.tensor([second.input_ids])).logits
    row, start = find(packed, second)
    assert not torch.allclose(logits[row, start : start + 4], alone[0], atol=1e-3)


def examples(lengths: list[int]) -> list[data.Example]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for length in lengths:
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        out.append(data.Example(ids, list(ids)))
    return out


def test_packing_fills_sequences_and_masks_boundaries() -> None:
    items = examples([5, 9, 7, 30, 2])
    packed = data.pack(items, max_length=32)
    assert sorted(len(p.input_ids) for p in packed) == [21, 32]  # best fit: 30+2, 9+7+5
    for row in packed:
        assert row.position_ids is not None and len(row.position_ids) <= 32
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert starts[0] == 0
        assert isinstance(row.target, list)
        assert all(row.target[i] == data.IGNORE_INDEX for i in starts)  # no cross-boundary label
    total = sum(len(p.input_ids) for p in packed)
    assert total == sum(len(e.input_ids) for e in items)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_batch_gives_the_same_logits_and_loss_as_unpacked(kind: str) -> None:
    model = tiny_causal_lm(kind)
    items = examples([5, 9, 7, 12, 3])
    packed = data.pack(items, max_length=20)
    assert len(packed) < len(items)
    batch = collate(packed, pad_id=0, multiple=8)  # two rows, padded: padding is a segment too
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"]
        ).logits
        packed_loss = model(**batch).loss
    # every example, found in its packed row by its ids, against a run of it alone
    token_losses = []
    for item in items:
        alone = torch.tensor([item.input_ids])
        with torch.no_grad():
            logits = model(input_ids=alone).logits[0]
        row, start = find(packed, item)
        inside = packed_logits[row, start : start + len(item.input_ids)]
        torch.testing.assert_close(inside, logits, atol=1e-5, rtol=1e-5)
        token_losses.append(
            torch.nn.functional.cross_entropy(logits[:-1], alone[0, 1:], reduction="none")
        )
    unpacked_loss = torch.cat(token_losses).mean()
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-5, rtol=1e-5)


def find(packed: list[data.Example], item: data.Example) -> tuple[int, int]:
    for row, example in enumerate(packed):
        assert example.position_ids is not None
        for start, position in enumerate(example.position_ids):
            end = start + len(item.input_ids)
            if position == 0 and example.input_ids[start:end] == item.input_ids:
                return row, start
    raise AssertionError(f"{item.input_ids} is not in any packed row")
