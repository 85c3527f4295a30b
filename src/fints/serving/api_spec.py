"""The wire format: OpenAI-compatible request and response models plus fints' extras.

Requests reject unknown fields (``extra="forbid"``), so a typo is an error the
client sees instead of a setting silently ignored. fints' own per-request
options travel in the extra ``fints`` object (the ``openai`` client sends it
with ``extra_body={"fints": {...}}``), and responses carry a ``fints`` object
saying whether and how the request was steered.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from fints.generation import MAX_SEED, MIN_SEED, MIN_TEMPERATURE
from fints.history import MAX_ITEM_CHARS

#: Python's whitespace (what ``str.strip`` removes) less the control characters, spelled
#: out so that the pattern means the same in JSON Schema, pydantic and Python.
_SPACE = r"\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
#: A user name as :func:`fints.store.check_name` accepts it: no control characters and
#: something besides whitespace (at most :data:`MAX_NAME_CHARS` characters).
NAME_PATTERN = rf"^[^\x00-\x1f]*[^\x00-\x1f{_SPACE}][^\x00-\x1f]*$"
MAX_NAME_CHARS = 256
#: Text with something besides whitespace in it (history items).
NONBLANK_PATTERN = rf"[^\t-\r\x1c-\x1f{_SPACE}]"
#: What each pattern means, for error messages.
PATTERN_HELP = {
    NAME_PATTERN: "a name with something besides whitespace and no control characters",
    NONBLANK_PATTERN: "text with something besides whitespace",
}

UserName = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=MAX_NAME_CHARS)]
ItemText = Annotated[str, Field(pattern=NONBLANK_PATTERN, max_length=MAX_ITEM_CHARS)]


class _Strict(BaseModel):
    """Unknown fields are refused, and so are values of the wrong JSON type (``"8"`` for
    an integer, ``"yes"`` for a boolean), as the OpenAI API does."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _unencodable(text: str) -> bool:
    """True for text that is not valid Unicode (a lone UTF-16 surrogate such as ``\\ud800``,
    which JSON can carry and UTF-8 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(path: str) -> str:
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid_text_at(value: Any, path: str = "") -> str | None:
    """The path (``messages[0].content``) of the first string in ``value`` (keys included)
    that is not valid Unicode, or None."""
    if isinstance(value, str):
        return (path or "body") if _unencodable(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _unencodable(key):
                return _printable(where)
            found = invalid_text_at(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for n, item in enumerate(value):
            found = invalid_text_at(item, f"{path}[{n}]")
            if found is not None:
                return found
    return None


class _Body(_Strict):
    """A request body: every string in it (keys too) must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = invalid_text_at(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "contains a lone UTF-16 surrogate (e.g. \\ud800): text must be valid Unicode",
                {"param": _printable(where)},
            )
        return data


# -- requests ------------------------------------------------------------------------------


class GuidanceOptions(_Strict):
    """How guidance scores candidates: every vocabulary token, or the base top_k (FUDGE);
    ``plausible`` = rho > 0: only tokens with base probability >= rho x the step's largest
    may be chosen (0: no constraint)."""

    method: Literal["full", "topk"] = "full"
    top_k: int = Field(default=20, ge=1, le=1024)
    plausible: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)


class FintsOptions(_Strict):
    """Per-request steering options; anything left out takes the server's default."""

    enabled: bool | None = None
    top_k: int | None = Field(default=None, ge=1, le=256)
    strengths: dict[str, float] | None = None  # component (attn, mlp, block) -> strength
    sites: list[str] | str | None = None  # e.g. ["15.attn"] or "15.attn+mlp"
    aggregation: Literal["mean", "attentive"] | None = None
    tau: float | None = Field(default=None, gt=0)
    relative: bool | None = None
    icl_k: int | None = Field(default=None, ge=0, le=32)
    # classifier guidance: {"mood": {"happy": 0.5}} (a classifier's name -> class -> weight)
    preferences: dict[str, dict[str, float]] | None = None
    guidance: GuidanceOptions | None = None
    # the user's LoRA adapter: left out, used if they have one; false, off; true, required
    adapter: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequestBody(_Body):
    """Fields shared by chat and text completions."""

    model: str
    user: UserName | None = None
    max_tokens: int | None = None
    #: 0 is greedy; a positive temperature below MIN_TEMPERATURE overflows the logits
    temperature: float | None = Field(
        default=None,
        ge=0,
        le=2,
        json_schema_extra={
            "not": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": MIN_TEMPERATURE}
        },
    )
    top_p: float | None = Field(default=None, gt=0, le=1)
    #: > 1 makes tokens already in the row less likely (1: off); vLLM's extension of the API
    repetition_penalty: float | None = Field(default=None, ge=1, le=10)
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    fints: FintsOptions | None = None


class ChatCompletionRequest(_GenerationRequestBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_GenerationRequestBody):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class InteractionItem(_Strict):
    input: ItemText
    output: ItemText
    id: str | None = None


class AddInteractionsRequest(_Body):
    items: list[InteractionItem] = Field(min_length=1)


# -- responses -----------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, not_found_error, ...
    param: str | None = None  # the offending parameter, e.g. "messages[0].content"
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers, in the OpenAI format."""

    error: ErrorDetail


class FintsInfo(BaseModel):
    """How a request was served: steered or not (and why), and what was retrieved."""

    user: str | None
    steered: bool
    note: str = ""
    retrieved: list[str] = Field(default_factory=list)  # the user's own item ids, best first
    weights: list[float] = Field(default_factory=list)
    batch_size: int = 1  # how many requests shared the forward passes
    adapter: str | None = None  # whose LoRA adapter served the request (None: none)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    fints: FintsInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    fints: FintsInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    fints: FintsInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fints"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AddInteractionsResponse(BaseModel):
    user: str
    added: int
    ids: list[str]
    extracted: bool  # the new items' vectors are in the user's dictionary already


class StoredInteraction(BaseModel):
    id: str
    input: str
    output: str
    extracted: bool


class InteractionList(BaseModel):
    object: Literal["list"] = "list"
    user: str
    data: list[StoredInteraction]


class DeletedUser(BaseModel):
    user: str
    deleted: bool = True
