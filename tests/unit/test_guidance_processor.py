"""The guidance LogitsProcessor: per-row weights in one batch, rows without weight left
bit-identical, the CLIPer formula, top-k rescoring, shared backbones and the KV cache
(tiny random llama with the embedded model's tokenizer)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from fints.errors import InvalidInputError
from fints.generation import Decoration, GenerationOptions, generate_batch
from fints.guidance.classifier import Backbone, GuidanceClassifier
from fints.guidance.processor import GuidanceProcessor, GuidanceSpec
from fints.models import LoadedModel
from tests.unit.benchmark_fixtures import tiny_llama
from tests.unit.guidance_fixtures import prompts, random_classifier

OPTIONS = GenerationOptions(max_new_tokens=6, ignore_eos=True)
TEXTS = ["How do I boil an egg?", "Tell me about cats", "Why is the sky blue?", "Hello"]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="module")
def backbone(model: LoadedModel) -> Backbone:
    return Backbone(model, layers=2)


@pytest.fixture(scope="module")
def mood(backbone: Backbone) -> GuidanceClassifier:
    return random_classifier(backbone, "mood", ("happy", "sad", "zen"), seed=1)


@pytest.fixture(scope="module")
def length(backbone: Backbone) -> GuidanceClassifier:
    return random_classifier(backbone, "length", ("concise", "long"), seed=2)


def spec(
    classifiers: list[GuidanceClassifier], weights: list[list[list[float]]], top_k: list[int]
) -> GuidanceSpec:
    return GuidanceSpec(
        tuple(classifiers), tuple(torch.tensor(w) for w in weights), torch.tensor(top_k)
    )


def decode(model: LoadedModel, spec_: GuidanceSpec | None) -> list[list[int]]:
    decorations = (
        [] if spec_ is None else [Decoration(logits_processors=(GuidanceProcessor(spec_),))]
    )
    done = generate_batch(model, prompts(model, TEXTS), OPTIONS, decorations=decorations)
    return [c.token_ids for c in done]


def test_rows_without_weight_decode_as_plain_rows_of_the_same_batch(
    model: LoadedModel, mood: GuidanceClassifier
) -> None:
    # row 0: guided (full); row 1: all weights 0; row 2: top-k guided; row 3: all 0
    s = spec([mood], [[[4.0, 0, 0], [0, 0, 0], [0, 0, 4.0], [0, 0, 0]]], [0, 0, 50, 20])
    guided, plain = decode(model, s), decode(model, None)
    assert guided[1] == plain[1] and guided[3] == plain[3]
    assert guided[0] != plain[0] and guided[2] != plain[2]  # the weight changes the text


def test_a_batch_with_no_weight_at_all_is_plain_decoding(
    model: LoadedModel, mood: GuidanceClassifier
) -> None:
    assert decode(model, spec([mood], [[[0, 0, 0]] * 4], [0] * 4)) == decode(model, None)


def test_top_1_rescoring_keeps_the_greedy_token(
    model: LoadedModel, mood: GuidanceClassifier
) -> None:
    """FUDGE with k=1 has one candidate: whatever the weight, greedy decoding is unchanged."""
    s = spec([mood], [[[9.0, 0, 0]] * 4], [1] * 4)
    assert decode(model, s) == decode(model, None)


def first_step(processor: GuidanceProcessor, scores: torch.Tensor) -> torch.Tensor:
    ids = torch.ones(scores.shape[0], 3, dtype=torch.long)
    return processor(ids, scores.clone())  # type: ignore[arg-type]


def lead_hidden(clf: GuidanceClassifier) -> torch.Tensor:
    states, _ = clf.backbone.forward(torch.tensor([list(clf.config.lead_ids)]))
    return states[:, -1]


def test_full_vocabulary_guidance_is_the_cliper_formula(
    model: LoadedModel, mood: GuidanceClassifier, length: GuidanceClassifier
) -> None:
    vocab = mood.embeddings.shape[0]
    scores = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    s = spec([mood, length], [[[0.5, 0, 0.2], [0, 0, 0]], [[0, 1.0], [0, 0]]], [0, 0])
    out = first_step(GuidanceProcessor(s), scores)
    h = lead_hidden(mood)
    by_hand = (
        scores[0].log_softmax(-1)
        + 0.5 * mood.log_probs_full(h)[0, :, 0]
        + 0.2 * mood.log_probs_full(h)[0, :, 2]
        + 1.0 * length.log_probs_full(h)[0, :, 1]
    )
    torch.testing.assert_close(out[0], by_hand, rtol=1e-4, atol=1e-4)
    assert torch.equal(out[1], scores[1])


def test_top_k_rescores_only_the_k_best_candidates(
    model: LoadedModel, mood: GuidanceClassifier
) -> None:
    vocab = mood.embeddings.shape[0]
    scores = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    s = spec([mood], [[[0, 2.0, 0], [0, 2.0, 0]]], [5, 3])
    out = first_step(GuidanceProcessor(s), scores)
    for row, k in ((0, 5), (1, 3)):
        top = scores[row].topk(k).indices
        assert set(torch.isfinite(out[row]).nonzero().flatten().tolist()) == set(top.tolist())
        h = lead_hidden(mood)
        want = scores[row].log_softmax(-1)[top] + 2.0 * mood.log_probs_full(h)[0, top, 1]
        torch.testing.assert_close(out[row, top], want, rtol=1e-4, atol=1e-4)


class CountingBackbone(Backbone):
    calls: int

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().forward(*args, **kwargs)


def test_classifiers_on_one_backbone_share_its_forward_pass(model: LoadedModel) -> None:
    backbone = CountingBackbone(model, layers=2)
    backbone.calls = 0
    a = random_classifier(backbone, "a", ("x", "y"), seed=3)
    b = random_classifier(backbone, "b", ("u", "v"), seed=4)
    decode(model, spec([a, b], [[[1.0, 0]] * 4, [[0, 1.0]] * 4], [0] * 4))
    assert backbone.calls == OPTIONS.max_new_tokens  # one pass per step, not one per classifier


def test_the_kv_cache_gives_the_states_of_a_full_forward(backbone: Backbone) -> None:
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    full, _ = backbone.forward(ids)
    states, cache = backbone.forward(ids[:, :2])
    steps = [states[:, -1]]
    for t in range(2, ids.shape[1]):
        states, cache = backbone.forward(ids[:, t : t + 1], cache=cache)
        steps.append(states[:, -1])
    torch.testing.assert_close(torch.cat(steps), full[0, 1:], rtol=1e-4, atol=1e-5)


def test_a_processor_reused_for_a_second_call_starts_over(
    model: LoadedModel, mood: GuidanceClassifier
) -> None:
    s = spec([mood], [[[3.0, 0, 0]] * 4], [0] * 4)
    processor = GuidanceProcessor(s)
    decorations = [Decoration(logits_processors=(processor,))]
    ids = prompts(model, TEXTS)
    first = generate_batch(model, ids, OPTIONS, decorations=decorations)
    second = generate_batch(model, ids, OPTIONS, decorations=decorations)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]


def test_the_backbone_is_a_copy_steering_hooks_never_reach(model: LoadedModel) -> None:
    backbone = Backbone(model, layers=2)
    assert all(
        p.data_ptr() != q.data_ptr()
        for p, q in zip(backbone.decoder.parameters(), model.model.parameters(), strict=False)
    )
    assert len(list(backbone.decoder.layers)) == 2 and model.num_layers == 4


@pytest.mark.parametrize(
    ("weights", "match"),
    [([[float("nan"), 0, 0]], "finite"), ([[-1.0, 0, 0]], ">= 0"), ([[1.0, 0]], r"\[1, 3\]")],
)
def test_bad_weight_matrices_are_refused(
    mood: GuidanceClassifier, weights: list[list[float]], match: str
) -> None:
    with pytest.raises(InvalidInputError, match=match):
        spec([mood], [weights], [0])


def test_guidance_divides_the_class_logits_by_the_temperature(
    model: LoadedModel, mood: GuidanceClassifier
) -> None:
    """A classifier with temperature T guides with log_softmax(logits / T), for the full
    vocabulary and for top-k candidates alike, and T changes what it adds."""
    hot = GuidanceClassifier(replace(mood.config, temperature=4.0), mood.head, mood.backbone)
    vocab = mood.embeddings.shape[0]
    scores = torch.randn(2, vocab, generator=torch.Generator().manual_seed(2))
    s = spec([hot], [[[0.7, 0, 0], [0.7, 0, 0]]], [0, 6])
    out = first_step(GuidanceProcessor(s), scores)
    h = lead_hidden(mood)
    log_p = (mood.head.full(h, mood.embeddings) / 4.0).log_softmax(-1)[0, :, 0]
    torch.testing.assert_close(
        out[0], scores[0].log_softmax(-1) + 0.7 * log_p, rtol=1e-4, atol=1e-4
    )
    top = scores[1].topk(6).indices
    want = scores[1].log_softmax(-1)[top] + 0.7 * log_p[top]
    torch.testing.assert_close(out[1, top], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        hot.log_probs_candidates(h, top[None]), hot.log_probs_full(h)[:, top], rtol=1e-5, atol=1e-5
    )
    cold = first_step(GuidanceProcessor(spec([mood], [[[0.7, 0, 0], [0.7, 0, 0]]], [0, 6])), scores)
    assert (cold[0] - out[0]).abs().max() > 1e-2  # T = 1 would guide differently
