"""Per-request steering as plain data: what travels inside vLLM's sampling parameters.

Tensors do not survive vLLM's request serialization, so a request's vectors travel
packed: the sites' names and one base64 string of little-endian float32 values
(``[sites, hidden]``), under :data:`STEERING_KEY` in ``SamplingParams.extra_args``.
The worker unpacks them once per request into its vector bank
(:class:`fints.vllm_plugin.bank.SteeringBank`).

This module imports neither vLLM nor the engine: both sides of the wire use it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fints.errors import InvalidInputError
from fints.sites import Site

#: The key of a request's packed steering in ``SamplingParams.extra_args``.
STEERING_KEY = "fints_steering"
FORMAT_VERSION = 1
#: The largest value a packed vector may hold. Hidden states are orders of magnitude
#: smaller; a larger value overflows the model (inf, then NaN logits) and would take the
#: engine, shared by every tenant, down with it.
MAX_ABS = 1e4


def pack_steering(vectors: Mapping[Site, torch.Tensor]) -> dict[str, Any]:
    """One request's vectors (``{site: [hidden]}``, already scaled) as JSON-safe data."""
    if not vectors:
        raise InvalidInputError("no steering vectors to pack")
    sites = sorted(vectors)
    stacked = torch.stack([vectors[s].detach().reshape(-1).float().cpu() for s in sites])
    if not torch.isfinite(stacked).all():
        bad = [str(s) for s in sites if not torch.isfinite(vectors[s]).all()]
        raise InvalidInputError(f"steering vector for {', '.join(bad)} contains NaN or inf")
    if stacked.abs().max() > MAX_ABS:
        bad = [str(s) for s, row in zip(sites, stacked, strict=True) if row.abs().max() > MAX_ABS]
        raise InvalidInputError(
            f"steering vector for {', '.join(bad)} exceeds {MAX_ABS:g} in absolute value: it "
            "would overflow the model (lower fints.strengths, or use relative strengths)",
            param="fints.strengths",
        )
    raw = stacked.numpy().astype("<f4", copy=False).tobytes()
    return {
        "version": FORMAT_VERSION,
        "sites": [str(s) for s in sites],
        "hidden": int(stacked.shape[1]),
        "data": base64.b64encode(raw).decode("ascii"),
    }


def unpack_steering(packed: Mapping[str, Any]) -> dict[Site, torch.Tensor]:
    """The vectors of :func:`pack_steering`'s data, ``{site: [hidden]}`` in float32."""
    if not isinstance(packed, Mapping) or packed.get("version") != FORMAT_VERSION:
        raise InvalidInputError(f"packed steering must be version {FORMAT_VERSION} data")
    try:
        sites = [Site.parse(s) for s in packed["sites"]]
        hidden = int(packed["hidden"])
        raw = base64.b64decode(packed["data"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"packed steering is malformed: {exc}") from None
    if not sites or hidden < 1 or len(raw) != 4 * hidden * len(sites):
        raise InvalidInputError(
            f"packed steering holds {len(raw)} bytes for {len(sites)} sites of {hidden} values"
        )
    values = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
    rows = values.reshape(len(sites), hidden)
    return {site: rows[i] for i, site in enumerate(sites)}


def steering_salt(packed: Mapping[str, Any] | None) -> str | None:
    """A prefix-cache salt that differs whenever the steering does (None: unsteered, so
    the request shares cached prefixes with every other unsteered request)."""
    if packed is None:
        return None
    digest = hashlib.sha256()
    digest.update(",".join(packed["sites"]).encode())
    digest.update(packed["data"].encode())
    return "fints-" + digest.hexdigest()[:32]
