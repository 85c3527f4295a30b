"""Trained steering vectors: the target NLL metric and the trainer (tiny random models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fints.errors import InvalidInputError
from fints.layers import resolve_layout
from fints.models import LoadedModel
from fints.sites import Site
from fints.steps import Steps, run_to_end
from fints.target_nll import capture_below, forward_nll, pack, target_nll, upper_nll
from fints.vector_training import (
    TrainedVectors,
    TrainingConfig,
    _Objective,
    holdout_latest,
    train_vectors,
    training_steps,
)
from tests.conftest import VOCAB, tiny_model

torch.set_num_threads(1)


def wrap(model: torch.nn.Module) -> LoadedModel:
    tokenizer = SimpleNamespace(pad_token_id=0)
    return LoadedModel(model, tokenizer, "tiny", "fp", resolve_layout(model))  # type: ignore[arg-type]


def tiny(arch: str) -> LoadedModel:
    return wrap(tiny_model(arch))


def sliding_qwen2() -> LoadedModel:
    """Qwen2 whose upper layers use sliding-window attention (mixed mask types)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=128, pad_token_id=0, use_sliding_window=True,
        sliding_window=3, max_window_layers=2,
    )  # fmt: skip
    assert len(set(config.layer_types)) == 2
    return wrap(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())


def random_examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(2, 10, (1,), generator=g))
        t = int(torch.randint(1, 7, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (p,), generator=g).tolist()
        out.append((prompt, torch.randint(3, VOCAB, (t,), generator=g).tolist()))
    return out


def patterned(n: int, token: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random prompts whose targets repeat one token: a signal a vector can learn."""
    return [(p, [token] * 4) for p, _ in random_examples(n, seed)]


def naive_nll(model: LoadedModel, prompt: list[int], target: list[int]) -> float:
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([prompt + target])).logits[0]
    logp = logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) - 1 + len(target)]
    return float(-logp.gather(1, torch.tensor(target)[:, None]).mean())


# -- target_nll ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_target_nll_batched_equals_one_by_one_and_naive(arch: str) -> None:
    model = tiny(arch)
    examples = random_examples(7)
    prompts, targets = [p for p, _ in examples], [t for _, t in examples]
    batched = target_nll(model, prompts, targets, batch_size=3)
    single = torch.cat([target_nll(model, [p], [t]) for p, t in examples])
    naive = torch.tensor([naive_nll(model, p, t) for p, t in examples])
    assert batched.shape == (7,)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, naive, atol=1e-5, rtol=0)


def test_target_nll_steered_rows_equal_one_by_one() -> None:
    model = tiny("llama")
    examples = random_examples(5, seed=1)
    prompts, targets = [p for p, _ in examples], [t for _, t in examples]
    site = Site(1, "block")
    rows = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    batched = target_nll(model, prompts, targets, {site: rows}, batch_size=2)
    single = torch.cat(
        [target_nll(model, [p], [t], {site: rows[i : i + 1]}) for i, (p, t) in enumerate(examples)]
    )
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    plain = target_nll(model, prompts, targets)
    assert (batched - plain).abs().max() > 1e-3  # the vectors did act


def test_target_nll_rejects_mismatched_inputs() -> None:
    model = tiny("llama")
    with pytest.raises(InvalidInputError):
        target_nll(model, [[1, 2]], [[3], [4]])
    with pytest.raises(InvalidInputError):
        target_nll(model, [[1, 2]], [[]])


# -- cached path vs full forward -------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: tiny("llama"), lambda: tiny("qwen2"), sliding_qwen2])
def test_cached_path_equals_full_forward_loss_and_gradient(make) -> None:
    model = make()
    batch = pack(random_examples(6, seed=2), 0)
    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    vectors = {Site(1, "attn"): v[0].expand(6, -1), Site(2, "block"): v[1].expand(6, -1)}
    state = capture_below(model, batch, lowest=1)
    cached = upper_nll(model, batch, state, vectors)
    (g_cached,) = torch.autograd.grad(cached.sum(), v)
    full = forward_nll(model, batch, vectors)
    (g_full,) = torch.autograd.grad(full.sum(), v)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_cached, g_full, atol=1e-5, rtol=1e-4)
    assert g_full.abs().sum() > 0


def test_cache_refuses_a_site_below_it() -> None:
    model = tiny("llama")
    batch = pack(random_examples(2), 0)
    state = capture_below(model, batch, lowest=2)
    with pytest.raises(InvalidInputError):
        upper_nll(model, batch, state, {Site(1, "mlp"): torch.zeros(2, 32)})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_cached_and_full_paths_agree(arch: str) -> None:
    model = tiny(arch)
    config = TrainingConfig(steps=5, lr=0.1, batch_size=4, patience=None)
    sites = [Site(1, "mlp"), Site(2, "block")]
    examples, valid = patterned(8, 5), patterned(3, 5, seed=9)
    cached = train_vectors(model, sites, examples, config=config, valid=valid, path="cached")
    full = train_vectors(model, sites, examples, config=config, valid=valid, path="full")
    assert cached.train_losses == pytest.approx(full.train_losses, abs=1e-5)
    assert cached.valid_losses == pytest.approx(full.valid_losses, abs=1e-5)
    torch.testing.assert_close(cached.values, full.values, atol=1e-4, rtol=1e-4)


def test_cached_path_needs_a_llama_like_model() -> None:
    with pytest.raises(InvalidInputError):
        train_vectors(tiny("gpt2"), [Site(1, "block")], patterned(2, 5), path="cached")


# -- the trainer -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_lowers_target_nll(arch: str) -> None:
    model = tiny(arch)
    examples = patterned(8, 7)
    prompts, targets = [p for p, _ in examples], [t for _, t in examples]
    config = TrainingConfig(steps=20, lr=0.1, l2=0.0, patience=None)
    result = train_vectors(model, [Site(1, "block")], examples, config=config)
    before = target_nll(model, prompts, targets).mean()
    after = target_nll(model, prompts, targets, result.rows(len(examples))).mean()
    assert after < before - 0.2
    assert result.values.shape == (1, 32) and result.values.dtype == torch.float32
    assert result.steps_run == 20 and result.best_step == 20 and len(result.train_losses) == 20
    assert result.train_losses[-1] < result.train_losses[0]


def test_training_restores_model_state() -> None:
    model = tiny("llama")
    model.model.train()
    model.model.lm_head.weight.requires_grad_(True)
    model.model.model.norm.weight.requires_grad_(False)
    train_vectors(model, [Site(1, "block")], patterned(3, 5), config=TrainingConfig(steps=2))
    assert model.model.training
    assert model.model.lm_head.weight.requires_grad
    assert not model.model.model.norm.weight.requires_grad
    assert model.model.lm_head.weight.grad is None


def test_early_stopping_keeps_the_best_valid_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny("llama")
    site, examples, valid = Site(1, "block"), patterned(8, 7), patterned(2, 7, seed=3)
    scripted = [1.0, 0.8, 0.5, 0.7, 0.9, 0.6, 0.4, 0.45]  # after 0, 1, 2, ... updates

    def train(steps: int, patience: int | None, script: bool):
        if script:
            values = iter(scripted)

            def scripted_nll(self: _Objective, v: torch.Tensor) -> Steps[float]:
                yield
                return next(values)

            monkeypatch.setattr(_Objective, "mean_nll", scripted_nll)
        config = TrainingConfig(steps=steps, lr=0.1, l2=0.0, patience=patience)
        result = train_vectors(model, [site], examples, config=config,
                               valid=valid if script else None)  # fmt: skip
        monkeypatch.undo()
        return result

    full = train(7, None, True)
    assert full.valid_losses == tuple(scripted)
    assert (full.best_step, full.steps_run) == (6, 7)
    torch.testing.assert_close(full.values, train(6, None, False).values)
    stopped = train(7, 2, True)  # no new best after updates 3 and 4: stop
    assert (stopped.best_step, stopped.steps_run) == (2, 4)
    torch.testing.assert_close(stopped.values, train(2, None, False).values)
    assert (train(7, 3, True).best_step, train(7, 3, True).steps_run) == (2, 5)
    assert not torch.equal(stopped.values, full.values)


def test_early_stopping_returns_the_init_when_every_step_hurts() -> None:
    model = tiny("llama")
    site = Site(1, "block")
    init = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    examples = patterned(6, 7)
    config = TrainingConfig(steps=6, lr=0.2, l2=0.0, patience=None)
    # validation: the token whose NLL training on the 7-pattern raises most
    moved = train_vectors(model, [site], examples, init=init, config=config)
    prompts = [p for p, _ in random_examples(4, seed=5)]

    def nll(token: int, rows: dict | None) -> float:
        return float(target_nll(model, prompts, [[token] * 4] * 4, rows).mean())

    init_rows = {site: init.expand(4, -1)}
    worst = max(range(3, VOCAB), key=lambda t: nll(t, moved.rows(4)) - nll(t, init_rows))
    valid = [(p, [worst] * 4) for p in prompts]
    result = train_vectors(model, [site], examples, init=init, config=config, valid=valid)
    assert all(loss > result.valid_losses[0] for loss in result.valid_losses[1:])
    assert result.best_step == 0 and result.steps_run == 6
    torch.testing.assert_close(result.values, init)
    assert result.valid_losses[0] == pytest.approx(nll(worst, init_rows), abs=1e-5)


def test_l2_pulls_the_result_toward_the_init() -> None:
    model = tiny("llama")
    init = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    examples = patterned(8, 7)

    def distance(l2: float) -> float:
        config = TrainingConfig(steps=20, lr=0.1, l2=l2, patience=None)
        result = train_vectors(model, [Site(1, "block")], examples, init=init, config=config)
        return float((result.values - init).norm())

    free, mild, strong = distance(0.0), distance(0.05), distance(100.0)
    assert free > 1.0
    assert strong < mild < free
    assert strong < 0.2 * free


def test_config_round_trip_and_validation() -> None:
    config = TrainingConfig(steps=7, lr=0.02, l2=0.5, batch_size=3, max_target_tokens=9,
                            patience=None, valid_fraction=0.1, seed=4)  # fmt: skip
    assert TrainingConfig.from_dict(config.to_dict()) == config
    assert TrainingConfig.from_dict(TrainingConfig().to_dict()) == TrainingConfig()
    with pytest.raises(InvalidInputError, match="bogus"):
        TrainingConfig.from_dict({"bogus": 1})
    with pytest.raises(InvalidInputError, match="lr"):
        TrainingConfig(lr=-1.0)


def test_max_target_tokens_cuts_the_targets() -> None:
    model = tiny("llama")
    examples = [(p, [5, 6, 7, 8, 9]) for p, _ in random_examples(3)]
    objective = _Objective(
        model, [Site(1, "block")], examples, TrainingConfig(max_target_tokens=2), True, None
    )
    assert objective.batches[0][0].counts.tolist() == [2.0, 2.0, 2.0]
    short = [(p, t[:2]) for p, t in examples]
    expected = target_nll(model, [p for p, _ in short], [t for _, t in short]).mean()
    run_to_end(objective.capture())
    mean = run_to_end(objective.mean_nll(torch.zeros(1, 32)))
    assert mean == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("path", ["cached", "full"])
def test_training_in_pieces_gives_the_same_vectors_in_more_steps(path: str) -> None:
    """The server trains in pieces of a few examples so that it decodes between them."""
    model = tiny("llama")
    examples, valid = patterned(10, 6), patterned(3, 6, seed=5)
    config = TrainingConfig(steps=4, lr=0.1, l2=1e-2, batch_size=8, patience=None)
    whole = train_vectors(model, [Site(1, "block")], examples, config=config, valid=valid,
                          path=path)  # fmt: skip
    steps = training_steps(model, [Site(1, "block")], examples, config=config, valid=valid,
                           path=path, piece_items=3)  # fmt: skip
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            pieces: TrainedVectors = stop.value
            break
        pauses += 1
        assert torch.is_grad_enabled()  # no grad mode leaks out of a piece
        assert not any(p.requires_grad for p in model.model.parameters())
    # batches of 8 and 2 in pieces of 3: 3 + 1 captures, 1 valid capture, and per step
    # 3 or 1 backward pieces plus 1 valid piece, after one valid pass before training
    assert pauses >= 4 + 1 + 1 + 4 * 2
    torch.testing.assert_close(pieces.values, whole.values, atol=1e-5, rtol=1e-4)
    assert pieces.valid_losses == pytest.approx(whole.valid_losses, abs=1e-5)


def test_holdout_latest_and_bad_inputs() -> None:
    examples = patterned(8, 5)
    train, valid = holdout_latest(examples, 0.25)
    assert train == examples[:6] and valid == examples[6:]
    assert holdout_latest(examples[:1], 0.5) == (examples[:1], [])
    assert holdout_latest(examples, 0.0) == (examples, [])
    model = tiny("llama")
    with pytest.raises(InvalidInputError):
        train_vectors(model, [Site(5, "block")], examples)
    with pytest.raises(InvalidInputError):
        train_vectors(model, [Site(1, "block")], examples, init=torch.zeros(2, 32))
    with pytest.raises(InvalidInputError):
        train_vectors(model, [Site(1, "block")], [])


def test_on_step_sees_every_update_and_the_last_is_kept() -> None:
    model = tiny("llama")
    seen: list[tuple[int, torch.Tensor]] = []
    config = TrainingConfig(steps=4, lr=0.1, l2=0.0, patience=None)
    result = train_vectors(
        model, [Site(1, "block")], patterned(4, 7), config=config,
        on_step=lambda step, values: seen.append((step, values)),
    )  # fmt: skip
    assert [step for step, _ in seen] == [1, 2, 3, 4]
    assert all(not v.requires_grad and v.device.type == "cpu" for _, v in seen)
    assert not torch.equal(seen[0][1], seen[1][1])  # copies, not one live tensor
    torch.testing.assert_close(seen[-1][1], result.values)
    torch.testing.assert_close(seen[1][1], train_vectors(
        model, [Site(1, "block")], patterned(4, 7), config=TrainingConfig(
            steps=2, lr=0.1, l2=0.0, patience=None),
    ).values)  # fmt: skip
