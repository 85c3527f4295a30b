"""Training data recipes (moods held out by prompt, concise/long, a user's style) and the
command line's --prefer flags."""

from __future__ import annotations

import pytest

from fints.errors import InvalidInputError
from fints.guidance.preferences import Preferences, parse_preference_flags
from fints.guidance.recipes import held_out, length_labels, read_moods, split_texts, style_texts


def test_mood_training_and_test_texts_come_from_disjoint_prompts() -> None:
    pairs = read_moods()
    train, test = split_texts(pairs, [p.mood for p in pairs], 30, 10)
    prompt_of = {p.response: p.prompt for p in pairs}
    assert not any(held_out(prompt_of[t]) for t in train.texts)
    assert all(held_out(prompt_of[t]) for t in test.texts)
    assert len(set(train.labels)) == 9 and train.labels.count("happy") == 30
    assert test.labels.count("zen") == 10


def test_length_classes_are_the_shortest_and_longest_thirds() -> None:
    kept, labels = length_labels(read_moods())
    concise = [len(p.response.split()) for p, c in zip(kept, labels, strict=True) if c == "concise"]
    long = [len(p.response.split()) for p, c in zip(kept, labels, strict=True) if c == "long"]
    assert max(concise) < min(long) and len(concise) > 1000 and len(long) > 1000


def test_style_texts_hold_out_a_share_of_each_side() -> None:
    own = [f"arr matey {i}" for i in range(10)]
    others = [f"dear sir {i}" for i in range(20)]
    train, test = style_texts(own, others, "pirate")
    assert test.labels.count("pirate") == 2 and test.labels.count("other") == 4
    assert not set(train.texts) & set(test.texts)
    with pytest.raises(InvalidInputError, match="pirate"):
        style_texts(own[:1], others, "pirate")


def test_prefer_flags_become_preferences() -> None:
    prefs = parse_preference_flags(
        ["mood=happy:0.5", "length=concise:1", "mood=zen:0.2"], "topk", 5
    )
    assert prefs == Preferences(
        {"mood": {"happy": 0.5, "zen": 0.2}, "length": {"concise": 1}}, "topk", 5
    )
    assert parse_preference_flags([]) is None


@pytest.mark.parametrize("flag", ["mood", "mood=happy", "mood=happy:lots", "=happy:1", "mood=:1"])
def test_bad_prefer_flags_say_the_format(flag: str) -> None:
    with pytest.raises(InvalidInputError, match="DIMENSION=CLASS:WEIGHT"):
        parse_preference_flags([flag])


def test_a_negative_flag_weight_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="finite number"):
        parse_preference_flags(["mood=happy:-1"])
