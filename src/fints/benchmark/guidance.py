"""The CLIPer benchmark: does classifier guidance put answers in the asked-for mood?

Prompts: moodswapper prompts held out from classifier training
(:func:`fints.guidance.recipes.held_out`), split once more: the responses to some train
the independent judge (TF-IDF + logistic regression, :class:`TextClassifier`), the rest
are the test prompts. For every test prompt and target mood, each condition writes an
answer and the judge names its mood:

* ``none``: plain decoding (the same answer for every mood);
* ``prompting``: the system prompt names the mood;
* ``icl``: the mood's own example answers (to training prompts) as earlier turns;
* ``guided a=...``: classifier guidance towards the mood at each weight alpha;
* ``guided a=... + concise``: two dimensions at once (mood and the length classifier);
* ``steering`` and ``steering + guided``: each mood a user whose trained steering vectors
  (the demo's settings) steer the answer, alone and with guidance on the same row.

Fluency: perplexity of each answer under the generator itself, given the plain prompt
(answers that buy the mood with gibberish score high). Cost: decoding tokens/s on one
batch without guidance, with top-k rescoring and with the full-vocabulary head.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fints.benchmark.metrics import TextClassifier
from fints.benchmark.stats import user_bootstrap
from fints.demo import DEMO_EXTRACTION, DEMO_STEERING
from fints.engine import GenerationRequest, Personalizer
from fints.generation import GenerationOptions
from fints.guidance.library import ClassifierLibrary
from fints.guidance.mode import GuidanceMode
from fints.guidance.preferences import Preferences
from fints.guidance.recipes import MoodPair, held_out, read_moods
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import PromptTemplate, encode_prompt, render_prompt
from fints.store import Store
from fints.target_nll import target_nll

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GuidanceBenchConfig:
    alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0)
    moods: tuple[str, ...] | None = None  # default: every class of the mood classifier
    n_prompts: int = 5
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Answer:
    condition: str
    mood: str
    prompt: str
    text: str
    tokens: list[int]
    hit: float = 0.0
    ppl: float = 0.0


@dataclass
class GuidanceBenchResult:
    config: dict[str, Any]
    answers: list[Answer]
    judge: dict[str, Any]
    classifier: dict[str, Any]
    cost: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> list[dict[str, Any]]:
        """Per condition: mood rate, perplexity; differences with none and prompting."""
        by: dict[str, list[Answer]] = {}
        for a in self.answers:
            by.setdefault(a.condition, []).append(a)
        base = {(a.mood, a.prompt): a for a in by.get("none", [])}
        prompting = {(a.mood, a.prompt): a for a in by.get("prompting", [])}
        plain_ppl = float(np.exp(np.mean([np.log(a.ppl) for a in by.get("none", [])])))
        rows = []
        for condition, answers in by.items():
            hits = np.array([a.hit for a in answers])
            ppl = float(np.exp(np.mean([np.log(a.ppl) for a in answers])))
            row: dict[str, Any] = {
                "condition": condition,
                "n": len(answers),
                "mood_rate": float(hits.mean()),
                "ppl": ppl,
                "ppl_ratio": ppl / plain_ppl,
                "words": float(np.mean([len(a.text.split()) for a in answers])),
            }
            for name, other in (("vs_none", base), ("vs_prompting", prompting)):
                if condition in ("none", name.removeprefix("vs_")) or not other:
                    continue
                mine = [a for a in answers if (a.mood, a.prompt) in other]
                diff = user_bootstrap(
                    [a.hit for a in mine],
                    [other[(a.mood, a.prompt)].hit for a in mine],
                    [a.prompt for a in mine],  # resampled by prompt
                    seed=self.config["seed"],
                )
                row[name] = {"mean": diff.mean, "lo": diff.lo, "hi": diff.hi}
            rows.append(row)
        return rows


def _split_prompts(pairs: Sequence[MoodPair], share: float, seed: int) -> tuple[set, list]:
    held = sorted({p.prompt for p in pairs if held_out(p.prompt)})
    random.Random(seed).shuffle(held)
    cut = round(len(held) * share)
    return set(held[:cut]), held[cut:]


def _render(model: LoadedModel, query: str, system: str, context: Sequence[HistoryItem]) -> str:
    template = PromptTemplate(context_as_turns=True, system_prompt=system)
    return render_prompt(model.tokenizer, template.messages(query, context))


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
    judge_prompts, test_prompts = _split_prompts(pairs, config.judge_share, config.seed)
    judge_pairs = [p for p in pairs if p.prompt in judge_prompts]
    judge = TextClassifier(config.seed).fit(
        [p.response for p in judge_pairs], [p.mood for p in judge_pairs]
    )
    # test prompts answered in every asked mood first, so moods share prompts
    by_prompt: dict[str, set[str]] = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt, set()).add(p.mood)
    test_prompts.sort(key=lambda q: -len(by_prompt[q] & set(moods)))
    prompts = test_prompts[: config.n_prompts]
    rng = random.Random(config.seed)
    examples = {m: [p for p in pairs if p.mood == m and not held_out(p.prompt)] for m in moods}
    default_system = PromptTemplate().system_prompt
    requests: list[tuple[str, str, str, GenerationRequest]] = []

    def add(condition: str, mood: str, q: str, text: str, prefs: Preferences | None) -> None:
        requests.append(
            (condition, mood, q, GenerationRequest(None, text, raw_prompt=True, preferences=prefs))
        )

    how = {"method": config.method, "top_k": config.top_k}
    for q in prompts:
        plain = _render(model, q, default_system, ())
        add("none", "", q, plain, None)
        for mood in moods:
            system = f"{default_system} Answer as someone who feels {mood}."
            add("prompting", mood, q, _render(model, q, system, ()), None)
            shots = rng.sample(examples[mood], min(config.icl_k, len(examples[mood])))
            context = [HistoryItem(s.prompt, s.response) for s in shots]
            add("icl", mood, q, _render(model, q, default_system, context), None)
            for alpha in config.alphas:
                prefs = Preferences.from_dict(
                    {"preferences": {config.mood_classifier: {mood: alpha}}, "guidance": how}
                )
                add(f"guided a={alpha:g}", mood, q, plain, prefs)
            if config.two_dims_alpha is not None:
                both = config.two_dims_alpha
                weights = {
                    config.mood_classifier: {mood: both},
                    config.length_classifier: {"concise": both},
                }
                prefs = Preferences.from_dict({"preferences": weights, "guidance": how})
                add(f"guided a={both:g} + concise", mood, q, plain, prefs)
    engine = Personalizer(
        model, Store(":memory:"), modes=(GuidanceMode(library),), encoder=_NoEncoder()
    )
    options = GenerationOptions(max_new_tokens=config.max_new_tokens)
    answers: list[Answer] = []
    for start in range(0, len(requests), config.batch_size):
        chunk = requests[start : start + config.batch_size]
        results = engine.generate([r for *_, r in chunk], options)
        for (condition, mood, q, _), result in zip(chunk, results, strict=True):
            tokens = model.tokenizer(result.text, add_special_tokens=False)["input_ids"]
            answers.append(Answer(condition, mood, q, result.text, list(tokens)))
        if progress is not None:
            progress("decoding", min(start + config.batch_size, len(requests)), len(requests))
    if config.steering_items:
        answers += _steering_answers(model, library, config, examples, prompts, progress)
    # the plain answer counts once per target mood
    expanded = []
    for a in answers:
        targets = moods if a.condition == "none" else (a.mood,)
        expanded += [Answer(a.condition, m, a.prompt, a.text, a.tokens) for m in targets]
    named = judge.predict([a.text for a in expanded])
    plain_ids = {
        q: encode_prompt(model.tokenizer, _render(model, q, default_system, ())) for q in prompts
    }
    nll = target_nll(
        model, [plain_ids[a.prompt] for a in expanded], [a.tokens or [0] for a in expanded]
    )
    for a, name, value in zip(expanded, named, nll.tolist(), strict=True):
        a.hit, a.ppl = float(name == a.mood), math.exp(value)
    held_judge = _judge_accuracy(judge, pairs, set(prompts), moods)
    return GuidanceBenchResult(
        config=config.to_dict(),
        answers=expanded,
        judge={"train_texts": len(judge_pairs), "accuracy_on_test_prompts": held_judge},
        classifier=mood_clf.metrics,
        cost=measure_cost(model, library, config, prompts, moods),
        seconds=time.perf_counter() - began,
    )


def _steering_answers(
    model: LoadedModel,
    library: ClassifierLibrary,
    config: GuidanceBenchConfig,
    examples: dict[str, list[MoodPair]],
    prompts: Sequence[str],
    progress: Progress | None,
) -> list[Answer]:
    """Each mood a user of its own answers to training prompts; steered rows, alone and
    with guidance towards the same mood."""
    rng = random.Random(config.seed + 1)
    how = {"method": config.method, "top_k": config.top_k}
    answers = []
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "steer.sqlite") as store:
        engine = Personalizer(
            model,
            store,
            steering=DEMO_STEERING,
            extraction=DEMO_EXTRACTION,
            modes=("steering", GuidanceMode(library)),
        )
        for n, (mood, pool) in enumerate(examples.items()):
            chosen = rng.sample(pool, min(config.steering_items, len(pool)))
            engine.add_history(mood, [HistoryItem(p.prompt, p.response) for p in chosen])
            if progress is not None:
                progress("steering vectors", n + 1, len(examples))
        guided = f"steering + guided a={config.steer_alpha:g}"
        rows = []
        for q in prompts:
            for mood in examples:
                weights = {config.mood_classifier: {mood: config.steer_alpha}}
                prefs = Preferences.from_dict({"preferences": weights, "guidance": how})
                rows.append(("steering", mood, q, GenerationRequest(mood, q)))
                rows.append((guided, mood, q, GenerationRequest(mood, q, preferences=prefs)))
        options = GenerationOptions(max_new_tokens=config.max_new_tokens)
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start : start + config.batch_size]
            results = engine.generate([r for *_, r in chunk], options)
            for (condition, mood, q, _), result in zip(chunk, results, strict=True):
                tokens = model.tokenizer(result.text, add_special_tokens=False)["input_ids"]
                answers.append(Answer(condition, mood, q, result.text, list(tokens)))
            if progress is not None:
                progress("steered decoding", min(start + config.batch_size, len(rows)), len(rows))
    return answers


def _judge_accuracy(
    judge: TextClassifier, pairs: Sequence[MoodPair], prompts: set[str], moods: Sequence[str]
) -> float:
    """The judge on the gold responses to the test prompts (never trained on)."""
    gold = [p for p in pairs if p.prompt in prompts and p.mood in moods]
    return float(judge.hit_rate([p.response for p in gold], [p.mood for p in gold]).mean())


def measure_cost(
    model: LoadedModel,
    library: ClassifierLibrary,
    config: GuidanceBenchConfig,
    prompts: Sequence[str],
    moods: Sequence[str],
) -> dict[str, float]:
    """Decoding tokens/s on one batch (every row decodes max_new_tokens): plain, top-k
    rescoring, full-vocabulary head; each after one warm-up."""
    engine = Personalizer(
        model, Store(":memory:"), modes=(GuidanceMode(library),), encoder=_NoEncoder()
    )
    system = PromptTemplate().system_prompt
    texts = [_render(model, q, system, ()) for q in prompts]
    texts = (texts * config.cost_rows)[: config.cost_rows]
    options = GenerationOptions(max_new_tokens=config.cost_tokens, ignore_eos=True)
    out: dict[str, float] = {}
    mood = moods[0]
    for name, how in (("plain", None), ("topk", "topk"), ("full", "full")):
        prefs = None
        if how is not None:
            prefs = Preferences.from_dict(
                {
                    "preferences": {config.mood_classifier: {mood: 0.5}},
                    "guidance": {"method": how, "top_k": config.top_k},
                }
            )
        batch = [GenerationRequest(None, t, raw_prompt=True, preferences=prefs) for t in texts]
        engine.generate(batch[:2], GenerationOptions(max_new_tokens=2))
        began = time.perf_counter()
        engine.generate(batch, options)
        out[f"{name}_tokens_per_s"] = (
            len(batch) * options.max_new_tokens / (time.perf_counter() - began)
        )
    out["batch_rows"] = float(len(texts))
    return out


class _NoEncoder:
    """The benchmark's rows have no user: no key is ever encoded."""

    name = "none"
    dim = 1

    def encode(self, texts: Sequence[str]) -> Any:
        raise AssertionError("no user, no key")


def markdown(result: GuidanceBenchResult) -> str:
    cfg = result.config
    lines = [
        f"moods: {len({a.mood for a in result.answers})}, test prompts: {cfg['n_prompts']}, "
        f"{cfg['max_new_tokens']} new tokens, greedy, guidance {cfg['method']}"
        + (f" (k={cfg['top_k']})" if cfg["method"] == "topk" else ""),
        f"judge: TF-IDF on {result.judge['train_texts']} held-out responses to other prompts; "
        f"on the gold responses to the test prompts it names the mood "
        f"{result.judge['accuracy_on_test_prompts']:.0%}",
        "",
        "| condition | n | mood rate | - none [95% CI] | - prompting [95% CI] | ppl | ppl / none "
        "| words |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ci(d: dict[str, float] | None) -> str:
        if d is None:
            return ""
        return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"

    for r in result.table():
        lines.append(
            f"| {r['condition']} | {r['n']} | {r['mood_rate']:.2f} | {ci(r.get('vs_none'))} | "
            f"{ci(r.get('vs_prompting'))} | {r['ppl']:.1f} | {r['ppl_ratio']:.2f} | "
            f"{r['words']:.0f} |"
        )
    c = result.cost
    lines += [
        "",
        f"cost ({c['batch_rows']:.0f} rows x {cfg['cost_tokens']} tokens): "
        f"plain {c['plain_tokens_per_s']:.1f} tok/s, top-k {c['topk_tokens_per_s']:.1f} tok/s "
        f"(+{c['plain_tokens_per_s'] / c['topk_tokens_per_s'] - 1:.0%} time), full head "
        f"{c['full_tokens_per_s']:.1f} tok/s "
        f"(+{c['plain_tokens_per_s'] / c['full_tokens_per_s'] - 1:.0%} time); "
        f"whole run {result.seconds / 60:.1f} min",
    ]
    return "\n".join(lines)
