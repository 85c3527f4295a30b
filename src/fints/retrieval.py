"""Top-K retrieval over a user's keys and aggregation of the retrieved vectors.

Vectorized across a batch whose rows belong to different users: the rows of
each user are scored by one matmul against that user's keys only (a row can
never reach another user's entries), only the top-K vectors are gathered, and
one batched contraction aggregates every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fints.dictionary import UserDictionary
from fints.errors import InvalidInputError
from fints.history import HistoryItem
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
    batch = len(dictionaries)
    if queries.shape[0] != batch:
        raise InvalidInputError(f"{queries.shape[0]} queries for {batch} dictionaries")
    rows_of: dict[int, list[int]] = {}  # rows sharing one dictionary are scored together
    for row, d in enumerate(dictionaries):
        if d is not None and len(d):
            rows_of.setdefault(id(d), []).append(row)
    if not rows_of:
        return Retrieved(
            torch.zeros(batch, 0, 0),
            [[] for _ in range(batch)],
            [[] for _ in range(batch)],
            [[] for _ in range(batch)],
        )
    first = dictionaries[next(iter(rows_of.values()))[0]]
    assert first is not None
    sites, hidden = first.vectors.shape[1:]
    k = min(top_k, max(len(dictionaries[rows[0]]) for rows in rows_of.values()))  # type: ignore[arg-type]

    top_scores = torch.full((batch, k), float("-inf"))
    top_index = torch.zeros((batch, k), dtype=torch.long)
    gathered = torch.zeros(batch, k, sites, hidden)
    for rows in rows_of.values():
        d = dictionaries[rows[0]]
        assert d is not None
        if d.vectors.shape[1:] != (sites, hidden):
            raise InvalidInputError("dictionaries in one batch must share sites and hidden size")
        scores = queries[rows].to(torch.float32) @ d.keys.T  # [rows, N]
        values, index = scores.topk(min(k, len(d)), dim=1)
        width = index.shape[1]
        top_scores[rows, :width] = values
        top_index[rows, :width] = index
        gathered[rows, :width] = d.vectors[index]  # only the top-k vectors are copied

    valid = torch.isfinite(top_scores)
    if aggregation == "attentive":
        weights = torch.softmax(top_scores / tau, dim=1)
    else:
        weights = valid.to(torch.float32) / valid.sum(dim=1, keepdim=True).clamp_min(1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows without a dictionary
    aggregated = torch.einsum("bk,bksh->bsh", weights, gathered)

    indices, row_scores, row_weights = [], [], []
    for row in range(batch):
        keep = valid[row]
        indices.append(top_index[row][keep].tolist())
        row_scores.append(top_scores[row][keep].tolist())
        row_weights.append(weights[row][keep].tolist())
    return Retrieved(aggregated, indices, row_scores, row_weights)


def nearest_items(
    keys: torch.Tensor, items: Sequence[HistoryItem], query: torch.Tensor, k: int
) -> list[HistoryItem]:
    """The ``k`` items whose keys (``[N, key_dim]``, row i for ``items[i]``) are most similar
    to ``query``, best first: a user's own examples for the prompt (in-context learning)."""
    if keys.shape[0] != len(items):
        raise InvalidInputError(f"{keys.shape[0]} keys for {len(items)} items")
    if k < 1 or not items:
        return []
    top = (keys.to(torch.float32) @ query.to(torch.float32)).topk(min(k, len(items))).indices
    return [items[j] for j in top.tolist()]
