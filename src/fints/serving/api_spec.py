"""The wire format: OpenAI-compatible request and response models plus fints' extras.

Requests reject unknown fields (``extra="forbid"``), so a typo is an error the
client sees instead of a setting silently ignored. fints' own per-request
options travel in the extra ``fints`` object (the ``openai`` client sends it
with ``extra_body={"fints": {...}}``), and responses carry a ``fints`` object
saying whether and how the request was steered.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ------------------------------------------------------------------------------


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


class _GenerationRequestBody(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    user: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
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
    input: str
    output: str
    id: str | None = None


class AddInteractionsRequest(_Strict):
    items: list[InteractionItem] = Field(min_length=1)


# -- responses -----------------------------------------------------------------------------


class FintsInfo(BaseModel):
    """How a request was served: steered or not (and why), and what was retrieved."""

    user: str | None
    steered: bool
    note: str = ""
    retrieved: list[str] = Field(default_factory=list)  # the user's own item ids, best first
    weights: list[float] = Field(default_factory=list)
    batch_size: int = 1  # how many requests shared the forward passes


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
