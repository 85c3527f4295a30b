import pytest
import torch

from fints.dictionary import DictionaryMeta, UserDictionary
from fints.errors import InvalidInputError
from fints.retrieval import retrieve_and_aggregate
from fints.sites import parse_sites
from fints.steering import SteeringConfig, SteeringVector, effective_vectors
from fints.user_vectors import USER_VECTORS, user_vector

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


AGG = torch.ones(3, 2, 4)
NORMS = torch.tensor([[2.0, 5.0]] * 3)


def scaled(config: SteeringConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0's (attn, mlp) vectors for ``config``."""
    out = effective_vectors(SITES, AGG[:1], [config], NORMS[:1])
    return out[SITES[0]][0], out[SITES[1]][0]


def test_effective_vectors_scale_each_component_by_its_strength():
    attn, mlp = scaled(SteeringConfig(strengths={"attn": 0.5, "mlp": 2.0}))
    torch.testing.assert_close(attn, torch.full((4,), 0.5))
    torch.testing.assert_close(mlp, torch.full((4,), 2.0))


def test_effective_vectors_are_zero_at_sites_the_config_leaves_out():
    attn, mlp = scaled(SteeringConfig(sites=parse_sites("1.mlp"), strengths={"attn": 9}))
    assert torch.equal(attn, torch.zeros(4))
    torch.testing.assert_close(mlp, torch.ones(4))


def test_relative_strength_is_a_fraction_of_the_site_norm():
    attn, mlp = scaled(SteeringConfig(strengths={"attn": 0.5, "mlp": 0.1}, relative=True))
    torch.testing.assert_close(attn.norm(), torch.tensor(0.5 * 2.0))
    torch.testing.assert_close(mlp.norm(), torch.tensor(0.1 * 5.0))


def test_disabled_rows_get_zero_vectors():
    attn, mlp = scaled(SteeringConfig(enabled=False))
    assert torch.equal(attn, torch.zeros(4)) and torch.equal(mlp, torch.zeros(4))


def test_each_row_is_scaled_by_its_own_config():
    configs = [SteeringConfig(strengths={"mlp": 2.0}), SteeringConfig(enabled=False)]
    mlp = effective_vectors(SITES, AGG[:2], configs, NORMS[:2])[SITES[1]]
    torch.testing.assert_close(mlp[0], torch.full((4,), 2.0))
    assert torch.equal(mlp[1], torch.zeros(4))


@pytest.mark.parametrize(
    "bad",
    [
        {"top_k": 0},
        {"aggregation": "max"},
        {"tau": 0},
        {"strengths": {"ffn": 1}},
        {"strengths": {"attn": float("nan")}},
    ],
)
def test_config_validation(bad):
    with pytest.raises(InvalidInputError):
        SteeringConfig(**bad)


def test_a_steering_vector_with_inf_is_refused():
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        SteeringVector(SITES, torch.tensor([[1.0, float("inf")], [0.0, 0.0]]))


# -- user-level vectors --------------------------------------------------------------------


def user_data() -> tuple[torch.Tensor, torch.Tensor]:
    """40 items whose differences share the direction of the first axis (length 3)."""
    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(2, 6)
    direction[:, 0] = 3.0
    negative = torch.randn(40, 2, 6, generator=g)
    positive = negative + direction + 0.1 * torch.randn(40, 2, 6, generator=g)
    return positive, negative


def test_mean_user_vector_is_the_mean_difference():
    positive, negative = user_data()
    torch.testing.assert_close(
        user_vector(positive, negative, "mean"), (positive - negative).mean(0)
    )


@pytest.mark.parametrize("method", ["pca", "logistic"])
def test_user_vector_points_along_the_shared_direction(method):
    positive, negative = user_data()
    v = user_vector(positive, negative, method)
    cosine = torch.nn.functional.cosine_similarity(v, user_vector(positive, negative), dim=-1)
    assert (cosine > 0.9).all(), cosine


@pytest.mark.parametrize("method", ["pca", "logistic"])
def test_user_vector_has_the_norm_of_the_mean_difference(method):
    positive, negative = user_data()
    v = user_vector(positive, negative, method)
    torch.testing.assert_close(v.norm(dim=-1), user_vector(positive, negative).norm(dim=-1))


def test_pca_user_vector_is_the_uncentered_first_component():
    positive, negative = user_data()
    diffs = positive - negative
    v = user_vector(positive, negative, "pca")
    for s in range(2):
        first = torch.linalg.svd(diffs[:, s], full_matrices=False).Vh[0]
        cosine = torch.nn.functional.cosine_similarity(v[s], first, dim=0)
        torch.testing.assert_close(cosine.abs(), torch.tensor(1.0))


def test_empty_activations_are_refused():
    positive, negative = user_data()
    with pytest.raises(InvalidInputError, match="non-empty"):
        user_vector(positive[:0], negative[:0])


def test_an_unknown_user_vector_method_names_the_known_ones():
    positive, negative = user_data()
    with pytest.raises(InvalidInputError, match="unknown user-vector method 'median'") as err:
        user_vector(positive, negative, "median")
    assert all(repr(name) in str(err.value) for name in ("mean", "pca", "logistic"))


def test_a_method_added_to_the_registry_is_dispatched(monkeypatch):
    positive, negative = user_data()
    monkeypatch.setitem(USER_VECTORS, "last-item", lambda p, n: (p - n)[-1])
    torch.testing.assert_close(
        user_vector(positive, negative, "last-item"), (positive - negative)[-1]
    )
