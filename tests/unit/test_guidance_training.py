"""Training a classifier head on a frozen backbone: it learns separable classes, reports
its held-out accuracy, and guiding with it moves the generator towards the class."""

from __future__ import annotations

import random

import pytest
import torch

from fints.errors import InvalidInputError
from fints.guidance.classifier import Backbone
from fints.guidance.training import LabelledTexts, TrainConfig, train_classifier
from tests.unit.benchmark_fixtures import tiny_llama

WORDS = {"sunny": "sun bright joy smile laugh dance", "rainy": "rain grey cold drip mud wet"}


def texts(n: int, seed: int) -> LabelledTexts:
    rng = random.Random(seed)
    rows = [
        (" ".join(rng.choice(WORDS[c].split()) for _ in range(8)), c)
        for _ in range(n)
        for c in WORDS
    ]
    return LabelledTexts(tuple(t for t, _ in rows), tuple(c for _, c in rows))


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone(tiny_llama(), layers=2)


def test_a_head_learns_separable_classes(backbone: Backbone) -> None:
    calls: list[str] = []
    clf = train_classifier(
        "weather",
        backbone,
        texts(40, 0),
        texts(10, 1),
        TrainConfig(epochs=30, lr=1e-2, batch_tokens=256),
        progress=lambda stage, done, total: calls.append(stage),
    )
    metrics = clf.config.metrics
    assert clf.classes == ("rainy", "sunny")
    assert metrics["test"]["texts"] == 20 and metrics["chance"] == 0.5
    assert metrics["test"]["text_accuracy"] >= 0.9, metrics
    assert metrics["test"]["token_accuracy"] >= 0.75, metrics
    assert {"features", "head"} <= set(calls)
    # the full-vocabulary head ranks each class's own words higher for that class
    tok = backbone.tokenizer
    sun = tok(" sun", add_special_tokens=False)["input_ids"][0]
    rain = tok(" rain", add_special_tokens=False)["input_ids"][0]
    states, _ = backbone.forward(torch.tensor([[*clf.config.lead_ids, sun]]))
    log_p = clf.log_probs_full(states[:, -1])[0]
    sunny = clf.classes.index("sunny")
    assert log_p[sun, sunny] > log_p[rain, sunny]


def test_test_labels_must_be_training_classes(backbone: Backbone) -> None:
    bad = LabelledTexts(("a b c",), ("snowy",))
    with pytest.raises(InvalidInputError, match="snowy"):
        train_classifier("weather", backbone, texts(2, 0), bad, TrainConfig(epochs=1))


def test_one_class_is_refused(backbone: Backbone) -> None:
    with pytest.raises(InvalidInputError, match="two classes"):
        train_classifier("w", backbone, LabelledTexts(("a", "b"), ("x", "x")))
