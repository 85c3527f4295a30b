"""fints inside vLLM: per-request steering vectors in a continuous batch.

vLLM loads this as a general plugin (the ``vllm.general_plugins`` entry point
``fints``) in every process it starts. :func:`register` patches the model runner
so that, before each forward, every scheduled token knows its request's slot in a
persistent vector bank, and forward hooks on the steered sites add the slot's
vector (see :mod:`fints.vllm_plugin.bank`). A request asks for steering with
packed vectors in its sampling parameters' ``extra_args``
(:func:`fints.vllm_plugin.packing.pack_steering`); a request without them gets the
zero row and decodes exactly as plain vLLM.

The engine side (prompts, retrieval, packing, the async engine) is
:mod:`fints.vllm_engine`.
"""

from __future__ import annotations


def register() -> None:
    """vLLM's entry point: patch the model runner (safe to call more than once)."""
    from fints.vllm_plugin.runner import install

    install()
