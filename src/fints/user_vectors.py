"""One vector per user (baselines), per site, as a registry (:data:`USER_VECTORS`):

* ``mean``     - the mean of the per-item differences (CAA)
* ``pca``      - their first (uncentered) principal component
* ``logistic`` - the direction of a logistic regression of positive against negative

Adding a method is one function ``(positive, negative) -> [sites, hidden]`` and one
line in :data:`USER_VECTORS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fints.errors import InvalidInputError

#: The name of a user-vector method: a key of :data:`USER_VECTORS`.
UserVectorMethod = str

#: ``(positive, negative)``, each ``[N, sites, hidden]``, to ``[sites, hidden]``.
UserVectorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def differences(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    return (positive - negative).to(torch.float32)


def matched_to_mean(directions: Sequence[torch.Tensor], mean: torch.Tensor) -> torch.Tensor:
    """Each site's direction (``directions[s]``, ``[hidden]``) as a unit vector rescaled to the norm
    of the mean difference there and signed to agree with it, so strengths compare."""
    out = torch.zeros_like(mean)
    for s in range(mean.shape[0]):
        direction = directions[s] / directions[s].norm().clamp_min(1e-12)
        sign = 1.0 if float(direction @ mean[s]) >= 0 else -1.0
        out[s] = sign * direction * mean[s].norm()
    return out  # (directions stay as given, not stacked: a strided SVD row sums differently)


def mean_vector(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    return differences(positive, negative).mean(dim=0)


def pca_vector(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    diffs = differences(positive, negative)
    # Uncentered: centering would remove exactly the direction shared by the items.
    directions = [
        torch.linalg.svd(diffs[:, s], full_matrices=False).Vh[0] for s in range(diffs.shape[1])
    ]
    return matched_to_mean(directions, diffs.mean(dim=0))


def logistic_vector(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    directions = []
    for s in range(positive.shape[1]):
        x = torch.cat([positive[:, s], negative[:, s]]).to(torch.float64).cpu().numpy()
        scale = x.std(axis=0) + 1e-6
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x / scale, y)
        directions.append(torch.from_numpy(clf.coef_[0] / scale).to(torch.float32))
    return matched_to_mean(directions, mean_vector(positive, negative))


#: User-vector methods by name.
USER_VECTORS: dict[UserVectorMethod, UserVectorFn] = {
    "mean": mean_vector,
    "pca": pca_vector,
    "logistic": logistic_vector,
}


def user_vector(
    positive: torch.Tensor, negative: torch.Tensor, method: UserVectorMethod = "mean"
) -> torch.Tensor:
    """``positive``/``negative`` are ``[N, sites, hidden]``; returns ``[sites, hidden]``.

    PCA and logistic directions are unit directions rescaled to the norm of the
    mean difference and signed to agree with it, so strengths are comparable.
    """
    if method not in USER_VECTORS:
        raise InvalidInputError(
            f"unknown user-vector method {method!r}: expected one of {sorted(USER_VECTORS)}"
        )
    if positive.shape != negative.shape or positive.dim() != 3 or positive.shape[0] == 0:
        raise InvalidInputError(
            f"need matching non-empty [N, sites, hidden] activations, got "
            f"{tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    return USER_VECTORS[method](positive, negative)
