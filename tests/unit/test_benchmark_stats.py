"""Comparisons that resample users: the cluster bootstrap, the sign-flip test, the minimum
detectable effect, Holm's correction and the pre-registered family."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fints.benchmark.labels import HOLM_METRICS, PRE_REGISTERED, Label, Metric
from fints.benchmark.metrics import paired_bootstrap
from fints.benchmark.preregistered import preregistered, preregistered_markdown
from fints.benchmark.stats import (
    MDE_FACTOR,
    SIGN_DRAWS,
    UserDifference,
    holm,
    minimum_detectable_effect,
    per_user_means,
    sign_flip_p,
    user_bootstrap,
)
from fints.errors import InvalidInputError


def test_the_user_bootstrap_is_wider_when_one_user_has_most_queries() -> None:
    # One user has 100 queries, all better by 1; nine others have 2 queries each, no gain.
    rng = np.random.default_rng(0)
    many = np.ones(100) + rng.normal(0, 0.05, 100)
    few = rng.normal(0, 0.05, 18)
    diff = np.concatenate([many, few])
    users = ["heavy"] * 100 + [f"u{i}" for i in range(9) for _ in range(2)]
    zeros = np.zeros_like(diff)
    by_query = paired_bootstrap(diff, zeros)
    by_user = user_bootstrap(diff, zeros, users)
    assert by_user.n_users == 10
    # the estimate weighs each user once: ~1/10, not ~100/118
    assert by_user.mean == pytest.approx(float(per_user_means(diff, users).mean()))
    assert by_user.mean < 0.2 < 0.8 < by_query.mean
    assert by_user.hi - by_user.lo > 2 * (by_query.high - by_query.low)
    assert by_query.above_zero  # queries as witnesses: "clearly above zero"
    # users as witnesses: one user of ten is no evidence (flipping the heavy user's sign
    # alone gives as large a mean as observed, so about half the sign vectors do)
    assert by_user.p > 0.3
    assert not by_user.above_zero


def test_one_query_per_user_is_the_query_bootstrap() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=40), rng.uniform(size=40)
    users = [f"u{i}" for i in range(40)]
    by_query = paired_bootstrap(a, b, seed=3)
    for given in (users, None):
        by_user = user_bootstrap(a, b, given, seed=3)
        assert (by_user.mean, by_user.lo, by_user.hi) == pytest.approx(
            (by_query.mean, by_query.low, by_query.high)
        )


def test_per_user_means_keep_the_order_users_first_appear() -> None:
    diff = np.array([1.0, 3.0, 10.0, 5.0])
    assert per_user_means(diff, ["b", "b", "a", "c"]).tolist() == [2.0, 10.0, 5.0]
    with pytest.raises(InvalidInputError, match="users for"):
        per_user_means(diff, ["a"])


def test_the_sign_flip_test_enumerates_every_sign_vector_up_to_16_users() -> None:
    per_user = np.array([0.3, 0.1, 0.2, 0.4, -0.05])
    observed = abs(per_user.mean())
    signs = np.array(list(itertools.product([1, -1], repeat=5)))
    expected = float((np.abs(signs @ per_user / 5) >= observed - 1e-12).mean())
    assert sign_flip_p(per_user) == pytest.approx(expected)
    assert sign_flip_p(np.full(16, 0.5)) == pytest.approx(2 / 2**16)  # only ++..+ and --..-
    assert sign_flip_p(np.zeros(4)) == 1.0  # no difference at all


def test_beyond_16_users_the_sign_flip_test_draws_seeded_sign_vectors() -> None:
    per_user = np.full(20, 0.5)
    # no random draw is as extreme, barring all-equal signs: p = (1 + hits) / (1 + draws)
    p = sign_flip_p(per_user, seed=0)
    assert p == sign_flip_p(per_user, seed=0)
    assert 1 / (1 + SIGN_DRAWS) <= p <= 3 / (1 + SIGN_DRAWS)
    noise = np.random.default_rng(0).normal(0, 1, 20)
    assert sign_flip_p(noise, seed=0) > 0.05


def test_the_minimum_detectable_effect_on_known_numbers() -> None:
    assert abs(MDE_FACTOR - (1.959964 + 0.841621)) < 1e-5
    per_user = np.array([1.0, 2.0, 3.0, 4.0])  # std (ddof 1) = 1.29099, SE = 0.645497
    assert minimum_detectable_effect(per_user) == pytest.approx(2.801585 * 0.645497, rel=1e-5)
    assert np.isnan(minimum_detectable_effect(np.array([1.0])))
    # user_bootstrap reports the same, from the users' mean differences
    diff = user_bootstrap([1.0, 1.0, 2.0, 3.0, 4.0], [0.0] * 5, ["a", "a", "b", "c", "d"])
    assert diff.mde == pytest.approx(2.801585 * 0.645497, rel=1e-5)


def test_holm_on_known_p_values() -> None:
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> monotone: 0.06 for b
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert list(adjusted) == ["a", "b", "c"]
    assert holm({"a": 0.5, "b": 0.9}) == {"a": 1.0, "b": 1.0}  # capped at 1
    assert holm({}) == {}


def test_a_difference_prints_its_interval_p_and_mde() -> None:
    d = UserDifference(mean=-0.12, lo=-0.2, hi=-0.05, p=0.0123, n_users=9, mde=0.07)
    assert str(d) == "-0.1200 [-0.2000, -0.0500] p=0.0123 MDE=0.0700"
    assert d.below_zero and not d.above_zero


def test_the_pre_registered_family_is_holm_corrected_per_metric() -> None:
    others = PRE_REGISTERED[Label.BEST]
    assert len(others) <= 3
    assert others == (Label.WRONG_USER_DICTIONARY, Label.RANDOM_DIRECTION, Label.icl(3))
    p_of = {
        (Label.WRONG_USER_DICTIONARY, Metric.NLL): 0.01,
        (Label.RANDOM_DIRECTION, Metric.NLL): 0.02,
        (Label.icl(3), Metric.NLL): 0.5,
        (Label.WRONG_USER_DICTIONARY, Metric.ROUGEL): 0.2,
        (Label.RANDOM_DIRECTION, Metric.ROUGEL): 0.01,
        (Label.icl(3), Metric.ROUGEL): 0.3,
    }

    def difference(row: str, other: str, metric: str) -> UserDifference:
        assert row == Label.BEST
        return UserDifference(-0.1, -0.2, 0.0, p_of[(other, metric)], 9, 0.05)

    labels = [Label.NONE, Label.BEST, *others]
    items = preregistered(labels, difference)
    assert [(i.row, i.minus) for i in items] == [(Label.BEST, o) for o in others]
    for metric in HOLM_METRICS:
        expected = holm({o: p_of[(o, metric)] for o in others})
        assert {i.minus: i.holm[metric] for i in items} == pytest.approx(expected)
    assert items[0].holm[Metric.NLL] == pytest.approx(0.03)
    text = "\n".join(preregistered_markdown(items))
    assert "p(Holm)" in text and "| 0.0100 | 0.0300 |" in text
    # a comparison that did not run leaves the family (Holm over the two that ran)
    two = preregistered([Label.BEST, *others[:2]], difference)
    assert two[0].holm[Metric.NLL] == pytest.approx(0.02)
    assert preregistered([Label.NONE], difference) == []
