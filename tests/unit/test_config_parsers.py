"""The LoRA training config and the guidance classifier config refuse bad JSON with a
clear error naming the field, never a TypeError or KeyError (property-based)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fints.adapters.config import LoraTrainConfig
from fints.errors import FintsError, InvalidInputError
from fints.guidance.classifier import ClassifierConfig

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)

VALID_CLASSIFIER: dict[str, Any] = {
    "name": "mood",
    "classes": ["happy", "sad"],
    "backbone": "smollm2",
    "backbone_fingerprint": "abc",
    "tokenizer_fingerprint": "def",
    "layers": 10,
    "hidden_size": 576,
    "lead_ids": [1, 2],
    "metrics": {},
    "format": 1,
}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*LoraTrainConfig().to_dict(), "other"]), JSON))
def test_a_lora_config_from_any_json_is_valid_or_a_clear_error(data: dict[str, Any]) -> None:
    try:
        config = LoraTrainConfig.from_dict(data)
    except InvalidInputError:
        return
    assert LoraTrainConfig.from_dict(config.to_dict()) == config


def test_lora_target_modules_that_are_not_a_list_are_named() -> None:
    for bad in (None, "q_proj", 3):
        with pytest.raises(InvalidInputError, match="target_modules"):
            LoraTrainConfig.from_dict({"target_modules": bad})


def test_the_valid_classifier_config_loads_and_round_trips() -> None:
    config = ClassifierConfig.from_dict(dict(VALID_CLASSIFIER))
    assert ClassifierConfig.from_dict(config.to_dict()) == config


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(VALID_CLASSIFIER)), JSON, st.booleans())
def test_a_classifier_config_with_a_field_changed_or_dropped_is_valid_or_a_clear_error(
    field: str, value: Any, drop: bool
) -> None:
    data = dict(VALID_CLASSIFIER)
    if drop:
        del data[field]
    else:
        data[field] = value
    try:
        ClassifierConfig.from_dict(data)
    except FintsError as exc:
        assert field in str(exc) or "format" in str(exc) or "classes" in str(exc)


def test_format_true_is_not_format_one() -> None:
    with pytest.raises(FintsError, match="format"):
        ClassifierConfig.from_dict({**VALID_CLASSIFIER, "format": True})
