import pytest
import torch

from fints.errors import InvalidInputError
from fints.injection import steer
from fints.layers import resolve_layout
from fints.prompts import pad_batch
from fints.recording import record_means
from fints.sites import parse_sites

SITES = parse_sites("0.attn,1.mlp,1.block,2.attn")
SEQUENCES = [[1, 5, 7, 9, 11, 3], [1, 8, 4], [1, 20, 21, 22, 23, 24, 25, 26]]
TARGETS = [(3, 6), (1, 3), (4, 8)]  # [start, end) of each row's target tokens


def _mask(width: int) -> torch.Tensor:
    mask = torch.zeros(len(SEQUENCES), width, dtype=torch.bool)
    for row, (a, b) in enumerate(TARGETS):
        mask[row, a:b] = True
    return mask


def test_batched_means_equal_one_by_one(arch_model):
    layout = resolve_layout(arch_model)
    ids, attention = pad_batch(SEQUENCES, 0, side="right")
    batched = record_means(arch_model, layout, SITES, ids, attention, _mask(ids.shape[1]))
    for row, seq in enumerate(SEQUENCES):
        one_ids, one_att = pad_batch([seq], 0, side="right")
        mask = torch.zeros_like(one_att, dtype=torch.bool)
        mask[0, TARGETS[row][0] : TARGETS[row][1]] = True
        single = record_means(arch_model, layout, SITES, one_ids, one_att, mask)
        torch.testing.assert_close(batched.means[row], single.means[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.norms[row], single.norms[0], atol=1e-5, rtol=1e-4)


def test_padding_never_leaks_into_means(arch_model):
    """Changing the pad token id changes nothing: pads are outside the mean."""
    layout = resolve_layout(arch_model)
    ids0, attention = pad_batch(SEQUENCES, 0, side="right")
    ids9, _ = pad_batch(SEQUENCES, 9, side="right")
    mask = _mask(ids0.shape[1])
    a = record_means(arch_model, layout, SITES, ids0, attention, mask)
    b = record_means(arch_model, layout, SITES, ids9, attention, mask)
    torch.testing.assert_close(a.means, b.means)


def test_mean_is_over_the_masked_tokens_only(arch_model):
    layout = resolve_layout(arch_model)
    ids = torch.tensor([SEQUENCES[0]])
    attention = torch.ones_like(ids)
    captured = {}
    site = SITES[2]  # 1.block
    handle = layout.module(site).register_forward_hook(
        lambda _m, _i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    try:
        arch_model(ids)
    finally:
        handle.remove()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2:5] = True
    means = record_means(arch_model, layout, [site], ids, attention, mask)
    torch.testing.assert_close(means.means[0, 0], captured["h"][0, 2:5].mean(dim=0))


def test_zero_vector_leaves_logits_bit_identical(arch_model):
    layout = resolve_layout(arch_model)
    ids = torch.tensor([[1, 5, 7, 9], [1, 6, 6, 2]])
    base = arch_model(ids).logits
    zeros = {site: torch.zeros(2, arch_model.config.hidden_size) for site in SITES}
    with steer(layout, zeros):
        steered = arch_model(ids).logits
    assert torch.equal(base, steered)


def test_a_vector_changes_the_logits(arch_model):
    layout = resolve_layout(arch_model)
    ids = torch.tensor([[1, 5, 7, 9]])
    base = arch_model(ids).logits
    vec = {SITES[1]: torch.full((1, arch_model.config.hidden_size), 0.5)}
    with steer(layout, vec):
        assert not torch.allclose(arch_model(ids).logits, base)


def test_hooks_are_removed_on_exit(arch_model):
    layout = resolve_layout(arch_model)
    ids = torch.tensor([[1, 5, 7, 9]])
    base = arch_model(ids).logits
    vec = {SITES[1]: torch.full((1, arch_model.config.hidden_size), 0.5)}
    with steer(layout, vec):
        arch_model(ids)
    assert torch.equal(arch_model(ids).logits, base)
    assert all(not m._forward_hooks for m in arch_model.modules())


def test_hooks_are_removed_when_the_body_raises(arch_model):
    layout = resolve_layout(arch_model)
    ids = torch.tensor([[1, 5, 7, 9]])
    base = arch_model(ids).logits
    vec = {site: torch.ones(1, arch_model.config.hidden_size) for site in SITES}
    with pytest.raises(RuntimeError, match="boom"), steer(layout, vec):
        raise RuntimeError("boom")
    assert torch.equal(arch_model(ids).logits, base)
    assert all(not m._forward_hooks for m in arch_model.modules())


def test_a_nan_vector_is_a_clear_error_and_leaves_no_hooks(arch_model):
    layout = resolve_layout(arch_model)
    d = arch_model.config.hidden_size
    with (
        pytest.raises(InvalidInputError, match="NaN or inf"),
        steer(layout, {SITES[0]: torch.full((1, d), float("nan"))}),
    ):
        pass
    assert all(not m._forward_hooks for m in arch_model.modules())


def test_vectors_for_another_batch_size_are_a_clear_error(arch_model):
    layout = resolve_layout(arch_model)
    d = arch_model.config.hidden_size
    with (
        steer(layout, {SITES[0]: torch.ones(3, d)}),
        pytest.raises(InvalidInputError, match="3 vectors for a batch of 1"),
    ):
        arch_model(torch.tensor([[1, 2, 3]]))
    assert all(not m._forward_hooks for m in arch_model.modules())


def test_rows_carry_their_own_vectors_in_generate(arch_model):
    """Each row of a batched, KV-cached generate equals its own unbatched run."""
    layout = resolve_layout(arch_model)
    d = arch_model.config.hidden_size
    torch.manual_seed(1)
    prompts = [[1, 5, 7, 9, 11], [1, 8, 4]]
    vectors = torch.randn(2, d) * 2.0
    sites = parse_sites("1.attn+mlp")

    def scores(ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        out = arch_model.generate(
            input_ids=ids,
            attention_mask=attention,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        return torch.stack(out.scores, dim=1)  # [batch, steps, vocab]

    def run(rows: list[int]) -> torch.Tensor:
        ids, attention = pad_batch([prompts[r] for r in rows], 0, side="left")
        with steer(layout, {s: vectors[rows] for s in sites}):
            return scores(ids, attention)

    batched = run([0, 1])
    for row in (0, 1):
        torch.testing.assert_close(batched[row], run([row])[0], atol=1e-4, rtol=1e-4)
    # and the two rows really got different steering: unsteered scores differ from steered
    plain = scores(*pad_batch(prompts[:1], 0, side="left"))
    assert not torch.allclose(plain[0], batched[0])


def test_steering_reaches_every_decode_step_with_kv_cache(arch_model):
    """With the cache, new tokens are steered as the no-cache recomputation steers them."""
    layout = resolve_layout(arch_model)
    torch.manual_seed(2)
    vec = {s: torch.randn(1, arch_model.config.hidden_size) for s in parse_sites("1.attn+mlp")}
    ids = torch.tensor([[1, 5, 7, 9]])

    def scores(use_cache: bool) -> torch.Tensor:
        with steer(layout, vec):
            out = arch_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
                use_cache=use_cache,
                output_scores=True,
                return_dict_in_generate=True,
            )
        return torch.stack(out.scores, dim=1)

    torch.testing.assert_close(scores(True), scores(False), atol=1e-4, rtol=1e-4)
