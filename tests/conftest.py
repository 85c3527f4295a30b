"""Shared fixtures: tiny random-weight models of each supported architecture, and
the real embedded SmolLM2 (loaded once per session)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

# One model cache for the whole run (the embedded GGUF is converted once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("FINTS_HOME", str(Path(tempfile.gettempdir()) / "fints-test-home"))

ARCHITECTURES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2"]
VOCAB = 96


def tiny_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A 2-layer, 32-wide random model of ``model_type`` (float32, eval mode)."""
    torch.manual_seed(seed)
    if model_type == "gpt2":
        config = AutoConfig.for_model(
            "gpt2",
            n_embd=32,
            n_layer=3,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        extra = {"head_dim": 8} if model_type.startswith("gemma") else {}
        config = AutoConfig.for_model(
            model_type,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def arch_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2 in float32: the end-to-end tests compare rows exactly (batched
    with unbatched, one engine with another), which holds in float32; where the CPU has
    native bf16, ``auto`` would pick it, and bf16 rounding differs with the padding."""
    from fints.models import load_model

    return load_model(dtype="float32")


@pytest.fixture(scope="session")
def encoder():
    from fints.encoders import SentenceTransformerEncoder

    return SentenceTransformerEncoder()
