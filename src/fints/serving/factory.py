"""From command-line options to the server's objects; shared by ``fints serve`` and
``fints loadtest``.

Steering defaults go through :meth:`SteeringConfig.from_dict`, the parser behind
a request's ``fints`` field too, so a mistake gets the same message on the
command line and over HTTP.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fints.engine import Personalizer, UnknownUser
from fints.errors import FintsError
from fints.extraction import DEFAULT_METHOD, ExtractionConfig, method_config
from fints.history import ITEM_PROMPT_TOKENS
from fints.models import load_model
from fints.paths import default_store_path
from fints.sites import check_layers_in_range, parse_sites
from fints.steering import SteeringConfig
from fints.store import Store


def parse_strengths(spec: str) -> dict[str, float]:
    """``"attn=0.5,mlp=1"`` -> ``{"attn": 0.5, "mlp": 1.0}``; components are checked by
    :meth:`SteeringConfig.from_dict`."""
    strengths: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise FintsError(f"cannot parse strength {part.strip()!r}: missing '='")
        try:
            strengths[name.strip()] = float(value)
        except ValueError:
            raise FintsError(
                f"cannot parse strength {part.strip()!r}: expected COMPONENT=NUMBER, "
                "e.g. 'attn=0.5,mlp=0.5'"
            ) from None
    return strengths


def default_steering(
    *,
    strengths: str | None = None,
    relative: bool = False,
    top_k: int = 5,
    aggregation: str = "attentive",
) -> SteeringConfig:
    """The server's default steering from its options (errors name the setting)."""
    return SteeringConfig.from_dict(
        {
            "strengths": parse_strengths(strengths) if strengths else None,
            "relative": relative,
            "top_k": top_k,
            "aggregation": aggregation,
        }
    )


def parse_unknown_user(flag: str) -> UnknownUser:
    """``--unknown-user``: ``unsteered``; ``404`` (or ``error``) is :attr:`UnknownUser.ERROR`."""
    if flag == "404":
        return UnknownUser.ERROR
    try:
        return UnknownUser(flag)
    except ValueError:
        raise FintsError(f"--unknown-user must be 'unsteered' or '404', got {flag!r}") from None


def build_personalizer(
    *,
    model: str | None = None,
    store: Path | None = None,
    template: str = "generic",
    sites: str | None = None,
    method: str | None = None,
    steering: SteeringConfig | None = None,
    unknown_user: UnknownUser = UnknownUser.UNSTEERED,
    dtype: str = "auto",
    device: str = "cpu",
    item_prompt_tokens: int | None = ITEM_PROMPT_TOKENS,
) -> Personalizer:
    """Load the model and open the store; ``steering`` is the server's default, ``method``
    the extraction method (a name in ``fints.extraction.METHODS``; None: trained) for a new
    user's history, at ``sites`` (None: the method's own default sites)."""
    method_config(method or DEFAULT_METHOD)  # an unknown method fails before the model loads
    loaded = load_model(model, dtype=dtype, device=device)
    # None: the default method (trained) and the method's own default sites
    extraction = ExtractionConfig.for_model(
        loaded.num_layers, method=method, sites=parse_sites(sites) if sites else None
    )
    check_layers_in_range(extraction.sites, loaded.num_layers)
    return Personalizer(
        loaded,
        Store(store or default_store_path()),
        template=template,
        steering=steering,
        extraction=extraction,
        unknown_user=unknown_user,
        item_prompt_tokens=item_prompt_tokens,
    )


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (on a shared CPU, 1 avoids oversubscription)."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("--threads must be >= 1")
        import torch

        torch.set_num_threads(threads)


def command_failed(exc: Exception) -> typer.Exit:
    """Print a command's error and the exit to raise (status 2)."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)
