"""Turning a query (plus optional history items as context) into model input.

The system prompt is always explicit: chat templates that inject a default one
(SmolLM2's "You are a helpful AI assistant named SmolLM...") never do so behind
our back. Templates without a system role get it folded into the user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fints.errors import InvalidInputError
from fints.history import HistoryItem


@dataclass(frozen=True)
class PromptTemplate:
    """How a task is put to the model. ``{input}`` is the query or history input."""

    name: str = "generic"
    instruction: str = "{input}"
    context_header: str = "Here are examples of what I wrote before:"
    context_item: str = "Request: {input}\nMy answer: {output}"
    context_footer: str = "Answer the next request the way I would."
    system_prompt: str = "You are a helpful assistant."
    context_as_turns: bool = False  # context items as earlier chat turns, not in one message

    def messages(self, query: str, context: Sequence[HistoryItem] = ()) -> list[dict[str, str]]:
        """The chat: system prompt, context (as turns or inside the message), then the query."""
        turns = [{"role": "system", "content": self.system_prompt}]
        if self.context_as_turns:
            for item in context:
                turns.append({"role": "user", "content": self.instruction.format(input=item.input)})
                turns.append({"role": "assistant", "content": item.output})
            context = ()
        turns.append({"role": "user", "content": self.user_message(query, context)})
        return turns

    def user_message(self, query: str, context: Sequence[HistoryItem] = ()) -> str:
        task = self.instruction.format(input=query)
        if not context:
            return task
        examples = "\n\n".join(
            self.context_item.format(input=i.input, output=i.output) for i in context
        )
        return f"{self.context_header}\n\n{examples}\n\n{self.context_footer}\n\n{task}"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


TEMPLATES: dict[str, PromptTemplate] = {
    "generic": PromptTemplate(context_as_turns=True),
    "headline": PromptTemplate(
        name="headline",
        instruction="Write a headline for this article:\n{input}",
        context_header="Here are articles I wrote and the headlines I gave them:",
        context_item="Article: {input}\nMy headline: {output}",
        context_footer="Write the headline the way I would. Reply with the headline only.",
    ),
    "abstract": PromptTemplate(
        name="abstract",
        instruction="Write the abstract of a paper titled: {input}",
        context_header="Here are papers I wrote and their abstracts:",
        context_item="Title: {input}\nMy abstract: {output}",
        context_footer="Write the abstract the way I would. Reply with the abstract only.",
    ),
}


def get_template(name_or_template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    if name_or_template not in TEMPLATES:
        raise InvalidInputError(
            f"unknown prompt template {name_or_template!r}: expected one of {sorted(TEMPLATES)}"
        )
    return TEMPLATES[name_or_template]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text of a chat prompt ending where the assistant's answer starts.

    ``messages[0]`` is the system turn. Tokenizers without a chat template get
    plain text; templates that reject a system role (e.g. Gemma) get it folded
    into the first user turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        return "\n\n".join(m["content"] for m in messages) + "\n\n"
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        system, first, *rest = messages
        merged = {"role": "user", "content": f"{system['content']}\n\n{first['content']}"}
        text = tokenizer.apply_chat_template(
            [merged, *rest], tokenize=False, add_generation_prompt=True
        )
    return str(text)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # A rendered chat template already holds its special tokens; plain text gets the defaults.
    special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def build_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    query: str,
    context: Sequence[HistoryItem] = (),
) -> list[int]:
    return encode_prompt(tokenizer, render_prompt(tokenizer, template.messages(query, context)))


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, *, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists into ``(input_ids, attention_mask)``; ``side`` is 'left' or 'right'."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
