"""The vLLM backend for the library: ``Personalizer(..., backend="vllm")``.

Decoding runs in vLLM (paged attention, its own batching); retrieval, prompts and
extraction stay on the transformers model the engine already holds (extraction
needs gradients and hooks that vLLM does not offer; the second copy of the weights
is the price, about 0.5 GB for SmolLM2 in float32). The engine is made from the same
weights folder and dtype as the transformers model, in eager mode: the steering hooks
run as plain PyTorch, outside CUDA graphs (see docs/VLLM.md for their cost).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fints.decode_state import KvCarry
from fints.errors import FintsError, InvalidInputError
from fints.generation import Completion, GenerationOptions, eos_token_ids
from fints.models import LoadedModel
from fints.modes import Addition
from fints.vllm_engine.requests import completion_of, vllm_rows


@dataclass(frozen=True)
class VllmSettings:
    """Engine arguments fints chooses (anything else: ``extra``, passed to vLLM as is)."""

    max_model_len: int = 4096
    max_num_seqs: int = 64
    kv_cache_gib: float = 1.0  # CPU: memory reserved for the KV cache
    # GPU: vLLM's share of the device (the transformers copy, for extraction, needs room)
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = True  # the steering hooks are plain PyTorch
    extra: Mapping[str, Any] = field(default_factory=dict)

    def engine_args(self, model: LoadedModel) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": model_folder(model),
            "dtype": str(model.dtype).removeprefix("torch."),
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "enforce_eager": self.enforce_eager,
            "seed": 0,
        }
        if model.device.type == "cpu":
            args["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        else:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        return {**args, **self.extra}


def model_folder(model: LoadedModel) -> str:
    """The weights folder (or hub id) the transformers model was loaded from."""
    source = getattr(model.model, "name_or_path", None)
    if not source:
        raise FintsError("the vLLM engine needs the model's folder or hub id; this model has none")
    return str(source)


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise FintsError(
            "the vLLM engine needs vLLM: `make install-vllm` on CPU, "
            "`pip install 'fints[vllm]'` on a GPU (see docs/VLLM.md)"
        ) from None


class VllmBackend:
    """Decode a prepared batch in one ``vllm.LLM.generate`` call."""

    def __init__(self, model: LoadedModel, settings: VllmSettings | None = None) -> None:
        require_vllm()
        # one process: the engine sees this process's plugin and needs no __main__ guard
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from fints.vllm_plugin import register

        register()
        self.model = model
        self.eos = eos_token_ids(model)
        self.llm = LLM(**(settings or VllmSettings()).engine_args(model))

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        additions: Sequence[Addition],
        carry: KvCarry,
        tokens: int,
    ) -> bool:
        """vLLM schedules its own (chunked) prefill: nothing is read here."""
        carry.state = None
        return False

    def decode(
        self,
        prompts: Sequence[Sequence[int]],
        additions: Sequence[Addition],
        options: GenerationOptions,
        *,
        streamer: Any = None,
        stops: Sequence[Sequence[str]] | None = None,
        carry: KvCarry | None = None,
    ) -> list[Completion]:
        """``carry``: vLLM keeps its own cache (prefix caching), so the prompts are
        decoded from the start and no decoding state is left."""
        from vllm import SamplingParams

        if carry is not None:
            carry.state = None

        if streamer is not None:
            raise InvalidInputError(
                "the vLLM backend streams through its async engine (`fints serve --engine vllm`)"
            )
        rows = vllm_rows(prompts, additions, options, stops, self.eos)
        outputs = self.llm.generate(
            [row.prompt for row in rows],  # type: ignore[arg-type]
            [SamplingParams(**row.sampling) for row in rows],
            use_tqdm=False,
        )
        completions = []
        for i, output in enumerate(outputs):
            out = output.outputs[0]
            completions.append(
                completion_of(
                    self.model.tokenizer,
                    len(prompts[i]),
                    out.token_ids,
                    out.finish_reason,
                    stops[i] if stops else (),
                    self.eos,
                )
            )
        return completions
