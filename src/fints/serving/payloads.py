"""Turning validated API payloads into engine objects, with OpenAI-style errors.

Everything here is pure (no model, no store): a payload either becomes a
:class:`~fints.engine.GenerationRequest` with its :class:`GenerationOptions`,
or an :class:`ApiError` that names the offending parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fints.engine import GenerationRequest
from fints.errors import InvalidInputError
from fints.generation import GenerationOptions
from fints.guidance.mode import GuidanceMode
from fints.guidance.preferences import Preferences
from fints.history import HistoryItem, check_unique_ids
from fints.prompts import PromptTemplate, render_prompt
from fints.serving.api_errors import ApiError
from fints.serving.api_spec import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FintsOptions,
    InteractionItem,
)
from fints.sites import check_layers_in_range
from fints.steering import SteeringConfig
from fints.stopping import check_stops, cut_at_stop
from fints.store import check_name

MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_tokens: int = 512  # the most new tokens a request may ask for
    default_max_tokens: int = 128  # when the request does not say
    max_prompt_tokens: int = 2048  # after the chat template (and in-context items)
    max_items_per_request: int = 256  # history items in one POST
    default_temperature: float = 0.0  # greedy unless the request asks otherwise

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_tokens <= self.max_tokens <= 4096:
            raise InvalidInputError(
                "limits need 1 <= default_max_tokens <= max_tokens <= 4096, got "
                f"{self.default_max_tokens} and {self.max_tokens}"
            )
        if self.max_prompt_tokens < 1 or self.max_items_per_request < 1:
            raise InvalidInputError("max_prompt_tokens and max_items_per_request must be >= 1")

    @property
    def max_prompt_chars(self) -> int:
        """A cheap bound checked before tokenizing (no tokenizer averages 32 chars a token)."""
        return 32 * self.max_prompt_tokens


#: How much of a client's string an error message quotes.
MAX_ECHO_CHARS = 100


def echo(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_model(name: str, served: Sequence[str]) -> None:
    if name not in served:
        raise ApiError(
            404,
            f"The model {echo(name)} does not exist on this server; it serves {list(served)}. "
            "See GET /v1/models.",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )


def check_user(user: str, param: str = "user") -> str:
    try:
        return check_name("user", user)
    except InvalidInputError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_user") from None


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{param}: {what} is not supported by this server", param=param)


def check_common(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Reject OpenAI parameters this server cannot honour (rather than ignoring them)."""
    if body.n != 1:
        raise _unsupported("n", f"n={body.n} (only n=1)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise _unsupported(name, "a non-zero penalty")
    if body.logit_bias:
        raise _unsupported("logit_bias", "logit bias")
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            400, "stream_options is only allowed with stream=true", param="stream_options"
        )
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs or body.top_logprobs:
            raise _unsupported("logprobs", "returning log probabilities")
    else:
        if body.echo:
            raise _unsupported("echo", "echoing the prompt")
        if body.logprobs is not None:
            raise _unsupported("logprobs", "returning log probabilities")
        if body.best_of not in (None, 1):
            raise _unsupported("best_of", f"best_of={body.best_of}")
        if body.suffix:
            raise _unsupported("suffix", "a suffix (insertion)")


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
    try:
        return check_stops(stops)
    except InvalidInputError as exc:
        raise ApiError(400, str(exc), param="stop") from None


def generation_options(
    body: ChatCompletionRequest | CompletionRequest, limits: Limits
) -> GenerationOptions:
    param = "max_tokens"
    requested = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        param, requested = "max_completion_tokens", body.max_completion_tokens
    if requested is None:
        requested = limits.default_max_tokens
    if requested < 1:
        raise ApiError(400, f"{param} must be at least 1, got {requested}", param=param)
    if requested > limits.max_tokens:
        raise ApiError(
            400,
            f"{param} is {requested}, but this server allows at most {limits.max_tokens} "
            "new tokens per request",
            param=param,
            code="max_tokens_exceeded",
        )
    temperature = limits.default_temperature if body.temperature is None else body.temperature
    try:
        return GenerationOptions(
            max_new_tokens=requested,
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            repetition_penalty=body.repetition_penalty or 1.0,
        )
    except InvalidInputError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None


def steering_config(
    default: SteeringConfig, options: FintsOptions | None, num_layers: int
) -> SteeringConfig:
    """The server's default steering with the request's ``fints`` overrides applied.

    Parsed by :meth:`SteeringConfig.from_dict`, as the server's defaults are, so a
    mistake gets the same message everywhere; ``param`` names the field (``fints.tau``).
    """
    if options is None:
        return default
    try:
        not_steering = {"preferences", "guidance", "adapter"}
        settings = options.model_dump(exclude_none=True, exclude=not_steering)
        config = SteeringConfig.from_dict(settings, base=default)
    except InvalidInputError as exc:
        param = f"fints.{exc.param}" if exc.param else "fints"
        raise ApiError(400, str(exc), param=param) from None
    if options.sites is not None and config.sites is not None:
        try:
            check_layers_in_range(config.sites, num_layers)
        except InvalidInputError as exc:
            raise ApiError(400, str(exc), param="fints.sites") from None
    return config


def guidance_preferences(
    options: FintsOptions | None, modes: Sequence[Any], tokenizer: Any
) -> Preferences | None:
    """The request's ``fints.preferences``, checked against the server's classifiers (names,
    classes, tokenizer) before the request is queued: 400 naming the problem."""
    if options is None or options.preferences is None:
        return None
    how = options.guidance.model_dump() if options.guidance is not None else None
    try:
        prefs = Preferences.from_dict({"preferences": options.preferences, "guidance": how})
        mode = next((m for m in modes if isinstance(m, GuidanceMode)), None)
        if mode is None:
            raise InvalidInputError("this server does not run classifier guidance")
        if prefs is not None:
            mode.check(prefs, tokenizer)
    except InvalidInputError as exc:
        raise ApiError(400, str(exc), param=f"fints.{exc.param or 'preferences'}") from None
    return prefs


def chat_prompt(
    messages: Sequence[ChatMessage], tokenizer: Any, template: PromptTemplate
) -> tuple[str, bool]:
    """``(text, raw)``: one user message goes through the server's prompt template (as in
    extraction); a conversation is rendered whole with the model's chat template."""
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must have role 'user'", param="messages")
    if len(messages) == 1:
        return messages[0].text(), False
    turns = [
        {"role": "system" if m.role in ("system", "developer") else m.role, "content": m.text()}
        for m in messages
    ]
    if turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": template.system_prompt})
    return render_prompt(tokenizer, turns), True


def completion_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(
                400,
                f"exactly one prompt per request is supported, got {len(prompt)}",
                param="prompt",
            )
        return prompt[0]
    return prompt


def generation_request(
    *,
    user: str | None,
    tenant: str,
    text: str,
    raw: bool,
    steering: SteeringConfig,
    stops: tuple[str, ...],
    limits: Limits,
    param: str,
    preferences: Preferences | None = None,
    adapter: bool | None = None,
) -> GenerationRequest:
    if len(text) > limits.max_prompt_chars:
        raise ApiError(
            400,
            f"the prompt has {len(text)} characters; this server accepts at most "
            f"{limits.max_prompt_tokens} prompt tokens",
            param=param,
            code="context_length_exceeded",
        )
    try:
        return GenerationRequest(
            user,
            text,
            tenant=tenant,
            steering=steering,
            raw_prompt=raw,
            stop=stops,
            preferences=preferences,
            adapter=adapter,
        )
    except InvalidInputError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param) from None


def history_items(items: Sequence[InteractionItem], limits: Limits) -> list[HistoryItem]:
    if len(items) > limits.max_items_per_request:
        raise ApiError(
            400,
            f"{len(items)} items in one request; the limit is {limits.max_items_per_request}",
            param="items",
        )
    converted = []
    for n, item in enumerate(items):
        try:
            converted.append(HistoryItem(item.input, item.output, item.id or ""))
        except InvalidInputError as exc:
            raise ApiError(400, f"items[{n}]: {exc}", param=f"items[{n}]") from None
    try:
        check_unique_ids(converted)
    except InvalidInputError as exc:
        raise ApiError(400, str(exc), param="items") from None
    return converted


class StopFilter:
    """Streams text up to the first stop sequence, holding back what may start one.

    Decoding itself ends at the stop sequence (:mod:`fints.stopping`); this cuts
    the deltas already on their way, so a stream and a whole response agree.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = list(stops)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._held += text
        out, self.stopped = cut_at_stop(self._held, self._stops)
        if self.stopped:
            self._held = ""
            return out
        keep = max(
            (n for s in self._stops for n in range(1, len(s)) if self._held.endswith(s[:n])),
            default=0,
        )
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out
