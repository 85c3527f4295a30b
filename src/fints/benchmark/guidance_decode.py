"""The CLIPer bench's decoding and scoring (:mod:`fints.benchmark.guidance`): rows of
(condition, target mood, prompt, request) decoded in batches, each answer judged and its
perplexity taken under the generator given the plain prompt; the steering rows and the
cost figures."""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fints.benchmark.metrics import TextClassifier
from fints.demo import DEMO_EXTRACTION, DEMO_STEERING
from fints.engine import GenerationRequest, Personalizer
from fints.generation import GenerationOptions
from fints.guidance.library import ClassifierLibrary
from fints.guidance.mode import GuidanceMode
from fints.guidance.preferences import Preferences
from fints.guidance.recipes import MoodPair
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import PromptTemplate, encode_prompt, render_prompt
from fints.store import Store
from fints.target_nll import target_nll

if TYPE_CHECKING:
    from fints.benchmark.guidance import GuidanceBenchConfig

Progress = Callable[[str, int, int], None]


@dataclass
class Answer:
    condition: str
    mood: str
    prompt: str
    text: str
    tokens: list[int]
    hit: float = 0.0
    ppl: float = 0.0


def render(model: LoadedModel, query: str, system: str, context: Sequence[HistoryItem]) -> str:
    template = PromptTemplate(context_as_turns=True, system_prompt=system)
    return render_prompt(model.tokenizer, template.messages(query, context))


Row = tuple[str, str, str, GenerationRequest]  # condition, target mood, prompt, request


def guided_prefs(
    config: GuidanceBenchConfig, weights: dict[str, dict[str, float]], plausible: float = 0.0
) -> Preferences | None:
    how = {"method": config.method, "top_k": config.top_k, "plausible": plausible}
    return Preferences.from_dict({"preferences": weights, "guidance": how})


def decode_rows(
    engine: Personalizer,
    rows: Sequence[Row],
    config: GuidanceBenchConfig,
    progress: Progress | None,
    stage: str = "decoding",
) -> list[Answer]:
    options = GenerationOptions(max_new_tokens=config.max_new_tokens)
    tokenizer = engine.model.tokenizer
    answers: list[Answer] = []
    for start in range(0, len(rows), config.batch_size):
        chunk = rows[start : start + config.batch_size]
        results = engine.generate([r for *_, r in chunk], options)
        for (condition, mood, q, _), result in zip(chunk, results, strict=True):
            tokens = tokenizer(result.text, add_special_tokens=False)["input_ids"]
            answers.append(Answer(condition, mood, q, result.text, list(tokens)))
        if progress is not None:
            progress(stage, min(start + config.batch_size, len(rows)), len(rows))
    return answers


def score_answers(
    model: LoadedModel, judge: TextClassifier, answers: Sequence[Answer], moods: Sequence[str]
) -> list[Answer]:
    """The judge's hit and the perplexity given the plain prompt of every answer; the plain
    answer counts once per target mood."""
    expanded = []
    for a in answers:
        targets = moods if a.condition == "none" else (a.mood,)
        expanded += [Answer(a.condition, m, a.prompt, a.text, a.tokens) for m in targets]
    named = judge.predict([a.text for a in expanded])
    system = PromptTemplate().system_prompt
    plain_ids = {
        q: encode_prompt(model.tokenizer, render(model, q, system, ()))
        for q in {a.prompt for a in expanded}
    }
    nll = target_nll(
        model, [plain_ids[a.prompt] for a in expanded], [a.tokens or [0] for a in expanded]
    )
    for a, name, value in zip(expanded, named, nll.tolist(), strict=True):
        a.hit, a.ppl = float(name == a.mood), math.exp(value)
    return expanded


def steering_answers(
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
        model, Store(":memory:"), modes=(GuidanceMode(library),), encoder=NoEncoder()
    )
    system = PromptTemplate().system_prompt
    texts = [render(model, q, system, ()) for q in prompts]
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


class NoEncoder:
    """The benchmark's rows have no user: no key is ever encoded."""

    name = "none"
    dim = 1

    def encode(self, texts: Sequence[str]) -> Any:
        raise AssertionError("no user, no key")
