"""Shared by the benchmark tests: the fixture tasks, a tiny random llama and a hashing
key encoder (no downloads, deterministic)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fints.benchmark.tasks import SplitConfig, Task, load_headlines
from fints.layers import resolve_layout
from fints.models import LoadedModel, model_fingerprint, prepare_tokenizer, resolve_source

FIXTURES = Path(__file__).parents[1] / "fixtures" / "bench"


def fixture_task(max_history: int, max_new_tokens: int, n_test: int = 1) -> Task:
    """The headlines fixture, split with one validation query per user."""
    split = SplitConfig(min_items=10, n_test=n_test, n_val=1, max_history=max_history)
    return load_headlines(FIXTURES / "news.jsonl", split, max_new_tokens)


class HashEncoder:
    """Bag of hashed words, unit length: a deterministic stand-in for MiniLM."""

    name = "hash-encoder"
    dim = 64

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def tiny_llama() -> LoadedModel:
    """A 4-layer, 32-wide random llama with the embedded model's tokenizer."""
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_source(None)))
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(
        model, tokenizer, "tiny-llama", model_fingerprint(model), resolve_layout(model)
    )
