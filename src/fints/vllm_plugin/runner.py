"""Fill the bank's per-token index before every forward of vLLM's model runner.

:func:`install` wraps ``GPUModelRunner._prepare_inputs`` (the CPU runner inherits
it): after vLLM has laid out the batch's tokens, the wrapper reads, per scheduled
request, how many tokens it runs in this step and its sampling parameters'
``extra_args``, and hands them to the runner's own :class:`SteeringBank` (made on
first use from the loaded model). Installing twice changes nothing: vLLM runs a
general plugin in every process, sometimes more than once.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from fints.vllm_plugin.bank import SUPPORTED_ARCHITECTURES, SteeringBank, decoder_layers

log = logging.getLogger(__name__)
_MARK = "_fints_steering"


def install() -> bool:
    """Patch vLLM's model runner (idempotent); False if this vLLM has no such runner."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # another vLLM layout: say so instead of steering silently wrong
        log.warning("fints: vLLM's v1 GPUModelRunner not found; steering is unavailable")
        return False
    original = GPUModelRunner._prepare_inputs
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
        prepared = original(self, scheduler_output, num_scheduled_tokens)
        bank = bank_of(self)
        if bank is not None:
            batch = self.input_batch
            req_ids = batch.req_ids[: batch.num_reqs]
            scheduled = [
                (req_id, int(count), _extra_args(self.requests.get(req_id)))
                for req_id, count in zip(req_ids, num_scheduled_tokens, strict=True)
            ]
            bank.update(scheduled, self.requests)
        return prepared

    setattr(_prepare_inputs, _MARK, True)
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
    return True


def _extra_args(state: Any) -> Any:
    params = getattr(state, "sampling_params", None)
    return getattr(params, "extra_args", None)


def bank_of(runner: Any) -> SteeringBank | None:
    """The runner's bank, made on first use (None for an architecture fints cannot steer)."""
    bank: SteeringBank | bool | None = getattr(runner, _MARK, None)
    if bank is None:
        model = runner.get_model()
        config = runner.model_config.hf_config
        architectures = set(getattr(config, "architectures", None) or [])
        if not architectures & SUPPORTED_ARCHITECTURES:
            bank = False
        else:
            bank = SteeringBank(
                decoder_layers(model),
                slots=runner.scheduler_config.max_num_seqs + 1,
                hidden=int(config.hidden_size),
                dtype=runner.model_config.dtype,
                device=runner.device,
            )
        setattr(runner, _MARK, bank)
    return bank if isinstance(bank, SteeringBank) else None
