"""The steering plan: per-row retrieval, aggregation, controls (transformations) and scaling."""

from __future__ import annotations

import pytest
import torch

from fints.dictionary import DictionaryMeta, UserDictionary
from fints.errors import InvalidInputError
from fints.plan import plan_steering
from fints.retrieval import retrieve_and_aggregate
from fints.sites import Site, parse_sites
from fints.steering import SteeringConfig, effective_vectors

HIDDEN, KEY_DIM = 6, 5
SITES = parse_sites("1.attn+mlp")


def make_dictionary(
    user: str, n: int, seed: int, sites: tuple[Site, ...] = SITES
) -> UserDictionary:
    g = torch.Generator().manual_seed(seed)
    meta = DictionaryMeta(
        "fp",
        "m",
        sites,
        HIDDEN,
        "enc",
        KEY_DIM,
        "generic",
        "float32",
        site_norms=tuple(2.0 + i for i in range(len(sites))),
    )
    keys = torch.nn.functional.normalize(torch.randn(n, KEY_DIM, generator=g), dim=1)
    vectors = torch.randn(n, len(sites), HIDDEN, generator=g)
    return UserDictionary(user, meta, [f"{user}{i}" for i in range(n)], keys, vectors)


def queries(n: int, seed: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.nn.functional.normalize(torch.randn(n, KEY_DIM, generator=g), dim=1))


ALICE, BOB = make_dictionary("a", 7, 0), make_dictionary("b", 3, 1)
STEER = SteeringConfig(strengths={"attn": 0.5, "mlp": 2.0}, top_k=3)
OFF = STEER.with_(enabled=False)


def mixed_batch():
    """alice, no dictionary, bob, alice with steering disabled, alice again."""
    dictionaries = [ALICE, None, BOB, ALICE, ALICE]
    configs = [STEER, STEER, STEER.with_(relative=True, aggregation="mean"), OFF, STEER]
    keys: list[torch.Tensor | None] = list(queries(5))
    keys[1] = None  # a row without a user has no key either
    return dictionaries, keys, configs


def test_rows_without_a_dictionary_or_with_steering_disabled_get_zero_vectors():
    plan = plan_steering(*mixed_batch())
    vectors = plan.vectors()
    assert plan.steered == (True, False, True, False, True)
    for row in (1, 3):
        for site in SITES:
            assert torch.equal(vectors[site][row], torch.zeros(HIDDEN)), (row, site)


def test_steered_rows_equal_their_own_retrieval_and_scaling():
    dictionaries, keys, configs = mixed_batch()
    vectors = plan_steering(dictionaries, keys, configs).vectors()
    for row in (0, 2, 4):
        d, key, config = dictionaries[row], keys[row], configs[row]
        assert d is not None and key is not None
        found = retrieve_and_aggregate(
            key.unsqueeze(0),
            [d],
            top_k=config.top_k,
            aggregation=config.aggregation,
            tau=config.tau,
        )
        expected = effective_vectors(SITES, found.vectors, [config], d.site_norms.unsqueeze(0))
        for site in SITES:
            torch.testing.assert_close(vectors[site][row], expected[site][0])
            assert vectors[site][row].abs().sum() > 0


def test_retrieved_ids_and_weights_are_each_rows_own():
    dictionaries, keys, configs = mixed_batch()
    plan = plan_steering(dictionaries, keys, configs)
    for row in (0, 2, 4):
        d, key = dictionaries[row], keys[row]
        assert d is not None and key is not None
        scores = d.keys @ key
        top = scores.topk(min(3, len(d)))
        assert plan.retrieved[row] == tuple(d.item_ids[j] for j in top.indices.tolist())
        if configs[row].aggregation == "attentive":
            expected = torch.softmax(top.values / configs[row].tau, dim=0)
        else:
            expected = torch.full((len(top.indices),), 1 / len(top.indices))
        torch.testing.assert_close(torch.tensor(plan.weights[row]), expected)
    assert plan.retrieved[1] == plan.retrieved[3] == ()
    assert plan.weights[1] == plan.weights[3] == ()


def test_bob_rows_never_retrieve_alice_entries():
    dictionaries, keys, configs = mixed_batch()
    plan = plan_steering(dictionaries, keys, configs)
    assert plan.retrieved[2] and all(i.startswith("b") for i in plan.retrieved[2])
    assert all(i.startswith("a") for row in (0, 4) for i in plan.retrieved[row])


def test_rows_with_different_sites_plan_the_union_with_zeros_where_absent():
    lower = make_dictionary("c", 4, 3, parse_sites("0.mlp,1.attn"))
    keys = queries(2)
    plan = plan_steering([ALICE, lower], keys, [STEER, STEER])
    assert plan.sites == parse_sites("0.mlp,1.attn,1.mlp")
    assert torch.equal(plan.aggregated[0, 0], torch.zeros(HIDDEN))  # alice has no 0.mlp
    assert torch.equal(plan.aggregated[1, 2], torch.zeros(HIDDEN))  # c has no 1.mlp
    alone = plan_steering([lower], keys[1:], [STEER])
    torch.testing.assert_close(plan.aggregated[1, :2], alone.aggregated[0])


def test_relative_strengths_over_the_union_of_sites_give_no_nan():
    lower = make_dictionary("c", 4, 3, parse_sites("0.mlp,1.attn"))
    relative = STEER.with_(relative=True)
    vectors = plan_steering([ALICE, lower], queries(2), [relative, relative]).vectors()
    for site, values in vectors.items():
        assert torch.isfinite(values).all(), site
    assert torch.equal(vectors[Site.parse("1.mlp")][1], torch.zeros(HIDDEN))
    torch.testing.assert_close(vectors[Site.parse("0.mlp")][1].norm(), torch.tensor(2.0 * 2.0))


def test_a_batch_without_any_dictionary_plans_no_sites():
    plan = plan_steering([None, None], [None, None], [STEER, STEER])
    assert plan.sites == () and plan.vectors() == {}


def test_a_row_with_a_dictionary_but_no_key_is_an_error():
    with pytest.raises(InvalidInputError, match="row 0 has a dictionary but no query key"):
        plan_steering([ALICE], [None], [STEER])


def test_mismatched_lengths_are_an_error():
    with pytest.raises(InvalidInputError, match="2 dictionaries, 1 keys and 2 configs"):
        plan_steering([ALICE, BOB], queries(1), [STEER, STEER])


def test_shifted_moves_steered_rows_and_leaves_the_others_at_zero():
    plan = plan_steering(*mixed_batch())
    delta = torch.ones_like(plan.aggregated)
    shifted = plan.shifted(delta)
    for row in (0, 2, 4):
        torch.testing.assert_close(shifted.aggregated[row], plan.aggregated[row] + 1)
    for row in (1, 3):
        assert torch.equal(shifted.aggregated[row], torch.zeros(len(SITES), HIDDEN))


def test_with_aggregated_refuses_another_shape():
    plan = plan_steering(*mixed_batch())
    with pytest.raises(InvalidInputError, match="aggregated vectors of shape"):
        plan.with_aggregated(torch.zeros(1, len(SITES), HIDDEN))


def test_randomized_keeps_each_rows_norm_per_site():
    plan = plan_steering(*mixed_batch())
    randomized = plan.randomized([f"row{i}" for i in range(5)])
    torch.testing.assert_close(
        randomized.aggregated.norm(dim=-1), plan.aggregated.norm(dim=-1), rtol=1e-5, atol=1e-6
    )
    cosine = torch.nn.functional.cosine_similarity(
        randomized.aggregated[0], plan.aggregated[0], dim=-1
    )
    assert (cosine.abs() < 0.99).all()  # a new direction, not the retrieved one


def test_randomized_depends_only_on_the_rows_seed():
    dictionaries, keys, configs = mixed_batch()
    batch = plan_steering(dictionaries, keys, configs).randomized(["s0", "s1", "s2", "s3", "s4"])
    alone = plan_steering(dictionaries[4:], keys[4:], configs[4:]).randomized(["s4"])
    other_order = plan_steering(
        [dictionaries[4], dictionaries[0]], [keys[4], keys[0]], [configs[4], configs[0]]
    ).randomized(["s4", "s0"])
    torch.testing.assert_close(alone.aggregated[0], batch.aggregated[4])
    torch.testing.assert_close(other_order.aggregated[0], batch.aggregated[4])


def test_randomized_rows_with_other_seeds_get_other_directions():
    key = queries(1)[0]
    plan = plan_steering([ALICE, ALICE], [key, key], [STEER, STEER])
    assert torch.equal(plan.aggregated[0], plan.aggregated[1])
    randomized = plan.randomized(["first", "second"])
    assert not torch.allclose(randomized.aggregated[0], randomized.aggregated[1])


def test_randomized_does_not_depend_on_the_sites_of_other_rows():
    lower = make_dictionary("c", 4, 3, parse_sites("0.mlp"))
    keys = queries(2)
    alone = plan_steering([ALICE], keys[:1], [STEER]).randomized(["s"])
    mixed = plan_steering([ALICE, lower], keys, [STEER, STEER]).randomized(["s", "t"])
    assert mixed.sites[1:] == alone.sites
    torch.testing.assert_close(mixed.aggregated[0, 1:], alone.aggregated[0])


def test_randomized_needs_one_seed_per_row():
    plan = plan_steering(*mixed_batch())
    with pytest.raises(InvalidInputError):
        plan.randomized(["only-one"])
