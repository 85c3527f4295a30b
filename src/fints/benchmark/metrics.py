"""Benchmark metrics: ROUGE with paired-bootstrap intervals, attribution, style statistics.

ROUGE-1 and ROUGE-L are F-measures from ``rouge-score`` with the Porter stemmer
on. Differences between two methods are paired per query; the 95% interval is
the percentile interval of the mean difference over bootstrap resamples of the
queries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from fints.benchmark.labels import ROUGE, Metric
from fints.errors import InvalidInputError


@dataclass(frozen=True)
class RougeScores:
    rouge1: np.ndarray  # per query F-measure
    rougeL: np.ndarray

    def mean(self) -> dict[str, float]:
        return {m: float(self.get(m).mean()) for m in ROUGE}

    def get(self, name: str) -> np.ndarray:
        if name not in ROUGE:
            expected = ", ".join(ROUGE)
            raise InvalidInputError(f"unknown ROUGE type {str(name)!r}: expected one of {expected}")
        return self.rouge1 if name == Metric.ROUGE1 else self.rougeL


_SCORER: rouge_scorer.RougeScorer | None = None


def rouge(predictions: Sequence[str], references: Sequence[str]) -> RougeScores:
    """Per-pair ROUGE-1 / ROUGE-L F (stemmer on). An empty prediction scores 0."""
    global _SCORER
    if len(predictions) != len(references):
        raise InvalidInputError(f"{len(predictions)} predictions for {len(references)} references")
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer([m.value for m in ROUGE], use_stemmer=True)
    r1, rl = [], []
    for pred, ref in zip(predictions, references, strict=True):
        scores = _SCORER.score(ref, pred)
        r1.append(scores[Metric.ROUGE1].fmeasure)
        rl.append(scores[Metric.ROUGEL].fmeasure)
    return RougeScores(np.asarray(r1, dtype=float), np.asarray(rl, dtype=float))


@dataclass(frozen=True)
class Difference:
    """Mean paired difference ``a - b`` with a bootstrap percentile interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def above_zero(self) -> bool:
        return self.low > 0

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """The mean of ``a - b`` over queries and its bootstrap interval (paired resampling)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise InvalidInputError(
            f"paired scores must be 1-D and equal length: {x.shape} vs {y.shape}"
        )
    if x.size == 0:
        raise InvalidInputError("no paired scores to compare")
    diff = x - y
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[idx].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Difference(float(diff.mean()), float(low), float(high), int(diff.size))


class TextClassifier:
    """TF-IDF (word 1-2 grams + character 2-4 grams) and logistic regression.

    Used twice: the author-attribution judge (trained on the users' history
    outputs) and the persona mood judge (trained on held-out pairs).
    """

    def __init__(self, seed: int = 0, c: float = 5.0) -> None:
        features = FeatureUnion(
            [
                ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
                (
                    "chars",
                    TfidfVectorizer(
                        analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2
                    ),
                ),
            ]
        )
        self._pipeline = Pipeline(
            [("features", features), ("clf", LogisticRegression(C=c, max_iter=3000))]
        )
        self.labels: list[str] = []

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> TextClassifier:
        if len(texts) != len(labels) or not texts:
            raise InvalidInputError("the classifier needs as many labels as texts, and some texts")
        if len(set(labels)) < 2:
            raise InvalidInputError("the classifier needs at least two classes")
        self._pipeline.fit(list(texts), list(labels))
        self.labels = [str(c) for c in self._pipeline.classes_]
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not self.labels:
            raise InvalidInputError("the classifier is not trained")
        safe = [t if t.strip() else "<empty>" for t in texts]
        return [str(p) for p in self._pipeline.predict(safe)]

    def hit_rate(self, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
        """Per text: 1.0 where the classifier names the given label."""
        return np.asarray([float(p == t) for p, t in zip(self.predict(texts), labels, strict=True)])


# -- style statistics --------------------------------------------------------------------


def word_count(text: str) -> int:
    return len(text.split())


def title_case_ratio(text: str) -> float:
    """Fraction of alphabetic words that start with a capital letter."""
    words = [w for w in text.split() if w[:1].isalpha()]
    if not words:
        return 0.0
    return sum(w[0].isupper() for w in words) / len(words)


@dataclass(frozen=True)
class StyleStats:
    words: float  # mean words per output
    title_case: float  # mean fraction of capitalised words
    length_gap: float  # mean |words(output) - mean words(user's history)| / that mean
    casing_gap: float  # mean |title_case(output) - user's history title_case|


def style_stats(
    outputs: Sequence[str], users: Sequence[str], history_outputs: Mapping[str, Sequence[str]]
) -> StyleStats:
    """Length and casing of outputs, and their distance to each user's own history."""
    if len(outputs) != len(users):
        raise InvalidInputError("style_stats needs one user per output")
    if not outputs:
        raise InvalidInputError("no outputs")
    profile: dict[str, tuple[float, float]] = {}
    for user, texts in history_outputs.items():
        if texts:
            profile[user] = (
                float(np.mean([word_count(t) for t in texts])),
                float(np.mean([title_case_ratio(t) for t in texts])),
            )
    words = np.asarray([word_count(t) for t in outputs], dtype=float)
    cases = np.asarray([title_case_ratio(t) for t in outputs], dtype=float)
    length_gaps, casing_gaps = [], []
    for w, c, user in zip(words, cases, users, strict=True):
        if user in profile:
            mean_words, mean_case = profile[user]
            length_gaps.append(abs(w - mean_words) / max(mean_words, 1.0))
            casing_gaps.append(abs(c - mean_case))
    return StyleStats(
        words=float(words.mean()),
        title_case=float(cases.mean()),
        length_gap=float(np.mean(length_gaps)) if length_gaps else float("nan"),
        casing_gap=float(np.mean(casing_gaps)) if casing_gaps else float("nan"),
    )
