"""``fints serve`` and ``fints loadtest``: typer-compatible command functions.

Register them on a typer app with ``app.command()(serve)``; ``python -m
fints.serving`` runs :func:`serve` on its own. :func:`loadtest` lives with the
load test (:mod:`fints.serving.loadtest`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from fints.errors import FintsError
from fints.history import ITEM_PROMPT_TOKENS
from fints.serving.app import ServerConfig, create_app
from fints.serving.batcher import KEEP_KV_MIB, PREFILL_TOKENS, SLICE_TOKENS
from fints.serving.factory import (
    build_personalizer,
    command_failed,
    default_steering,
    parse_unknown_user,
    set_threads,
)
from fints.serving.limits import ResourceLimits
from fints.serving.loadtest import loadtest
from fints.serving.payloads import Limits
from fints.serving.tenants import check_bind, load_api_keys

__all__ = ["loadtest", "serve"]

log = logging.getLogger("fints.serving")


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model: Annotated[
        str | None,
        typer.Option(help="HF id, local folder or .gguf file; default: embedded SmolLM2."),
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="SQLite store; default: $FINTS_HOME/store.sqlite.")
    ] = None,
    template: Annotated[str, typer.Option(help="Prompt template: generic, headline, abstract.")] = (
        "generic"
    ),
    sites: Annotated[
        str | None,
        typer.Option(help="Steering/extraction sites, e.g. '15.block'; default: the method's own."),
    ] = None,
    contrast: Annotated[
        str | None,
        typer.Option(
            help="Extraction method for a new user's history: trained (default), or the "
            "paper's contrasts context or response."
        ),
    ] = None,
    strengths: Annotated[
        str | None, typer.Option(help="Default strengths, e.g. 'attn=0.5,mlp=0.5'.")
    ] = None,
    relative: Annotated[
        bool, typer.Option(help="Strengths are fractions of each site's activation norm.")
    ] = False,
    top_k: Annotated[int, typer.Option(help="Default number of entries retrieved.")] = 5,
    aggregation: Annotated[str, typer.Option(help="Default aggregation: attentive or mean.")] = (
        "attentive"
    ),
    unknown_user: Annotated[
        str,
        typer.Option(help="A request naming an unknown user: 'unsteered' or '404' (or 'error')."),
    ] = "unsteered",
    api_keys: Annotated[
        Path | None,
        typer.Option(help='JSON file {"key": "tenant"}; default: $FINTS_API_KEYS, else no auth.'),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most requests per forward pass.")] = 8,
    max_wait_ms: Annotated[
        float, typer.Option(help="How long a request waits for others to batch with.")
    ] = 5.0,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens a request may ask for.")] = 512,
    default_max_tokens: Annotated[
        int, typer.Option(help="New tokens when a request does not say.")
    ] = 128,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted (tokens).")] = (
        2048
    ),
    extract_on_write: Annotated[
        bool, typer.Option(help="Extract vectors when history is added (off: store only).")
    ] = True,
    extract_chunk_items: Annotated[
        int,
        typer.Option(
            help="Items extracted (trained vectors: examples trained on) per step of a write; "
            "requests are decoded between."
        ),
    ] = 1,
    item_prompt_tokens: Annotated[
        int, typer.Option(help="Tokens of an item's input or output in any prompt (0: all).")
    ] = ITEM_PROMPT_TOKENS,
    max_items_per_user: Annotated[
        int, typer.Option(help="History items one user may have (400 beyond).")
    ] = ResourceLimits.max_items_per_user,
    max_item_tokens: Annotated[
        int, typer.Option(help="Tokens of a history item's input or output (413 beyond).")
    ] = ResourceLimits.max_item_tokens,
    max_request_bytes: Annotated[
        int, typer.Option(help="Size of a request body (413 beyond).")
    ] = ResourceLimits.max_request_bytes,
    max_concurrent_per_tenant: Annotated[
        int, typer.Option(help="Requests of one tenant waiting or running (429 beyond).")
    ] = ResourceLimits.max_concurrent_per_tenant,
    refusal_delay_ms: Annotated[
        int,
        typer.Option(help="How long a 429 for a tenant at its concurrency limit waits (ms)."),
    ] = ResourceLimits.refusal_delay_ms,
    slice_tokens: Annotated[
        int,
        typer.Option(
            help="Under contention, new tokens a long row decodes per round before it yields "
            "to other tenants (0: rows decode whole)."
        ),
    ] = SLICE_TOKENS,
    keep_kv_mib: Annotated[
        int,
        typer.Option(
            help="MiB of KV cache kept for rows between two slices, so a row goes on "
            "without decoding its prefix again (0: keep none)."
        ),
    ] = KEEP_KV_MIB,
    prefill_tokens: Annotated[
        int,
        typer.Option(
            help="Prompt tokens a sliced row reads per round before it decodes, so a long "
            "prompt does not hold the model for its whole prefill (0: read at once)."
        ),
    ] = PREFILL_TOKENS,
    expire_after_days: Annotated[
        float | None,
        typer.Option(help="Forget history items older than this many days (default: never)."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="Requests and writes waiting for the model (503 beyond).")
    ] = 256,
    engine: Annotated[
        str,
        typer.Option(
            help="What decodes: transformers, or vllm (continuous batching; "
            "`make install-vllm`, see docs/VLLM.md)."
        ),
    ] = "transformers",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Serve personalized generations over an OpenAI-compatible HTTP API."""
    import uvicorn

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    set_threads(threads)
    try:
        keys = load_api_keys(api_keys)
        check_bind(host, keys)
        policy = parse_unknown_user(unknown_user)
        config = ServerConfig(
            model_id=model or None,
            limits=Limits(
                max_tokens=max_tokens,
                default_max_tokens=min(default_max_tokens, max_tokens),
                max_prompt_tokens=max_prompt_tokens,
            ),
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            unknown_user=policy,
            extract_on_write=extract_on_write,
            extract_chunk_items=extract_chunk_items,
            resources=ResourceLimits(
                max_items_per_user=max_items_per_user,
                max_item_tokens=max_item_tokens,
                max_request_bytes=max_request_bytes,
                max_concurrent_per_tenant=max_concurrent_per_tenant,
                refusal_delay_ms=refusal_delay_ms,
            ),
            slice_tokens=slice_tokens or None,
            keep_kv_mib=keep_kv_mib,
            prefill_tokens=prefill_tokens or None,
            max_queue=max_queue,
            engine=engine,
            expire_after_s=None if expire_after_days is None else expire_after_days * 86400,
            api_keys=keys,
        )
        steering = default_steering(
            strengths=strengths, relative=relative, top_k=top_k, aggregation=aggregation
        )
        personalizer = build_personalizer(
            model=model,
            store=store,
            template=template,
            sites=sites,
            method=contrast,
            steering=steering,
            unknown_user=policy,
            dtype=dtype,
            device=device,
            item_prompt_tokens=item_prompt_tokens or None,
        )
        app = create_app(personalizer, config)
    except FintsError as exc:
        raise command_failed(exc) from None
    log.info(
        "serving %s on http://%s:%d (engine %s, store %s, max batch %d)",
        personalizer.model.name,
        host,
        port,
        engine,
        personalizer.store.path,
        max_batch_size,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
