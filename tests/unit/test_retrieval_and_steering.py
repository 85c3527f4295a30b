import pytest
import torch

from fints.dictionary import DictionaryMeta, UserDictionary
from fints.errors import InvalidInputError
from fints.retrieval import retrieve_and_aggregate
from fints.sites import parse_sites
from fints.steering import SteeringConfig, SteeringVector, effective_vectors
from fints.user_vectors import user_vector

SITES = parse_sites("1.attn+mlp")


def make_dictionary(user: str, n: int, seed: int, hidden: int = 6, key_dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    meta = DictionaryMeta(
        "fp", "m", SITES, hidden, "enc", key_dim, "generic", "float32", site_norms=(2.0, 5.0)
    )
    keys = torch.nn.functional.normalize(torch.randn(n, key_dim, generator=g), dim=1)
    return UserDictionary(
        user, meta, [f"{user}{i}" for i in range(n)], keys, torch.randn(n, 2, hidden, generator=g)
    )


def reference(query, d, k, aggregation, tau):
    scores = d.keys @ query
    top = scores.topk(min(k, len(d)))
    if aggregation == "mean":
        w = torch.full((len(top.indices),), 1 / len(top.indices))
    else:
        w = torch.softmax(top.values / tau, dim=0)
    return (w[:, None, None] * d.vectors[top.indices]).sum(0), top.indices.tolist()


@pytest.mark.parametrize("aggregation", ["mean", "attentive"])
def test_batched_retrieval_matches_per_row_reference(aggregation):
    users = [make_dictionary("a", 7, 0), make_dictionary("b", 2, 1), make_dictionary("c", 12, 2)]
    rows = [users[0], None, users[1], users[2], users[0]]
    queries = torch.nn.functional.normalize(
        torch.randn(5, 5, generator=torch.Generator().manual_seed(9)), dim=1
    )
    got = retrieve_and_aggregate(queries, rows, top_k=3, aggregation=aggregation, tau=0.1)
    for row, d in enumerate(rows):
        if d is None:
            assert torch.equal(got.vectors[row], torch.zeros(2, 6)) and got.indices[row] == []
            continue
        expected, idx = reference(queries[row], d, 3, aggregation, 0.1)
        torch.testing.assert_close(got.vectors[row], expected, atol=1e-5, rtol=1e-5)
        assert got.indices[row] == idx  # never another user's entries
        assert abs(sum(got.weights[row]) - 1) < 1e-5


def test_effective_vectors_strengths_sites_and_relative():
    agg = torch.ones(3, 2, 4)
    norms = torch.tensor([[2.0, 5.0]] * 3)
    configs = [
        SteeringConfig(strengths={"attn": 0.5, "mlp": 2.0}),
        SteeringConfig(
            sites=parse_sites("1.mlp"), strengths={"attn": 9, "mlp": 0.1}, relative=True
        ),
        SteeringConfig(enabled=False),
    ]
    out = effective_vectors(SITES, agg, configs, norms)
    attn, mlp = out[SITES[0]], out[SITES[1]]
    torch.testing.assert_close(attn[0], torch.full((4,), 0.5))
    torch.testing.assert_close(mlp[0], torch.full((4,), 2.0))
    assert torch.equal(attn[1], torch.zeros(4))  # site not selected
    torch.testing.assert_close(mlp[1].norm(), torch.tensor(0.1 * 5.0))  # relative to norm
    assert torch.equal(attn[2], torch.zeros(4)) and torch.equal(mlp[2], torch.zeros(4))


def test_config_validation():
    for bad in (
        {"top_k": 0},
        {"aggregation": "max"},
        {"tau": 0},
        {"strengths": {"ffn": 1}},
        {"strengths": {"attn": float("nan")}},
    ):
        with pytest.raises(InvalidInputError):
            SteeringConfig(**bad)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        SteeringVector(SITES, torch.tensor([[1.0, float("inf")], [0.0, 0.0]]))


def test_user_vectors_mean_pca_logistic():
    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(2, 6)
    direction[:, 0] = 3.0
    negative = torch.randn(40, 2, 6, generator=g)
    positive = negative + direction + 0.1 * torch.randn(40, 2, 6, generator=g)
    mean = user_vector(positive, negative, "mean")
    torch.testing.assert_close(mean, (positive - negative).mean(0))
    for method in ("pca", "logistic"):
        v = user_vector(positive, negative, method)
        cosine = torch.nn.functional.cosine_similarity(v, mean, dim=-1)
        assert (cosine > 0.5).all(), (method, cosine)
        torch.testing.assert_close(v.norm(dim=-1), mean.norm(dim=-1))
    with pytest.raises(InvalidInputError):
        user_vector(positive[:0], negative[:0])
