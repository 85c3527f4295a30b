"""Guidance's plausibility constraint (``plausible`` = rho): rho 0 is guidance as before, bit
for bit; rho 1 leaves only the argmax (plain greedy decoding); in between every chosen
token has base probability >= rho x the step's largest; rows with other rho share a batch
(tiny random llama with the embedded model's tokenizer)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fints.cli import app
from fints.errors import InvalidInputError
from fints.generation import Decoration, GenerationOptions, generate_batch
from fints.guidance.classifier import Backbone, GuidanceClassifier
from fints.guidance.mode import GuidanceAddition, guidance_spec
from fints.guidance.preferences import Preferences, parse_preference_flags
from fints.guidance.processor import GuidanceProcessor, GuidanceSpec
from fints.models import LoadedModel
from tests.unit.benchmark_fixtures import tiny_llama
from tests.unit.guidance_fixtures import prompts, random_classifier

OPTIONS = GenerationOptions(max_new_tokens=8, ignore_eos=True)
TEXTS = ["How do I boil an egg?", "Tell me about cats", "Why is the sky blue?", "Hello"]
STRONG = [[6.0, 0, 0]] * 4  # every row guided towards "happy"


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="module")
def mood(model: LoadedModel) -> GuidanceClassifier:
    return random_classifier(Backbone(model, layers=2), "mood", ("happy", "sad", "zen"), seed=1)


class Recorder:
    """A logits processor that keeps the scores it sees (put before guidance: the base)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: Any, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores.detach().float().clone())
        return scores


def spec(
    mood: GuidanceClassifier,
    rho: list[float] | None,
    top_k: list[int],
    weights: list[list[float]] = STRONG,
) -> GuidanceSpec:
    plausible = None if rho is None else torch.tensor(rho, dtype=torch.float64)
    return GuidanceSpec((mood,), (torch.tensor(weights),), torch.tensor(top_k), plausible)


def decode(
    model: LoadedModel, s: GuidanceSpec | None, texts: list[str] = TEXTS
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Token ids per row and the base scores of every step."""
    recorder = Recorder()
    chain: tuple[Any, ...] = (recorder,) if s is None else (recorder, GuidanceProcessor(s))
    done = generate_batch(
        model, prompts(model, texts), OPTIONS, decorations=[Decoration(logits_processors=chain)]
    )
    return [c.token_ids for c in done], recorder.steps


def violations(tokens: list[list[int]], steps: list[torch.Tensor], rho: list[float]) -> int:
    """Chosen tokens whose base probability is below rho x the step's largest."""
    bad = 0
    for t, scores in enumerate(steps):
        base = scores.log_softmax(-1)
        for row, ids in enumerate(tokens):
            if t < len(ids) and rho[row] > 0:
                floor = base[row].max() + math.log(rho[row])
                bad += int(base[row, ids[t]] < floor - 1e-5)
    return bad


@pytest.mark.parametrize("top_k", [[0] * 4, [30] * 4, [0, 30, 0, 30]])
def test_rho_zero_is_guidance_as_before_bit_for_bit(
    model: LoadedModel, mood: GuidanceClassifier, top_k: list[int]
) -> None:
    before, _ = decode(model, spec(mood, None, top_k))
    zero, _ = decode(model, spec(mood, [0.0] * 4, top_k))
    assert zero == before
    scores = torch.randn(4, mood.embeddings.shape[0], generator=torch.Generator().manual_seed(0))
    ids = torch.ones(4, 3, dtype=torch.long)
    out_before = GuidanceProcessor(spec(mood, None, top_k))(ids, scores.clone())  # type: ignore[arg-type]
    out_zero = GuidanceProcessor(spec(mood, [0.0] * 4, top_k))(ids, scores.clone())  # type: ignore[arg-type]
    assert torch.equal(out_before, out_zero)


@pytest.mark.parametrize("top_k", [[0] * 4, [50] * 4])
def test_rho_one_leaves_only_the_argmax_plain_greedy_decoding(
    model: LoadedModel, mood: GuidanceClassifier, top_k: list[int]
) -> None:
    plain, _ = decode(model, None)
    unconstrained, _ = decode(model, spec(mood, [0.0] * 4, top_k))
    assert unconstrained != plain  # the weight alone moves the text
    assert decode(model, spec(mood, [1.0] * 4, top_k))[0] == plain


@pytest.mark.parametrize(
    ("top_k", "rhos"),
    [
        ([0] * 4, [0.7] * 4),
        ([0] * 4, [0.9] * 4),
        ([40] * 4, [0.9] * 4),
        ([40] * 4, [0.95] * 4),
        ([0, 40, 0, 40], [0.7, 0.95, 0.9, 0.9]),
    ],
)
def test_every_chosen_token_is_plausible_under_the_base_distribution(
    model: LoadedModel, mood: GuidanceClassifier, top_k: list[int], rhos: list[float]
) -> None:
    """The tiny random model's next-token distributions are flat (most tokens within 2x of
    the largest), so only a large rho binds; the test checks that it does."""
    tokens, steps = decode(model, spec(mood, rhos, top_k))
    assert len(steps) == OPTIONS.max_new_tokens
    assert violations(tokens, steps, rhos) == 0
    plain, _ = decode(model, None)
    assert tokens != plain  # guidance still reorders the plausible candidates
    # without the constraint the same guidance picks implausible tokens: it binds
    free, free_steps = decode(model, spec(mood, [0.0] * 4, top_k))
    assert violations(free, free_steps, rhos) > 2


def test_a_batch_mixing_rho_equals_each_row_alone(
    model: LoadedModel, mood: GuidanceClassifier
) -> None:
    rhos, top_k = [0.0, 0.3, 1.0, 0.1], [0, 30, 0, 0]
    weights = [[6.0, 0, 0], [0, 6.0, 0], [0, 0, 6.0], [0, 0, 0]]
    s = spec(mood, rhos, top_k, weights)
    together, _ = decode(model, s)
    for row in range(4):
        alone, _ = decode(model, s.select([row]), [TEXTS[row]])
        assert alone[0] == together[row], row
    assert together[3] == decode(model, None)[0][3]  # no weight: plain, whatever rho


def test_select_and_the_mode_carry_each_rows_rho(mood: GuidanceClassifier) -> None:
    prefs = [
        Preferences({"mood": {"happy": 1.0}}, "topk", 7, 0.25),
        None,
        Preferences({"mood": {"sad": 1.0}}, plausible=1),
    ]
    s = guidance_spec(prefs, {"mood": mood})
    assert s.rho.tolist() == [0.25, 0.0, 1.0] and s.top_k.tolist() == [7, 0, 0]
    picked = GuidanceAddition(s, ("a", "", "c")).select([2, 0])
    assert picked.spec.rho.tolist() == [1.0, 0.25]
    assert picked.spec.top_k.tolist() == [0, 7]


@pytest.mark.parametrize("rho", [[-0.1, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, float("nan"), 0], [0.5]])
def test_bad_rho_tensors_are_refused(mood: GuidanceClassifier, rho: list[float]) -> None:
    with pytest.raises(InvalidInputError, match="plausible"):
        spec(mood, rho, [0] * 4)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "x", True, None])
def test_bad_plausible_settings_name_the_field(bad: Any) -> None:
    data = {"preferences": {"mood": {"happy": 1}}, "guidance": {"plausible": bad}}
    with pytest.raises(InvalidInputError, match=r"guidance\.plausible") as caught:
        Preferences.from_dict(data)
    assert caught.value.param == "guidance.plausible"


def test_plausible_round_trips_and_is_described() -> None:
    prefs = Preferences({"mood": {"happy": 2.0}}, "topk", 20, 0.3)
    assert Preferences.from_dict(prefs.to_dict()) == prefs
    assert "plausible >= 0.3 x max" in prefs.describe()
    assert "plausible" not in Preferences({"mood": {"happy": 2.0}}).describe()
    assert Preferences.from_dict({"preferences": {"mood": {"happy": 1}}}).plausible == 0.0  # type: ignore[union-attr]
    flags = parse_preference_flags(["mood=happy:1"], "topk", 5, 0.1)
    assert flags is not None and flags.plausible == 0.1


def test_a_bad_plausible_flag_is_one_clear_error(tmp_path: Path) -> None:
    args = ["generate", "-", "Hi", "--store", str(tmp_path / "s.sqlite")]
    args += ["--prefer", "mood=happy:1", "--guidance-plausible", "1.5"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 1
    assert "guidance.plausible" in out.output and "Traceback" not in out.output
