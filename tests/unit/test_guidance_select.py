"""The CLIPer bench's choice of a guided setting on validation prompts (a pure rule), the
validation prompts kept apart from the test and judge prompts, and the Holm-corrected
comparisons of the validated row."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fints.benchmark.guidance_select import (
    Scored,
    Setting,
    compare_validated,
    select_setting,
    split_validation,
)
from fints.errors import InvalidInputError

A, B, C, D = Setting(0.5), Setting(1.0), Setting(1.0, 0.3), Setting(2.0, 0.1)


def test_the_highest_mood_rate_within_the_perplexity_bound_wins() -> None:
    scored = [
        Scored(A, 0.20, 1.30),
        Scored(B, 0.60, 3.00),  # the best rate, far beyond the bound
        Scored(C, 0.35, 1.45),
        Scored(D, 0.35, 1.20),  # same rate as C, more fluent: the tie goes to it
    ]
    chosen = select_setting(scored, none_rate=0.11)
    assert chosen.setting == D and chosen.rule == "within"
    assert chosen.label == "guided, validated (a=2, rho=0.1)"
    assert select_setting(scored, 0.11, max_ratio=1.25).setting == D
    assert select_setting(scored, 0.11, max_ratio=1.4).setting == D
    assert select_setting(scored, 0.11, max_ratio=1.1).rule == "beats-none"


def test_the_bound_is_inclusive_and_within_beats_a_better_rate_outside() -> None:
    chosen = select_setting([Scored(A, 0.11, 1.5), Scored(B, 0.9, 1.51)], none_rate=0.11)
    assert chosen.setting == A and chosen.rule == "within"  # even though it ties none


def test_none_within_the_bound_takes_the_most_fluent_that_beats_none() -> None:
    scored = [Scored(A, 0.10, 1.6), Scored(B, 0.50, 3.0), Scored(C, 0.30, 1.9)]
    chosen = select_setting(scored, none_rate=0.11)
    assert chosen.setting == C and chosen.rule == "beats-none"
    assert "no setting within 1.5x" in chosen.why


def test_nothing_beats_none_takes_the_highest_rate() -> None:
    scored = [Scored(A, 0.05, 1.6), Scored(B, 0.10, 3.0), Scored(C, 0.10, 1.9)]
    chosen = select_setting(scored, none_rate=0.11)
    assert chosen.setting == C and chosen.rule == "best-rate"  # tie on rate: more fluent
    with pytest.raises(InvalidInputError):
        select_setting([], 0.1)


def test_labels_name_rho_only_when_it_is_on() -> None:
    assert A.label == "guided a=0.5" and C.label == "guided a=1 rho=0.3"


def test_validation_prompts_never_overlap_the_test_or_judge_prompts() -> None:
    ordered = [f"q{n}" for n in range(12)]
    test, valid = split_validation(ordered, judge={"j1", "j2"}, n_test=8, n_valid=4)
    assert test == ordered[:8] and valid == ordered[8:]
    assert not set(test) & set(valid)
    assert split_validation(ordered, set(), 3, 0) == (ordered[:3], [])
    with pytest.raises(InvalidInputError, match="held out"):
        split_validation(ordered, set(), 10, 5)
    with pytest.raises(AssertionError, match="overlap"):
        split_validation(["a", "b", "a"], set(), 2, 1)
    with pytest.raises(AssertionError, match="judge"):
        split_validation(["a", "b", "c"], {"c"}, 2, 1)


@dataclass
class Judged:
    condition: str
    mood: str
    prompt: str
    hit: float


def test_the_validated_row_is_compared_with_three_baselines_holm_corrected() -> None:
    answers = []
    for n in range(10):
        for mood in ("happy", "sad"):
            q = f"q{n}"
            answers += [
                Judged("best", mood, q, 1.0),
                Judged("none", mood, q, 0.0),
                Judged("prompting", mood, q, float(n % 2)),
                Judged("icl", mood, q, float(n < 2)),
            ]
    out = compare_validated(answers, "best", seed=0)
    assert set(out) == {"none", "prompting", "icl"}
    assert out["none"]["mean"] == 1.0 and out["prompting"]["mean"] == 0.5
    assert out["icl"]["mean"] == pytest.approx(0.8)
    for d in out.values():
        assert d["prompts"] == 10
        assert d["p_holm"] >= d["p"]
        assert d["lo_simultaneous"] <= d["lo"] and d["hi"] <= d["hi_simultaneous"]
    assert out["none"]["above_zero"]
    # 10 prompts, all differences 1: exact sign-flip p = 2 / 2**10, times 3 at most
    assert out["none"]["p_holm"] <= 3 * 2 / 2**10
