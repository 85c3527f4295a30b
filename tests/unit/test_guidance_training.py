"""Training a classifier head on a frozen backbone: it learns separable classes, reports
its held-out accuracy, and guiding with it moves the generator towards the class; the
loss weights classes by inverse frequency, and a temperature fitted on held-out texts
lowers their class NLL and is kept in the config (old configs load with T = 1)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from fints.errors import InvalidInputError
from fints.guidance.classifier import (
    Backbone,
    ClassifierConfig,
    GuidanceClassifier,
    load_classifier,
    read_config,
)
from fints.guidance.training import (
    Features,
    LabelledTexts,
    TrainConfig,
    calibration_split,
    class_nll,
    class_weights,
    compute_features,
    encode_texts,
    fit_temperature,
    token_logits,
    train_classifier,
    train_head,
)
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


def noisy(n: int, seed: int, flip: float = 0.3) -> LabelledTexts:
    """Like :func:`texts`, a share of the labels flipped: a head trained to fit them is
    overconfident on held-out texts."""
    rng = random.Random(seed)
    base = texts(n, seed)
    other = {"sunny": "rainy", "rainy": "sunny"}
    labels = tuple(other[c] if rng.random() < flip else c for c in base.labels)
    return LabelledTexts(base.texts, labels)


def test_the_fitted_temperature_minimizes_the_held_out_nll(backbone: Backbone) -> None:
    config = TrainConfig(epochs=40, lr=3e-2, batch_tokens=128)
    clf = train_classifier("weather", backbone, noisy(30, 0), noisy(15, 1), config)
    cal = clf.config.metrics["calibration"]
    t = clf.temperature
    assert cal["temperature"] == round(t, 4) and cal["on"] == "test"
    assert t > 1.5, cal  # overfit to noisy labels: overconfident, so flattened
    assert cal["nll_after"] < cal["nll_before"] - 0.05, cal
    # recomputed from the saved classifier's own log-probabilities on the test texts
    test = noisy(15, 1)
    index = {c: n for n, c in enumerate(clf.classes)}
    held = compute_features(
        backbone,
        encode_texts(backbone.tokenizer, test.texts, config.max_tokens),
        [index[c] for c in test.labels],
    )
    logits = token_logits(clf.head, clf.embeddings, held)
    w = class_weights(held.labels, 2, balanced=True)
    assert class_nll(logits, held.labels, w, t) == pytest.approx(cal["nll_after"], abs=1e-4)
    assert class_nll(logits, held.labels, w) == pytest.approx(cal["nll_before"], abs=1e-4)
    for other in (t / 1.2, t * 1.2):  # a minimum: both neighbours are worse
        assert class_nll(logits, held.labels, w, other) > class_nll(logits, held.labels, w, t)
    e = clf.embeddings[held.next_ids].unsqueeze(1)
    log_p = clf.log_probs_candidates(held.hidden, held.next_ids[:, None])[:, 0]
    torch.testing.assert_close(
        log_p, (clf.head.candidates(held.hidden, e)[:, 0] / t).log_softmax(-1)
    )


def synthetic(scale: float, n: int = 6000) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``scale`` times those the labels were drawn from."""
    g = torch.Generator().manual_seed(0)
    truth = 1.5 * torch.randn(n, 3, generator=g)
    labels = torch.multinomial(truth.softmax(-1), 1, generator=g)[:, 0]
    return scale * truth, labels


def test_temperature_scaling_undoes_an_overconfident_scale_and_keeps_a_calibrated_one() -> None:
    logits, labels = synthetic(6.0)
    t = fit_temperature(logits, labels)
    assert 5.0 < t < 7.2, t
    assert class_nll(logits, labels, temperature=t) < class_nll(logits, labels) - 0.5
    calibrated, labels = synthetic(1.0)
    t = fit_temperature(calibrated, labels)
    assert 0.9 < t < 1.1, t
    assert class_nll(calibrated, labels, temperature=t) <= class_nll(calibrated, labels)
    under, labels = synthetic(0.25)
    assert 0.2 < fit_temperature(under, labels) < 0.3  # too flat: sharpened (T < 1)
    useless = torch.randn(500, 2, generator=torch.Generator().manual_seed(3)) * 20
    random_labels = torch.randint(0, 2, (500,), generator=torch.Generator().manual_seed(4))
    assert fit_temperature(useless, random_labels) == pytest.approx(100.0, rel=1e-3)  # the bound


def test_balanced_weights_make_each_class_count_as_much_in_total() -> None:
    labels = torch.tensor([0] * 9 + [1])
    w = class_weights(labels, 2, balanced=True)
    torch.testing.assert_close(w, torch.tensor([10 / 18, 10 / 2]))
    assert float(w[labels].sum()) == pytest.approx(10.0)  # averages 1 per position
    assert torch.equal(class_weights(labels, 2, balanced=False), torch.ones(2))
    assert class_weights(torch.tensor([0, 0, 2]), 3, balanced=True).tolist() == [0.75, 0.0, 1.5]
    # the weighted loss is the mean of the classes' mean losses
    logits = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    per = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    mean_of_means = (per[:9].mean() + per[9]) / 2
    assert class_nll(logits, labels, w) == pytest.approx(float(mean_of_means), abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, labels, w)
    assert float(loss) == pytest.approx(float(mean_of_means), abs=1e-6)
    assert abs(float(mean_of_means) - float(per.mean())) > 1e-3


def test_a_balanced_head_does_not_learn_the_majority_class() -> None:
    """With nothing to tell the classes apart (all hidden states 0), the head learns the
    class prior: 9 to 1 unweighted, 1 to 1 balanced."""
    n, hidden = 1000, 8
    labels = torch.tensor([0] * 900 + [1] * 100)
    features = Features(
        torch.zeros(n, hidden), torch.zeros(n, dtype=torch.long), torch.arange(n), labels
    )
    embeddings = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0))
    p = {}
    for balanced in (False, True):
        config = TrainConfig(epochs=40, lr=5e-2, batch_tokens=250, balanced=balanced)
        head = train_head(features, embeddings, 2, config)
        p[balanced] = float(token_logits(head, embeddings, features).softmax(-1)[0, 0])
    assert p[False] == pytest.approx(0.9, abs=0.02), p
    assert p[True] == pytest.approx(0.5, abs=0.02), p


def test_without_a_test_set_a_share_of_the_training_texts_calibrates(backbone: Backbone) -> None:
    train = noisy(10, 0)
    fit, held = calibration_split(train, 0.2, seed=0) or (None, None)
    assert fit is not None and held is not None
    assert len(fit.texts) + len(held.texts) == len(train.texts)
    for c in set(train.labels):
        n = train.labels.count(c)
        assert held.labels.count(c) == min(n - 1, max(1, round(0.2 * n))) and c in fit.labels
    assert sorted(fit.texts + held.texts) == sorted(train.texts)
    clf = train_classifier("weather", backbone, train, None, TrainConfig(epochs=3))
    cal = clf.config.metrics["calibration"]
    assert cal["on"] == "a held-out share of the training texts" and cal["texts"] == len(held.texts)
    assert clf.config.metrics["train_texts"] == len(fit.texts)
    assert cal["nll_after"] <= cal["nll_before"]
    assert calibration_split(LabelledTexts(("a", "b", "c"), ("x", "x", "y")), 0.2) is None
    off = train_classifier("w", backbone, train, None, TrainConfig(epochs=1, calibrate=False))
    assert off.temperature == 1.0 and "calibration" not in off.config.metrics
    assert off.config.metrics["train_texts"] == len(train.texts)


def test_the_temperature_round_trips_and_old_configs_load_with_one(
    backbone: Backbone, tmp_path: Path
) -> None:
    clf = train_classifier("weather", backbone, noisy(6, 0), noisy(3, 1), TrainConfig(epochs=2))
    assert clf.temperature != 1.0
    config = clf.config
    again = ClassifierConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.temperature == clf.temperature
    folder = clf.save(tmp_path / "weather")
    loaded = load_classifier(folder, backbone)
    assert loaded.temperature == clf.temperature
    h = torch.randn(2, clf.embeddings.shape[1])
    torch.testing.assert_close(loaded.log_probs_full(h), clf.log_probs_full(h))
    old = json.loads((folder / "classifier.json").read_text())
    del old["temperature"]
    (folder / "classifier.json").write_text(json.dumps(old))
    assert read_config(folder).temperature == 1.0
    plain = load_classifier(folder, backbone)
    torch.testing.assert_close(
        plain.log_probs_full(h), plain.head.full(h, plain.embeddings).log_softmax(-1)
    )
    assert not torch.allclose(plain.log_probs_full(h), clf.log_probs_full(h))
    for bad in (0, -1.5, "2", True, None, math.inf):
        with pytest.raises(InvalidInputError, match="temperature"):
            ClassifierConfig.from_dict({**old, "temperature": bad})
    assert isinstance(GuidanceClassifier(again, clf.head, backbone).temperature, float)
