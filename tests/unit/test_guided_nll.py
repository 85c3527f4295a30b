"""Teacher-forced NLL under guided decoding's distribution (tiny random llama, random
classifier heads): unguided rows are the plain NLL, guided rows follow the CLIPer formula,
teacher-forcing the guided greedy decode picks its tokens back, rho drops tokens."""

from __future__ import annotations

import pytest
import torch

from fints.benchmark.guided_nll import GuidedRow, build_spec, guided_nll, guided_steps
from fints.errors import InvalidInputError
from fints.generation import Decoration, GenerationOptions, generate_batch
from fints.guidance.classifier import Backbone, GuidanceClassifier
from fints.guidance.processor import GuidanceProcessor
from fints.models import LoadedModel
from fints.target_nll import target_nll
from tests.unit.benchmark_fixtures import tiny_llama
from tests.unit.guidance_fixtures import prompts, random_classifier


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="module")
def classifiers(model: LoadedModel) -> list[GuidanceClassifier]:
    backbone = Backbone(model, layers=2)
    return [
        random_classifier(backbone, "a", ("other", "own"), seed=1),
        random_classifier(backbone, "b", ("other", "own"), seed=2),
    ]


def example(model: LoadedModel) -> tuple[list[int], list[int]]:
    prompt = prompts(model, ["Write a headline for this article: cats"])[0]
    target = prompts(model, ["Cats Are Taking Over The Internet"])[0]
    return prompt, [*target, model.tokenizer.eos_token_id]


def test_an_unguided_row_is_the_plain_nll(
    model: LoadedModel, classifiers: list[GuidanceClassifier]
) -> None:
    prompt, target = example(model)
    spec = build_spec(classifiers, [GuidedRow(), GuidedRow(0, "own", 2.0)])
    nll = guided_nll(model, prompt, target, spec)
    plain = float(target_nll(model, [prompt], [target])[0])
    assert nll[0].item() == pytest.approx(plain, abs=1e-4)
    assert abs(nll[1].item() - plain) > 1e-3  # the weight changes the distribution


def test_a_guided_row_follows_the_cliper_formula(
    model: LoadedModel, classifiers: list[GuidanceClassifier]
) -> None:
    prompt, target = example(model)
    alpha, clf = 1.5, classifiers[1]
    spec = build_spec(classifiers, [GuidedRow(0, "own", 0.7), GuidedRow(1, "own", alpha)])
    got = guided_steps(model, prompt, target, spec).logprobs[1]
    with torch.no_grad():
        ids = torch.tensor([prompt + target[:-1]])
        base = model.model(input_ids=ids).logits[0, len(prompt) - 1 :].double().log_softmax(-1)
        read = torch.tensor([[*clf.config.lead_ids, *target[:-1]]])
        hidden, _ = clf.backbone.forward(read)  # the whole prefix at once, no cache
        own = clf.log_probs_full(hidden[0])[..., clf.classes.index("own")].double()
    expected = (base + alpha * own).log_softmax(-1)[torch.arange(len(target)), target]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_teacher_forcing_the_guided_greedy_decode_picks_its_tokens(
    model: LoadedModel, classifiers: list[GuidanceClassifier]
) -> None:
    """The processor sees in teacher forcing what it sees in ``generate``."""
    prompt, _ = example(model)
    rows = [GuidedRow(0, "own", 3.0), GuidedRow(1, "own", 3.0), GuidedRow()]
    options = GenerationOptions(max_new_tokens=8, ignore_eos=True)
    decoded = []
    for row in rows:
        spec = build_spec(classifiers, [row])
        done = generate_batch(
            model,
            [prompt],
            options,
            decorations=[Decoration(logits_processors=(GuidanceProcessor(spec),))],
        )
        decoded.append(done[0].token_ids)
    assert decoded[0] != decoded[2] or decoded[1] != decoded[2]  # guidance did something
    for row, tokens in zip(rows, decoded, strict=True):
        steps = guided_steps(model, prompt, tokens, build_spec(classifiers, [row]))
        assert steps.greedy[0].tolist() == tokens


def test_plausibility_one_keeps_only_the_base_argmax(
    model: LoadedModel, classifiers: list[GuidanceClassifier]
) -> None:
    prompt, target = example(model)
    spec = build_spec(classifiers, [GuidedRow(0, "own", 1.0, plausible=1.0)])
    steps = guided_steps(model, prompt, target, spec)
    with torch.no_grad():
        ids = torch.tensor([prompt + target[:-1]])
        top = model.model(input_ids=ids).logits[0, len(prompt) - 1 :].argmax(-1)
    kept = top == torch.tensor(target)
    assert not kept.all()  # a random model's argmax is not the gold headline
    assert torch.isinf(steps.logprobs[0, ~kept]).all()
    torch.testing.assert_close(
        steps.logprobs[0, kept], torch.zeros(int(kept.sum()), dtype=torch.float64)
    )
    assert torch.isinf(steps.nll[0])


def test_bad_rows_are_refused(classifiers: list[GuidanceClassifier]) -> None:
    with pytest.raises(InvalidInputError):
        build_spec(classifiers, [GuidedRow(0, "mine", 1.0)])
    with pytest.raises(InvalidInputError):
        build_spec(classifiers, [GuidedRow(5, "own", 1.0)])
    with pytest.raises(InvalidInputError):
        build_spec(classifiers, [])
