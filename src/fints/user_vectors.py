"""One vector per user (baselines): mean of differences (CAA), first principal
component, and a logistic-regression direction, each per site."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fints.errors import InvalidInputError

UserVectorMethod = Literal["mean", "pca", "logistic"]


def user_vector(
    positive: torch.Tensor, negative: torch.Tensor, method: UserVectorMethod = "mean"
) -> torch.Tensor:
    """``positive``/``negative`` are ``[N, sites, hidden]``; returns ``[sites, hidden]``.

    PCA and logistic directions are unit directions rescaled to the norm of the
    mean difference and signed to agree with it, so strengths are comparable.
    """
    if positive.shape != negative.shape or positive.dim() != 3 or positive.shape[0] == 0:
        raise InvalidInputError(
            f"need matching non-empty [N, sites, hidden] activations, got "
            f"{tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    diffs = (positive - negative).to(torch.float32)
    mean = diffs.mean(dim=0)
    if method == "mean":
        return mean
    out = torch.zeros_like(mean)
    for s in range(diffs.shape[1]):
        if method == "pca":
            # Uncentered: centering would remove exactly the direction shared by the items.
            direction = torch.linalg.svd(diffs[:, s], full_matrices=False).Vh[0]
        elif method == "logistic":
            x = torch.cat([positive[:, s], negative[:, s]]).numpy().astype(np.float64)
            y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
            scale = x.std(axis=0) + 1e-6
            clf = LogisticRegression(max_iter=2000, C=1.0).fit(x / scale, y)
            direction = torch.from_numpy(clf.coef_[0] / scale).to(torch.float32)
        else:
            raise InvalidInputError(f"unknown user-vector method {method!r}")
        direction = direction / direction.norm().clamp_min(1e-12)
        sign = 1.0 if float(direction @ mean[s]) >= 0 else -1.0
        out[s] = sign * direction * mean[s].norm()
    return out
