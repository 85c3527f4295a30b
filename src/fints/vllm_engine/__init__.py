"""fints on vLLM: the engine side of the plugin in :mod:`fints.vllm_plugin`.

:mod:`.requests` turns a prepared batch's rows into vLLM requests (steering packed
into each row's sampling parameters) and vLLM's outputs back into completions;
:mod:`.backend` is the library's backend (``Personalizer(..., backend="vllm")``).
"""
