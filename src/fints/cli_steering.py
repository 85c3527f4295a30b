"""The ``generate`` command's steering: its flags through the one parser
(``SteeringConfig.from_dict``), on top of the steering the user's extraction method
recommends (trained vectors as trained; the contrasts at a fraction of the site's norm)."""

from __future__ import annotations

from typing import Any

from fints.errors import InvalidInputError, UnknownUserError

#: The flag that sets each SteeringConfig field, for error messages.
_STEERING_FLAGS = {
    "strengths": "--attn/--mlp/--block",
    "relative": "--relative",
    "top_k": "--top-k",
    "aggregation": "--aggregation",
    "tau": "--tau",
    "icl_k": "--icl-k",
}


def steering_from_flags(settings: dict[str, Any], base: Any = None) -> Any:
    """A :class:`~fints.steering.SteeringConfig` from flag values (None: not given, the
    ``base``'s), through the same parser and error messages as the server and its
    requests; an error names the flag."""
    from fints.steering import SteeringConfig

    try:
        return SteeringConfig.from_dict(settings, base=base)
    except InvalidInputError as exc:
        flag = _STEERING_FLAGS.get(exc.param or "")
        if flag is None:
            raise
        raise InvalidInputError(f"{flag}: {exc}", param=exc.param) from None


def given_strengths(attn: float | None, mlp: float | None, block: float | None) -> Any:
    """The strengths the flags name (None where none is given)."""
    given = {k: v for k, v in (("attn", attn), ("mlp", mlp), ("block", block)) if v is not None}
    return given or None


def user_steering(engine: Any, user: str | None, tenant: str, flags: dict[str, Any]) -> Any:
    """The flags on top of the default steering of the method ``user``'s dictionary was
    made with (a user without one: the engine's method for new users)."""
    from fints.extraction import method_config

    method = engine.extraction.method
    if user is not None:
        try:
            dictionary = engine.dictionary(user, tenant=tenant)
        except UnknownUserError:
            dictionary = None
        if dictionary is not None:
            method = dictionary.meta.method
    base = steering_from_flags(method_config(method).default_steering())
    return steering_from_flags(flags, base)
