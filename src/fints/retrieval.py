"""Top-K retrieval over a user's keys and aggregation of the retrieved vectors.

Vectorized across a batch whose rows belong to different users: every user's
keys are concatenated once, one matmul scores all queries against all keys,
and a mask keeps each row to its own user's segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fints.dictionary import UserDictionary
from fints.errors import InvalidInputError
from fints.steering import Aggregation


@dataclass
class Retrieved:
    """What retrieval found for a batch of queries."""

    vectors: torch.Tensor  # [batch, sites, hidden] aggregated (zeros for rows without a dictionary)
    indices: list[list[int]]  # per row: entry indices in that row's dictionary, best first
    scores: list[list[float]]  # per row: cosine scores of those entries
    weights: list[list[float]]  # per row: aggregation weights of those entries


def retrieve_and_aggregate(
    queries: torch.Tensor,
    dictionaries: Sequence[UserDictionary | None],
    *,
    top_k: int,
    aggregation: Aggregation = "attentive",
    tau: float = 0.1,
) -> Retrieved:
    """``queries`` is ``[batch, key_dim]`` (unit rows); ``dictionaries[b]`` is row b's user's."""
    if queries.shape[0] != len(dictionaries):
        raise InvalidInputError(f"{queries.shape[0]} queries for {len(dictionaries)} dictionaries")
    present = [d for d in dictionaries if d is not None and len(d)]
    batch = len(dictionaries)
    if not present:
        return Retrieved(
            torch.zeros(batch, 0, 0), [[] for _ in range(batch)], [[]] * batch, [[]] * batch
        )
    sites, hidden = present[0].vectors.shape[1:]
    # One segment per distinct dictionary object, concatenated once.
    unique: dict[int, tuple[int, UserDictionary]] = {}
    offset = 0
    for d in present:
        if id(d) not in unique:
            unique[id(d)] = (offset, d)
            offset += len(d)
    all_keys = torch.cat([d.keys for _, d in unique.values()])
    all_vectors = torch.cat([d.vectors for _, d in unique.values()])
    if all_vectors.shape[1:] != (sites, hidden):
        raise InvalidInputError("dictionaries in one batch must share sites and hidden size")

    start = torch.zeros(batch, dtype=torch.long)
    length = torch.zeros(batch, dtype=torch.long)
    for row, d in enumerate(dictionaries):
        if d is not None and len(d):
            start[row], length[row] = unique[id(d)][0], len(d)
    scores = queries.to(torch.float32) @ all_keys.T  # [batch, total]
    columns = torch.arange(all_keys.shape[0]).unsqueeze(0)
    own = (columns >= start.unsqueeze(1)) & (columns < (start + length).unsqueeze(1))
    scores = scores.masked_fill(~own, float("-inf"))

    k = min(top_k, all_keys.shape[0])
    top_scores, top_index = scores.topk(k, dim=1)  # [batch, k]
    valid = torch.isfinite(top_scores)
    if aggregation == "attentive":
        weights = torch.softmax(top_scores.masked_fill(~valid, float("-inf")) / tau, dim=1)
    else:
        weights = valid.to(torch.float32) / valid.sum(dim=1, keepdim=True).clamp_min(1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with no valid entry
    gathered = all_vectors[top_index]  # [batch, k, sites, hidden]
    aggregated = torch.einsum("bk,bksh->bsh", weights, gathered)

    indices, row_scores, row_weights = [], [], []
    for row in range(batch):
        keep = valid[row]
        indices.append((top_index[row][keep] - start[row]).tolist())
        row_scores.append(top_scores[row][keep].tolist())
        row_weights.append(weights[row][keep].tolist())
    return Retrieved(aggregated, indices, row_scores, row_weights)
