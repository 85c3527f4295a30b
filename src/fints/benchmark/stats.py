"""Paired comparisons that respect users: a cluster bootstrap, a sign-flip test, the
minimum detectable effect and Holm's correction.

Queries come several per user, and queries of one user are not independent: resampling
queries would treat a user with many queries as many independent witnesses. Here every
comparison is made on the users:

* ``d_u`` is user ``u``'s mean paired difference ``a - b`` over their queries;
* the estimate is the mean of the ``d_u`` (each user weighs the same);
* the 95% interval is the percentile interval of that mean over bootstrap resamples of
  the users (with replacement);
* the p-value is a two-sided sign-flip permutation test over users: under "no
  difference" each ``d_u`` is as likely as ``-d_u``, so ``p`` is the share of sign
  vectors whose flipped mean is at least as far from zero as the observed one (every
  sign vector when there are at most 16 users, else ``2**16`` random ones, seeded;
  then ``p = (1 + hits) / (1 + draws)``);
* the minimum detectable effect (two-sided 5% level, 80% power) is
  ``MDE = (z_0.975 + z_0.8) * SE`` with ``SE = std(d_u, ddof=1) / sqrt(n_users)``
  (``z_0.975 + z_0.8`` = 1.960 + 0.842 = 2.802).

With one query per user this is the per-query paired bootstrap (the same draws).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from fints.errors import InvalidInputError

#: Users up to which the sign-flip test enumerates every sign vector.
EXACT_USERS = 16
#: Random sign vectors drawn beyond that.
SIGN_DRAWS = 2**16
#: ``z_{0.975} + z_{0.8}``: a two-sided test at 5% with 80% power.
MDE_FACTOR = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)


@dataclass(frozen=True)
class UserDifference:
    """Mean over users of each user's mean paired difference ``a - b``, its 95% user
    bootstrap interval ``[lo, hi]``, the sign-flip p-value over users and the minimum
    detectable effect."""

    mean: float
    lo: float
    hi: float
    p: float
    n_users: int
    mde: float

    @property
    def above_zero(self) -> bool:
        return self.lo > 0

    @property
    def below_zero(self) -> bool:
        return self.hi < 0

    def interval(self) -> str:
        return f"{self.mean:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"

    def __str__(self) -> str:
        return f"{self.interval()} p={format_p(self.p)} MDE={self.mde:.4f}"


def format_p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.4f}"


def per_user_means(diff: np.ndarray, users: Sequence[str]) -> np.ndarray:
    """Each user's mean of ``diff``, users in the order they first appear."""
    if len(users) != diff.size:
        raise InvalidInputError(f"{len(users)} users for {diff.size} paired differences")
    index = {u: i for i, u in enumerate(dict.fromkeys(users))}
    groups = np.asarray([index[u] for u in users])
    sums = np.bincount(groups, weights=diff, minlength=len(index))
    return sums / np.bincount(groups, minlength=len(index))


def standard_error(per_user: np.ndarray) -> float:
    """``std(d_u, ddof=1) / sqrt(n_users)`` (NaN with fewer than two users)."""
    if per_user.size < 2:
        return float("nan")
    return float(per_user.std(ddof=1) / math.sqrt(per_user.size))


def minimum_detectable_effect(per_user: np.ndarray) -> float:
    """``(z_0.975 + z_0.8) * SE``: the smallest true mean difference a two-sided test at
    5% finds with 80% power, given this spread of the users' mean differences."""
    return MDE_FACTOR * standard_error(per_user)


@lru_cache(maxsize=4)
def _signs(n: int, seed: int) -> np.ndarray:
    """Sign vectors ``[draws, n]`` (int8): all ``2**n`` up to :data:`EXACT_USERS`."""
    if n <= EXACT_USERS:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
        return (1 - 2 * bits).astype(np.int8)
    rng = np.random.default_rng([seed, n])
    return (1 - 2 * rng.integers(0, 2, size=(SIGN_DRAWS, n))).astype(np.int8)


def sign_flip_p(per_user: np.ndarray, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of ``mean(per_user) != 0`` over users."""
    n = per_user.size
    if n == 0:
        raise InvalidInputError("no users to test")
    signs = _signs(n, seed)
    observed = abs(float(per_user.mean()))
    tolerance = 1e-12 * max(1.0, observed)
    hits = 0
    for start in range(0, signs.shape[0], 8192):
        flipped = np.abs(signs[start : start + 8192] @ per_user) / n
        hits += int((flipped >= observed - tolerance).sum())
    if n <= EXACT_USERS:
        return hits / signs.shape[0]
    return (1 + hits) / (1 + signs.shape[0])


def user_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    users: Sequence[str] | None = None,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> UserDifference:
    """``a - b`` paired per query, summarized over users (see the module docstring).

    ``users[i]`` is query ``i``'s user; ``None`` takes every query as its own user (the
    per-query bootstrap, for results recorded without users).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise InvalidInputError(
            f"paired scores must be 1-D and equal length: {x.shape} vs {y.shape}"
        )
    if x.size == 0:
        raise InvalidInputError("no paired scores to compare")
    diff = x - y
    per_user = per_user_means(diff, users) if users is not None else diff
    n = per_user.size
    rng = np.random.default_rng(seed)
    means = per_user[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return UserDifference(
        mean=float(per_user.mean()),
        lo=float(lo),
        hi=float(hi),
        p=sign_flip_p(per_user, seed),
        n_users=int(n),
        mde=minimum_detectable_effect(per_user),
    )


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (same keys).

    The ``i``-th smallest (from 0) of ``m`` is multiplied by ``m - i``, capped at 1 and
    never below the adjusted p-value before it.
    """
    ordered = sorted(pvalues, key=lambda k: pvalues[k])
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - i) * pvalues[name]))
        adjusted[name] = running
    return {name: adjusted[name] for name in pvalues}
