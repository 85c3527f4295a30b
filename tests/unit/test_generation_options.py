"""Decoding options: the repetition penalty."""

from __future__ import annotations

import pytest

from fints.errors import InvalidInputError
from fints.generation import GenerationOptions, generate_batch
from tests.unit.benchmark_fixtures import tiny_llama


def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


def test_a_repetition_penalty_makes_a_looping_row_repeat_less_and_one_is_off() -> None:
    model = tiny_llama()
    prompts = [[5, 6, 7, 8], [100] * 8]
    plain = generate_batch(model, prompts, GenerationOptions(max_new_tokens=64, ignore_eos=True))
    off = generate_batch(
        model,
        prompts,
        GenerationOptions(max_new_tokens=64, ignore_eos=True, repetition_penalty=1.0),
    )
    penalized = generate_batch(
        model,
        prompts,
        GenerationOptions(max_new_tokens=64, ignore_eos=True, repetition_penalty=5.0),
    )
    assert [c.token_ids for c in off] == [c.token_ids for c in plain]
    assert sum(repeats(c.token_ids) for c in plain) > 0  # the random model loops
    assert sum(repeats(c.token_ids) for c in penalized) < sum(repeats(c.token_ids) for c in plain)


@pytest.mark.parametrize("value", [0.5, 0.0, -1.0, 11.0, float("nan"), float("inf"), True])
def test_a_repetition_penalty_outside_1_to_10_is_refused_by_name(value: float) -> None:
    with pytest.raises(InvalidInputError, match="repetition_penalty"):
        GenerationOptions(repetition_penalty=value)
