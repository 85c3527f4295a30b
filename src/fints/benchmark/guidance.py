"""The CLIPer benchmark: does classifier guidance put answers in the asked-for mood?

Prompts: moodswapper prompts held out from classifier training
(:func:`fints.guidance.recipes.held_out`), split once more: the responses to some train
the independent judge (TF-IDF + logistic regression, :class:`TextClassifier`); of the
rest, the first are the test prompts and the next the validation prompts. For every
test prompt and target mood, each condition writes an answer and the judge names its
mood:

* ``none``: plain decoding (the same answer for every mood);
* ``prompting``: the system prompt names the mood;
* ``icl``: the mood's own example answers (to training prompts) as earlier turns;
* ``guided a=...``: classifier guidance towards the mood at each weight alpha;
* ``guided, validated (a=..., rho=...)``: the one setting (weight and plausibility
  constraint) chosen on validation prompts, neither the judge's nor the test prompts,
  by a rule fixed beforehand (:mod:`fints.benchmark.guidance_select`), compared with
  none, prompting and ICL (Holm over the three);
* ``guided a=... + concise``: two dimensions at once (mood and the length classifier);
* ``steering`` and ``steering + guided``: each mood a user whose trained steering vectors
  (the demo's settings) steer the answer, alone and with guidance on the same row.

Fluency: perplexity of each answer under the generator itself, given the plain prompt
(answers that buy the mood with gibberish score high). Cost: decoding tokens/s on one
batch without guidance, with top-k rescoring and with the full-vocabulary head.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fints.benchmark.guidance_decode import (
    Answer,
    NoEncoder,
    Progress,
    Row,
    decode_rows,
    guided_prefs,
    measure_cost,
    render,
    score_answers,
    steering_answers,
)
from fints.benchmark.guidance_report import condition_table
from fints.benchmark.guidance_select import (
    MAX_PPL_RATIO,
    SELECTION_RULE,
    Scored,
    Selection,
    Setting,
    compare_validated,
    select_setting,
    split_validation,
)
from fints.benchmark.metrics import TextClassifier
from fints.engine import GenerationRequest, Personalizer
from fints.errors import InvalidInputError
from fints.guidance.library import ClassifierLibrary
from fints.guidance.mode import GuidanceMode
from fints.guidance.preferences import Preferences
from fints.guidance.recipes import MoodPair, held_out, read_moods
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import PromptTemplate
from fints.store import Store


@dataclass(frozen=True)
class GuidanceBenchConfig:
    alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0)
    moods: tuple[str, ...] | None = None  # default: every class of the mood classifier
    n_prompts: int = 5
    # validation: every alpha x plausible on these prompts, one setting chosen for the test
    n_valid_prompts: int = 5
    plausibles: tuple[float, ...] = (0.0,)
    max_ppl_ratio: float = MAX_PPL_RATIO
    test_alphas: tuple[float, ...] | None = None  # rows "guided a=..." (rho 0); None: alphas
    judge_share: float = 0.6  # of the held-out prompts: their responses train the judge
    max_new_tokens: int = 40
    batch_size: int = 48
    method: str = "full"
    top_k: int = 20
    icl_k: int = 2
    two_dims_alpha: float | None = 0.5  # mood at this alpha plus concise at the same
    cost_rows: int = 16  # the batch timed for the cost figures
    # > 0: each mood is a user with this many answers, its steering vectors trained as in
    # the demo; rows "steering" and "steering + guided a=<steer_alpha>"
    steering_items: int = 0
    steer_alpha: float = 0.5
    cost_tokens: int = 32
    mood_classifier: str = "mood"
    length_classifier: str = "length"
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [r for r in self.plausibles if not 0 <= r <= 1]  # nan fails too
        if bad or (self.n_valid_prompts and not (self.alphas and self.plausibles)):
            raise InvalidInputError(
                f"validation needs alphas and plausible values in [0, 1], got {self.alphas}, "
                f"{self.plausibles}",
                param="plausible",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GuidanceBenchResult:
    config: dict[str, Any]
    answers: list[Answer]
    judge: dict[str, Any]
    classifier: dict[str, Any]
    cost: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # the setting chosen on the validation prompts, and how it does on the test prompts
    validation: dict[str, Any] = field(default_factory=dict)
    valid_answers: list[Answer] = field(default_factory=list)

    def table(self) -> list[dict[str, Any]]:
        """Per test condition: mood rate, perplexity; differences with none and prompting."""
        return condition_table(self.answers, self.config["seed"])


def _split_prompts(pairs: Sequence[MoodPair], share: float, seed: int) -> tuple[set, list]:
    held = sorted({p.prompt for p in pairs if held_out(p.prompt)})
    random.Random(seed).shuffle(held)
    cut = round(len(held) * share)
    return set(held[:cut]), held[cut:]


def validate(
    engine: Personalizer,
    judge: TextClassifier,
    config: GuidanceBenchConfig,
    prompts: Sequence[str],
    moods: Sequence[str],
    progress: Progress | None = None,
) -> tuple[list[Answer], list[Scored], Selection]:
    """Every alpha x plausible setting (and none) on the validation ``prompts``; the
    setting :func:`select_setting` picks from these figures alone."""
    grid = [Setting(a, rho) for rho in config.plausibles for a in config.alphas]
    system = PromptTemplate().system_prompt
    rows: list[Row] = []
    for q in prompts:
        plain = render(engine.model, q, system, ())
        rows.append(("none", "", q, GenerationRequest(None, plain, raw_prompt=True)))
        for mood in moods:
            for s in grid:
                prefs = guided_prefs(config, {config.mood_classifier: {mood: s.alpha}}, s.plausible)
                request = GenerationRequest(None, plain, raw_prompt=True, preferences=prefs)
                rows.append((s.label, mood, q, request))
    answers = score_answers(
        engine.model, judge, decode_rows(engine, rows, config, progress, "validation"), moods
    )
    table = {r["condition"]: r for r in condition_table(answers, config.seed)}
    scored = [Scored(s, table[s.label]["mood_rate"], table[s.label]["ppl_ratio"]) for s in grid]
    selection = select_setting(scored, table["none"]["mood_rate"], config.max_ppl_ratio)
    return answers, scored, selection


def run_guidance_bench(
    model: LoadedModel,
    library: ClassifierLibrary,
    config: GuidanceBenchConfig | None = None,
    progress: Progress | None = None,
) -> GuidanceBenchResult:
    config = config or GuidanceBenchConfig()
    began = time.perf_counter()
    pairs = read_moods()
    mood_clf = library.config(config.mood_classifier)
    moods = config.moods or mood_clf.classes
    judge_prompts, held = _split_prompts(pairs, config.judge_share, config.seed)
    judge_pairs = [p for p in pairs if p.prompt in judge_prompts]
    judge = TextClassifier(config.seed).fit(
        [p.response for p in judge_pairs], [p.mood for p in judge_pairs]
    )
    # test prompts answered in every asked mood first, so moods share prompts
    by_prompt: dict[str, set[str]] = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt, set()).add(p.mood)
    held.sort(key=lambda q: -len(by_prompt[q] & set(moods)))
    prompts, valid = split_validation(held, judge_prompts, config.n_prompts, config.n_valid_prompts)
    engine = Personalizer(
        model, Store(":memory:"), modes=(GuidanceMode(library),), encoder=NoEncoder()
    )
    validation: dict[str, Any] = {}
    valid_answers: list[Answer] = []
    selection = None
    if valid:
        valid_answers, scored, selection = validate(engine, judge, config, valid, moods, progress)
        validation = _validation_record(config, valid, valid_answers, scored, selection)
    rng = random.Random(config.seed)
    examples = {m: [p for p in pairs if p.mood == m and not held_out(p.prompt)] for m in moods}
    default_system = PromptTemplate().system_prompt
    requests: list[Row] = []

    def add(condition: str, mood: str, q: str, text: str, prefs: Preferences | None) -> None:
        requests.append(
            (condition, mood, q, GenerationRequest(None, text, raw_prompt=True, preferences=prefs))
        )

    alphas = config.alphas if config.test_alphas is None else config.test_alphas
    for q in prompts:
        plain = render(model, q, default_system, ())
        add("none", "", q, plain, None)
        for mood in moods:
            system = f"{default_system} Answer as someone who feels {mood}."
            add("prompting", mood, q, render(model, q, system, ()), None)
            shots = rng.sample(examples[mood], min(config.icl_k, len(examples[mood])))
            context = [HistoryItem(s.prompt, s.response) for s in shots]
            add("icl", mood, q, render(model, q, default_system, context), None)
            for alpha in alphas:
                prefs = guided_prefs(config, {config.mood_classifier: {mood: alpha}})
                add(f"guided a={alpha:g}", mood, q, plain, prefs)
            if selection is not None:
                s = selection.setting
                prefs = guided_prefs(config, {config.mood_classifier: {mood: s.alpha}}, s.plausible)
                add(selection.label, mood, q, plain, prefs)
            if config.two_dims_alpha is not None:
                both = config.two_dims_alpha
                weights = {
                    config.mood_classifier: {mood: both},
                    config.length_classifier: {"concise": both},
                }
                add(f"guided a={both:g} + concise", mood, q, plain, guided_prefs(config, weights))
    answers = decode_rows(engine, requests, config, progress)
    if config.steering_items:
        answers += steering_answers(model, library, config, examples, prompts, progress)
    expanded = score_answers(model, judge, answers, moods)
    if selection is not None:
        comparisons = compare_validated(expanded, selection.label, config.seed)
        test = {r["condition"]: r for r in condition_table(expanded, config.seed)}
        ratio = test[selection.label]["ppl_ratio"]
        validation["comparisons"] = comparisons
        validation["test_ppl_ratio"] = ratio
        validation["target_met"] = bool(
            all(c["above_zero"] for c in comparisons.values())
            and len(comparisons) == 3
            and ratio <= config.max_ppl_ratio
        )
    held_judge = _judge_accuracy(judge, pairs, set(prompts), moods)
    return GuidanceBenchResult(
        config=config.to_dict(),
        answers=expanded,
        judge={"train_texts": len(judge_pairs), "accuracy_on_test_prompts": held_judge},
        classifier=mood_clf.metrics,
        cost=measure_cost(model, library, config, prompts, moods) if config.cost_rows else {},
        seconds=time.perf_counter() - began,
        validation=validation,
        valid_answers=valid_answers,
    )


def _validation_record(
    config: GuidanceBenchConfig,
    prompts: Sequence[str],
    answers: Sequence[Answer],
    scored: Sequence[Scored],
    selection: Selection,
) -> dict[str, Any]:
    none = [a.hit for a in answers if a.condition == "none"]
    return {
        "prompts": list(prompts),
        "rule": SELECTION_RULE.format(bound=config.max_ppl_ratio),
        "max_ppl_ratio": config.max_ppl_ratio,
        "none_rate": sum(none) / len(none),
        "scored": [
            {
                "label": s.setting.label,
                "alpha": s.setting.alpha,
                "plausible": s.setting.plausible,
                "mood_rate": s.mood_rate,
                "ppl_ratio": s.ppl_ratio,
            }
            for s in scored
        ],
        "selection": {
            "label": selection.label,
            "setting_label": selection.setting.label,
            "alpha": selection.setting.alpha,
            "plausible": selection.setting.plausible,
            "rule": selection.rule,
            "why": selection.why,
        },
    }


def _judge_accuracy(
    judge: TextClassifier, pairs: Sequence[MoodPair], prompts: set[str], moods: Sequence[str]
) -> float:
    """The judge on the gold responses to the test prompts (never trained on)."""
    gold = [p for p in pairs if p.prompt in prompts and p.mood in moods]
    return float(judge.hit_rate([p.response for p in gold], [p.mood for p in gold]).mean())
