"""Loading models by local folder and GGUF path; fingerprints; clear errors."""

from __future__ import annotations

import pytest
import torch

from fints.errors import FintsError
from fints.models import embedded_gguf, load_model, model_fingerprint, resolve_source
from tests.conftest import tiny_model


def test_local_folder_loads_with_left_padding_and_own_fingerprint(tmp_path, smollm):
    model = tiny_model("llama")
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    model.save_pretrained(tmp_path)
    smollm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.num_layers == 3 and loaded.hidden_size == 32
    assert loaded.tokenizer.padding_side == "left" and loaded.dtype == torch.float32
    assert loaded.fingerprint != smollm.fingerprint
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_fingerprint_is_dtype_independent_and_weight_sensitive():
    model = tiny_model("qwen2", seed=0)
    fp32 = model_fingerprint(model)
    assert model_fingerprint(model.to(torch.bfloat16)) == fp32
    assert model_fingerprint(tiny_model("qwen2", seed=1)) != fp32


def test_gguf_path_uses_the_same_safetensors_cache(smollm):
    gguf = embedded_gguf()
    assert resolve_source(str(gguf)) == resolve_source(None)


def test_missing_gguf_and_unknown_dtype_are_clear_errors(tmp_path):
    with pytest.raises(FintsError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FintsError, match="unknown dtype"):
        load_model(None, dtype="int3")
    with pytest.raises(FintsError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-folder" / "x"))


def test_auto_dtype_is_fp32_on_cpus_without_native_bf16(monkeypatch):
    from fints import models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.pick_dtype("auto", "cpu") == torch.float32
    assert models.pick_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.pick_dtype("auto", "cpu") == torch.bfloat16
    assert models.pick_dtype("float16", "cpu") == torch.float16
