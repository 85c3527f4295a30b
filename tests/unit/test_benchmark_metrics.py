"""Benchmark metrics: ROUGE, paired bootstrap, the text judge, style statistics."""

from __future__ import annotations

import numpy as np
import pytest

from fints.benchmark.labels import Metric
from fints.benchmark.metrics import (
    TextClassifier,
    paired_bootstrap,
    rouge,
    style_stats,
    title_case_ratio,
)
from fints.errors import InvalidInputError


def test_rouge_uses_the_stemmer_and_scores_pairs():
    scores = rouge(["the cats are running", "", "x"], ["the cat runs", "nothing", "x"])
    assert scores.rouge1[0] == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))  # cat~cats, run~running
    assert scores.rouge1[1] == 0.0  # an empty output scores zero
    assert scores.rougeL[2] == 1.0


def test_rouge_means_and_lookups_by_metric():
    scores = rouge(["x y", "x"], ["x y", "y"])
    assert scores.mean() == {Metric.ROUGE1: 0.5, Metric.ROUGEL: 0.5}
    assert scores.get(Metric.ROUGEL) is scores.rougeL
    with pytest.raises(InvalidInputError, match="unknown ROUGE type 'judge'"):
        scores.get(Metric.JUDGE)


def test_rouge_needs_one_reference_per_prediction():
    with pytest.raises(InvalidInputError):
        rouge(["a"], ["a", "b"])


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 300)
    better = base + 0.05 + rng.normal(0, 0.01, 300)
    diff = paired_bootstrap(better, base, seed=1)
    assert diff.low < diff.mean < diff.high
    assert diff.above_zero and diff.mean == pytest.approx(0.05, abs=0.005)
    same = paired_bootstrap(base + rng.normal(0, 0.1, 300), base)
    assert same.low < 0 < same.high
    assert "[" in str(diff)
    with pytest.raises(InvalidInputError):
        paired_bootstrap([1.0], [1.0, 2.0])


@pytest.fixture()
def judge():
    texts = [f"WATCH: Story {i} Stuns Everyone" for i in range(8)] + [
        f"here's why story {i} matters, explained" for i in range(8)
    ]
    return TextClassifier().fit(texts, ["ada"] * 8 + ["bo"] * 8)


def test_text_classifier_names_the_writer(judge):
    hits = judge.hit_rate(
        ["WATCH: Budget Stuns Everyone", "here's why rain matters"], ["ada", "bo"]
    )
    assert hits.tolist() == [1.0, 1.0]


def test_text_classifier_takes_empty_outputs(judge):
    assert judge.predict([""])[0] in ("ada", "bo")


def test_text_classifier_needs_two_classes():
    with pytest.raises(InvalidInputError, match="two classes"):
        TextClassifier().fit(["a", "b"], ["x", "x"])


def test_style_stats_against_history():
    assert title_case_ratio("Hello World again") == pytest.approx(2 / 3)
    stats = style_stats(
        ["Big News Today", "a b c d e f"],
        ["ada", "bo"],
        {"ada": ["Some Title Here"], "bo": ["lower case words here now ok"]},
    )
    assert stats.words == pytest.approx(4.5)
    assert stats.length_gap == pytest.approx(0.0)
    assert stats.casing_gap == pytest.approx(0.0)
