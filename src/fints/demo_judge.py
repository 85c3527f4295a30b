"""The demo's judge: which user wrote this answer?

A TF-IDF classifier (word 1-2 grams and character 2-4 grams, logistic regression: the
features of the benchmark's attribution judge, which the demo may not import) fitted
on the users' history outputs. An answer counts as in its user's style when the judge
attributes it to that user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from fints.history import HistoryItem


@dataclass(frozen=True)
class Attribution:
    """How many of each user's answers the judge attributes to that user."""

    hits: dict[str, int]
    answers: dict[str, int]

    @property
    def total(self) -> tuple[int, int]:
        return sum(self.hits.values()), sum(self.answers.values())

    def users_right(self) -> int:
        """Users with most of their answers attributed to them."""
        return sum(2 * self.hits[u] > self.answers[u] for u in self.hits)


class AuthorJudge:
    """Predicts the author of a text among the users it was fitted on."""

    def __init__(self, histories: Mapping[str, Sequence[HistoryItem]], c: float = 5.0) -> None:
        features = FeatureUnion(
            [
                ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
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
        texts = [item.output for items in histories.values() for item in items]
        labels = [user for user, items in histories.items() for _ in items]
        self._pipeline.fit(texts, labels)
        self.users = list(histories)

    def predict(self, texts: Sequence[str]) -> list[str]:
        safe = [t if t.strip() else "<empty>" for t in texts]
        return [str(p) for p in self._pipeline.predict(safe)]

    def attribution(self, answers: Sequence[tuple[str, str]]) -> Attribution:
        """``answers``: (user, text) pairs; per user, how many the judge gives to that user."""
        predicted = self.predict([text for _, text in answers])
        hits = dict.fromkeys(self.users, 0)
        counts = dict.fromkeys(self.users, 0)
        for (user, _), guess in zip(answers, predicted, strict=True):
            counts[user] += 1
            hits[user] += guess == user
        return Attribution(hits, counts)
