"""``fints serve`` and ``fints loadtest``: typer-compatible command functions.

Register them on a typer app with ``app.command()(serve)``; ``python -m
fints.serving`` runs :func:`serve` on its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, cast

import typer

from fints.engine import Personalizer, UnknownUser
from fints.errors import FintsError
from fints.extraction import ExtractionConfig
from fints.models import load_model
from fints.paths import default_store_path
from fints.serving.app import ServerConfig, UnknownUserMode, create_app
from fints.serving.payloads import Limits
from fints.serving.tenants import check_bind, load_api_keys
from fints.sites import Component, check_layers_in_range, parse_sites
from fints.steering import Aggregation, SteeringConfig
from fints.store import Store

log = logging.getLogger("fints.serving")


def parse_strengths(spec: str) -> dict[Component, float]:
    """``"attn=0.5,mlp=1"`` -> ``{attn: 0.5, mlp: 1.0}``."""
    strengths: dict[Component, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            strengths[Component(name.strip())] = float(value)
        except ValueError:
            raise FintsError(
                f"cannot parse strength {part.strip()!r}: expected COMPONENT=NUMBER with "
                f"component one of {[c.value for c in Component]}, e.g. 'attn=0.5,mlp=0.5'"
            ) from None
        if not sep:
            raise FintsError(f"cannot parse strength {part.strip()!r}: missing '='")
    return strengths


def build_personalizer(
    *,
    model: str | None = None,
    store: Path | None = None,
    template: str = "generic",
    sites: str | None = None,
    strengths: str | None = None,
    relative: bool = False,
    top_k: int = 5,
    aggregation: str = "attentive",
    unknown_user: UnknownUser | str = UnknownUser.UNSTEERED,
    dtype: str = "auto",
    device: str = "cpu",
) -> Personalizer:
    """Load the model and open the store; the server's default steering comes from here."""
    loaded = load_model(model, dtype=dtype, device=device)
    extraction = None
    if sites:
        parsed = parse_sites(sites)
        check_layers_in_range(parsed, loaded.num_layers)
        extraction = ExtractionConfig(sites=parsed)
    if aggregation not in ("mean", "attentive"):
        raise FintsError(f"aggregation must be 'mean' or 'attentive', got {aggregation!r}")
    steering = SteeringConfig(
        relative=relative, top_k=top_k, aggregation=cast(Aggregation, aggregation)
    )
    if strengths:
        steering = steering.with_(strengths=parse_strengths(strengths))
    return Personalizer(
        loaded,
        Store(store or default_store_path()),
        template=template,
        steering=steering,
        extraction=extraction,
        unknown_user=unknown_user,
    )


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (on a shared CPU, 1 avoids oversubscription)."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("--threads must be >= 1")
        import torch

        torch.set_num_threads(threads)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


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
        typer.Option(help="Steering/extraction sites, e.g. '15.attn+mlp'; default: middle layer."),
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
        str, typer.Option(help="A request naming an unknown user: 'unsteered' or '404'.")
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
        if unknown_user not in ("unsteered", "404"):
            raise FintsError(f"--unknown-user must be 'unsteered' or '404', got {unknown_user!r}")
        mode: UnknownUserMode = "404" if unknown_user == "404" else "unsteered"
        config = ServerConfig(
            model_id=model or None,
            limits=Limits(
                max_tokens=max_tokens,
                default_max_tokens=min(default_max_tokens, max_tokens),
                max_prompt_tokens=max_prompt_tokens,
            ),
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            unknown_user=mode,
            extract_on_write=extract_on_write,
            api_keys=keys,
        )
        personalizer = build_personalizer(
            model=model,
            store=store,
            template=template,
            sites=sites,
            strengths=strengths,
            relative=relative,
            top_k=top_k,
            aggregation=aggregation,
            unknown_user="error" if mode == "404" else "unsteered",
            dtype=dtype,
            device=device,
        )
    except FintsError as exc:
        raise _fail(exc) from None
    log.info(
        "serving %s on http://%s:%d (store %s, max batch %d)",
        personalizer.model.name,
        host,
        port,
        personalizer.store.path,
        max_batch_size,
    )
    app = create_app(personalizer, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower())


def loadtest(
    clients: Annotated[int, typer.Option(help="Concurrent clients (one user each).")] = 8,
    requests: Annotated[int, typer.Option(help="Requests per client.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request.")] = 32,
    items_per_user: Annotated[int, typer.Option(help="History items added per user.")] = 3,
    rounds: Annotated[
        int, typer.Option(help="Run every phase this often (results are pooled).")
    ] = 1,
    max_batch_size: Annotated[int, typer.Option(help="Batch size of the batched server.")] = 8,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            help="Batching window of the in-process servers (wide: a client that is late by a "
            "few ms on a busy machine still joins the batch)."
        ),
    ] = 100.0,
    model: Annotated[str | None, typer.Option(help="Model for the in-process server.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    store: Annotated[
        Path | None, typer.Option(help="Store for the in-process server; default: a temp file.")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Measure a running server instead (steered vs unsteered only)."),
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --url.")] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")
    ] = None,
) -> None:
    """A bounded load benchmark: latency, throughput, batching and steering cost."""
    from fints.serving.loadtest import LoadSpec, run_external, run_in_process

    logging.basicConfig(level="WARNING")
    logging.getLogger("fints.serving").setLevel(logging.ERROR)  # in-process servers: quiet
    set_threads(threads)
    try:
        spec = LoadSpec(
            clients=clients,
            requests=requests,
            max_tokens=max_tokens,
            items_per_user=items_per_user,
            rounds=rounds,
        )
        if url:
            report = run_external(url, spec, api_key=api_key)
        else:
            report = run_in_process(
                spec,
                max_batch_size=max_batch_size,
                max_wait_ms=max_wait_ms,
                model=model,
                dtype=dtype,
                store=store,
            )
    except FintsError as exc:
        raise _fail(exc) from None
    typer.echo(report.render())
    if report.errors:
        raise typer.Exit(1)
