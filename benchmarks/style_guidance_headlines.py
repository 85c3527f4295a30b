"""Per-user style guidance on headlines: own style classifier vs another author's.

Headlines (``load_headlines``: authors with >= 20 articles; per author by date the last 5
are test queries, the 2 before them validation queries, up to 50 before those the
history), SmolLM2, the bare headline prompt (no examples). Per author a style classifier
as the product trains one (:mod:`fints.guidance.user_style`, ``StyleSettings``' defaults:
the generator's first 10 layers, 8 epochs, 48 tokens, the classes weighted equally, a
temperature fitted on the held-out fifth): the author's history headlines (class
``own``) against a seeded sample of at most 256 of the other authors' history headlines
(``other``); never a validation or test headline. The cache keys include the training
settings, so classifiers trained otherwise are not reused. Rows, paired per test query:

* none: plain decoding;
* own: guided towards class ``own`` of the author's classifier, weight alpha;
* other-user classifier: class ``own`` of another author's classifier (a seeded
  derangement), the same alpha.

Metrics: the per-token NLL of the gold test headline (``<|im_end|>`` included) under
the guided distribution, teacher-forced through the product's ``GuidanceProcessor``
(:mod:`fints.benchmark.guided_nll`); greedy answers (``--max-new-tokens``) scored by
ROUGE-1/L and the TF-IDF attribution judge fitted on the authors' history. Alpha x rho
is chosen on the validation queries by NLL (:data:`SELECTION_RULE`), then measured on
the test queries once. Statistics as ``trained_report.py``: user bootstrap, sign-flip p
over users, MDE; own vs other-user classifier and own vs none pre-registered, Holm.
``--extra-alpha``: the same rows at one more alpha (rho 0), reported apart as exploratory
(not selected, not pre-registered). Classifiers and per-author results are cached under
``--cache``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/style_guidance_headlines.py --authors 45 \
        --extra-alpha 0.5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from trained_report import cluster_stats, comparison_line

from fints.benchmark.guided_nll import GuidedRow, build_spec, guided_steps
from fints.benchmark.metrics import TextClassifier, rouge
from fints.benchmark.stats import holm
from fints.benchmark.tasks import Task, load_headlines
from fints.generation import Decoration, GenerationOptions, generate_batch
from fints.guidance.classifier import CONFIG_FILE, Backbone, GuidanceClassifier, load_classifier
from fints.guidance.processor import GuidanceProcessor
from fints.guidance.recipes import style_texts
from fints.guidance.training import train_classifier
from fints.guidance.user_style import OWN, OWN_STYLE, StyleSettings, style_layers
from fints.models import LoadedModel, load_model
from fints.prompts import TEMPLATES, build_prompt_ids

OUT = Path("benchmarks/results/style-guidance-headlines")
ROWS = ("none", "own", "other-user classifier")
PRE_REGISTERED = ("other-user classifier", "none")
SELECTION_RULE = (
    "the lowest mean validation NLL (per author, then over authors) among the settings "
    "that drop no gold validation token (rho > 0 gives a dropped token probability 0, NLL "
    "inf); ties: the smaller alpha"
)

Example = tuple[list[int], list[int]]


def tag(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode(model: LoadedModel, article: str, headline: str) -> Example:
    tok = model.tokenizer
    target = list(tok(headline, add_special_tokens=False)["input_ids"])
    return build_prompt_ids(tok, TEMPLATES["headline"], article), [*target, tok.eos_token_id]


def derangement(names: list[str], seed: int) -> dict[str, str]:
    """Each author's "other user" (fixed): a seeded cyclic shift, never the author."""
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


def classifier(
    task: Task, user: str, backbone: Backbone, settings: StyleSettings, folder: Path
) -> GuidanceClassifier:
    """The author's style classifier (trained on history only), cached in ``folder``."""
    if (folder / CONFIG_FILE).is_file():
        return load_classifier(folder, backbone)
    own = [i.output for i in task.users[user].history]
    pool = sorted(i.output for n, s in task.users.items() if n != user for i in s.history)
    rng = random.Random(f"{settings.seed}-{user}")
    others = rng.sample(pool, min(settings.max_others, len(pool)))
    train, test = style_texts(own, others, OWN, seed=settings.seed)
    clf = train_classifier(OWN_STYLE, backbone, train, test, settings.train_config())
    fresh = folder.with_name(folder.name + ".new")
    clf.save(fresh)
    fresh.rename(folder)
    return clf


def grid(args: argparse.Namespace) -> list[tuple[float, float]]:
    return [(float(a), float(r)) for r in args.rhos.split(",") for a in args.alphas.split(",")]


def label(alpha: float, rho: float) -> str:
    return f"a={alpha:g} rho={rho:g}"


def cached(path: Path, make: Any) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.with_suffix(".tmp").write_text(json.dumps(value))
    path.with_suffix(".tmp").rename(path)
    return value


def validate(
    model: LoadedModel, clf: GuidanceClassifier, examples: list[Example], settings: list
) -> dict[str, Any]:
    """Per setting (and none): per validation query the NLL (None: inf) and the gold
    tokens dropped by rho."""
    rows = [GuidedRow(), *(GuidedRow(0, OWN, a, r) for a, r in settings)]
    names = ["none", *(label(a, r) for a, r in settings)]
    out: dict[str, Any] = {n: {"nll": [], "dropped": [], "tokens": []} for n in names}
    for prompt, target in examples:
        steps = guided_steps(model, prompt, target, build_spec([clf], rows))
        for n, lp in zip(names, steps.logprobs, strict=True):
            nll = float(-lp.mean())
            out[n]["nll"].append(nll if math.isfinite(nll) else None)
            out[n]["dropped"].append(int(torch.isinf(lp).sum()))
            out[n]["tokens"].append(len(target))
    return out


def select(valid: dict[str, dict[str, Any]], settings: list) -> tuple[tuple[float, float], list]:
    table = []
    for a, r in settings:
        per = [v[label(a, r)] for v in valid.values()]
        finite = all(x is not None for p in per for x in p["nll"])
        mean = float(np.mean([np.mean(p["nll"]) for p in per])) if finite else math.inf
        dropped = sum(sum(p["dropped"]) for p in per) / sum(sum(p["tokens"]) for p in per)
        table.append({"alpha": a, "rho": r, "nll": mean, "dropped_share": dropped})
    best = min(table, key=lambda t: (t["nll"], t["alpha"]))
    for t in table:
        t["nll"] = t["nll"] if math.isfinite(t["nll"]) else None  # JSON: null
    return (best["alpha"], best["rho"]), table


def test_rows(
    model: LoadedModel,
    own: GuidanceClassifier,
    other: GuidanceClassifier,
    examples: list[Example],
    setting: tuple[float, float],
    max_new_tokens: int,
) -> dict[str, Any]:
    """Per row: per test query the gold NLL and the greedy answer."""
    a, r = setting
    rows = [GuidedRow(), GuidedRow(0, OWN, a, r), GuidedRow(1, OWN, a, r)]
    nll: dict[str, list[float | None]] = {n: [] for n in ROWS}
    for prompt, target in examples:
        steps = guided_steps(model, prompt, target, build_spec([own, other], rows))
        for n, value in zip(ROWS, steps.nll.tolist(), strict=True):
            nll[n].append(value if math.isfinite(value) else None)
    batch = [r for r in rows for _ in examples]
    processor = GuidanceProcessor(build_spec([own, other], batch))
    done = generate_batch(
        model,
        [p for _ in rows for p, _ in examples],
        GenerationOptions(max_new_tokens=max_new_tokens),
        decorations=[Decoration(logits_processors=(processor,))],
    )
    texts = [c.text.strip() for c in done]
    k = len(examples)
    answers = {n: texts[i * k : (i + 1) * k] for i, n in enumerate(ROWS)}
    return {"nll": nll, "answers": answers}


def analyse(
    task: Task, names: list[str], partner: dict[str, str], test: dict[str, Any]
) -> dict[str, Any]:
    nll = {row: np.array([test[n]["nll"][row] for n in names], dtype=float) for row in ROWS}
    own_minus = {
        r: cluster_stats(nll["own"] - nll[r], seed=i) for i, r in enumerate(ROWS) if i != 1
    }
    for row, p in holm({r: own_minus[r]["p"] for r in PRE_REGISTERED}).items():
        own_minus[row]["p_holm"] = p
    judge = TextClassifier().fit(
        [i.output for n in names for i in task.users[n].history],
        [n for n in names for _ in task.users[n].history],
    )
    refs = [q.reference for n in names for q in task.users[n].test]
    k = len(task.users[names[0]].test)
    author = [n for n in names for _ in range(k)]
    scores: dict[str, dict[str, np.ndarray]] = {}
    for row in ROWS:
        texts = [t for n in names for t in test[n]["answers"][row]]
        r, pairs = rouge(texts, refs), list(zip(judge.predict(texts), author, strict=True))
        scores[row] = {
            "rouge1": r.rouge1,
            "rougeL": r.rougeL,
            "judge: own author": np.array([p == a for p, a in pairs]),
            "judge: the other author": np.array([p == partner[a] for p, a in pairs]),
        }
        scores[row] = {m: v.astype(float).reshape(len(names), k) for m, v in scores[row].items()}
    comparisons = [("own", "none"), ("own", "other-user classifier")]
    comparisons.append(("other-user classifier", "none"))
    generation = {
        m: {
            "mean": {row: float(scores[row][m].mean()) for row in ROWS},
            "diff": {
                f"{x} minus {y}": cluster_stats(scores[x][m] - scores[y][m], i, False)
                for i, (x, y) in enumerate(comparisons)
            },
        }
        for m in scores["none"]
    }
    changed = {
        row: float(np.mean([a != b for n in names for a, b in zip(*(
            test[n]["answers"][r] for r in (row, "none")), strict=True)]))
        for row in ROWS[1:]
    }  # fmt: skip
    return {
        "mean_nll": {row: float(v.mean()) for row, v in nll.items()},
        "own_minus": own_minus,
        "generation": generation,
        "answers_changed": changed,
    }


def calibration_summary(clfs: dict[str, GuidanceClassifier]) -> dict[str, Any]:
    """The fitted temperatures and the held-out class NLL before and after (per author and
    summed up)."""
    per = {n: c.config.metrics.get("calibration", {}) for n, c in clfs.items()}
    temps = [c.temperature for c in clfs.values()]
    before = [p["nll_before"] for p in per.values() if "nll_before" in p]
    after = [p["nll_after"] for p in per.values() if "nll_after" in p]
    return {
        "temperature": {
            "mean": float(np.mean(temps)),
            "median": float(np.median(temps)),
            "min": float(min(temps)),
            "max": float(max(temps)),
        },
        "nll_before": float(np.mean(before)) if before else None,
        "nll_after": float(np.mean(after)) if after else None,
        "weighting": next((p.get("weighting") for p in per.values() if p), None),
        "per_author": per,
    }


def fmt(value: float | None) -> str:
    return "inf" if value is None else f"{value:.4f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Per-user style guidance on headlines: own classifier vs another author's (SmolLM2)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['users']} authors, {result['queries']} test queries "
        f"({result['valid_queries']} validation queries); classifiers: {result['classifier']}; "
        f"held-out text accuracy of the authors' classifiers: mean "
        f"{result['classifier_accuracy']:.1%} (majority class: {result['classifier_chance']:.1%}; "
        f"balanced accuracy, the mean of the two classes' recalls: "
        f"{result['classifier_balanced_accuracy']:.1%} per text, "
        f"{result['classifier_token_balanced_accuracy']:.1%} per token).",
        "",
        *calibration_lines(result["calibration"]),
        f"Selection on validation ({SELECTION_RULE}): **{result['selected']}**.",
        "",
        "| setting | mean validation NLL | gold tokens dropped |",
        "|---|---|---|",
        f"| none | {result['validation_none']:.4f} | 0 |",
        *[
            f"| a={t['alpha']:g} rho={t['rho']:g} | {fmt(t['nll'])} | {t['dropped_share']:.1%} |"
            for t in result["validation"]
        ],
        "",
        f"## Test, the validated setting ({result['selected']})",
        *block(result["test"], result["users"]),
    ]
    if "exploratory" in result:
        lines += [
            "",
            f"## Exploratory, not pre-registered: {result['exploratory']['setting']}",
            *block(result["exploratory"], result["users"]),
        ]
    lines += ["", f"Wall time: {result['wall_time']}", ""]
    return "\n".join(lines)


def calibration_lines(c: dict[str, Any]) -> list[str]:
    t = c["temperature"]
    if c["nll_before"] is None:
        return [f"Temperature: {t['mean']:.2f} (not calibrated).", ""]
    return [
        f"Temperature fitted on each author's held-out headlines (token-level class NLL, "
        f"{c['weighting']} weighting): mean {t['mean']:.2f}, median {t['median']:.2f}, "
        f"range {t['min']:.2f}-{t['max']:.2f}; held-out class NLL {c['nll_before']:.4f} "
        f"before, {c['nll_after']:.4f} after (mean over authors, nats/token).",
        "",
    ]


def block(b: dict[str, Any], users: int) -> list[str]:
    lines = [
        "",
        "Per-token NLL of the gold headline under each row's distribution (nats/token).",
        "",
        "| row | mean NLL |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in b["mean_nll"].items()],
        "",
        "Own minus each row (negative = own better); 95% bootstrap interval resampling "
        "authors; p: sign-flip over authors; Holm over the two pre-registered rows.",
        "",
        "| own minus | diff | 95% CI | MDE | authors own better | p | p (Holm) |",
        "|---|---|---|---|---|---|---|",
        *[comparison_line(k, c, c["users_better"], users) for k, c in b["own_minus"].items()],
        "",
        "Greedy answers: ROUGE against the gold headline; the judge (TF-IDF attribution "
        "fitted on the authors' history headlines) names the query's author, or the author "
        "whose classifier the other-user row uses. Differences: higher = first row higher. "
        "Answers differing from none's: "
        + ", ".join(f"{k} {v:.0%}" for k, v in b["answers_changed"].items())
        + ".",
        "",
        "| metric | " + " | ".join(ROWS) + " |",
        "|---|---|---|---|",
    ]
    gen = b["generation"]
    for m, g in gen.items():
        lines.append(f"| {m} | " + " | ".join(f"{g['mean'][r]:.4f}" for r in ROWS) + " |")
    lines += ["", "| metric | comparison | diff [95% CI] | MDE | p |", "|---|---|---|---|---|"]
    for m, g in gen.items():
        for name, c in g["diff"].items():
            lines.append(
                f"| {m} | {name} | {c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] "
                f"| {c['mde']:.4f} | {c['p']:.4f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/news_headlines.jsonl"))
    parser.add_argument("--authors", type=int, default=45)
    parser.add_argument("--alphas", default="0.01,0.03,0.1,0.3,0.5,1.0")
    parser.add_argument("--rhos", default="0,0.2")
    parser.add_argument(
        "--extra-alpha", type=float, help="also this alpha (rho 0), reported as exploratory"
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=OUT / "cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    task = load_headlines(args.data)
    model = load_model()
    settings = StyleSettings()
    backbone = Backbone(model, style_layers(model, settings))
    order = np.random.default_rng(args.seed).permutation(len(task.users))
    names = sorted(sorted(task.users)[i] for i in order[: args.authors])
    partner = derangement(names, args.seed)
    base = tag(
        model.fingerprint,
        task.sha256,
        settings,
        settings.train_config().to_dict(),  # balanced classes, calibration: new cache keys
        "all authors' history as others",
    )
    args.cache.mkdir(parents=True, exist_ok=True)

    clfs: dict[str, GuidanceClassifier] = {}
    for n, name in enumerate(names):
        folder = args.cache / f"clf-{tag(base, name)}"
        clfs[name] = classifier(task, name, backbone, settings, folder)
        acc = clfs[name].config.metrics["test"]["text_accuracy"]
        bal = clfs[name].config.metrics["test"].get("text_balanced_accuracy", float("nan"))
        print(f"[{n + 1}/{len(names)}] {name}: classifier held-out {acc:.1%} "
              f"(balanced {bal:.1%}), T {clfs[name].temperature:.2f}, "
              f"{time.perf_counter() - began:.0f}s", flush=True)  # fmt: skip
    settings_grid = grid(args)
    valid = {}
    for name in names:
        examples = [encode(model, q.input, q.reference) for q in task.users[name].validation]
        path = args.cache / f"valid-{tag(base, name, settings_grid)}.json"
        valid[name] = cached(
            path, lambda e=examples, c=clfs[name]: validate(model, c, e, settings_grid)
        )
    print(f"validation done, {time.perf_counter() - began:.0f}s", flush=True)
    chosen, table = select(valid, settings_grid)
    print(f"selected {label(*chosen)}: {json.dumps(table)}", flush=True)

    def measure(setting: tuple[float, float]) -> dict[str, Any]:
        test = {}
        for n, name in enumerate(names):
            examples = [encode(model, q.input, q.reference) for q in task.users[name].test]
            key = tag(base, name, partner[name], setting, args.max_new_tokens)
            test[name] = cached(
                args.cache / f"test-{key}.json",
                lambda e=examples, m=name: test_rows(
                    model, clfs[m], clfs[partner[m]], e, setting, args.max_new_tokens
                ),
            )
            print(f"[{n + 1}/{len(names)}] {name}: {label(*setting)} done, "
                  f"{time.perf_counter() - began:.0f}s", flush=True)  # fmt: skip
        return test

    test = measure(chosen)
    extra = {}
    if args.extra_alpha is not None:
        setting = (args.extra_alpha, 0.0)
        tested = measure(setting)
        extra = {"setting": label(*setting), **analyse(task, names, partner, tested)}
        extra["answers"] = {n: tested[n]["answers"] for n in names}
    result = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "users": len(names),
        "queries": sum(len(task.users[n].test) for n in names),
        "valid_queries": sum(len(task.users[n].validation) for n in names),
        "authors": names,
        "partner": partner,
        "classifier": json.dumps(settings.__dict__),
        "classifier_accuracy": float(
            np.mean([c.config.metrics["test"]["text_accuracy"] for c in clfs.values()])
        ),
        "classifier_chance": float(np.mean([c.config.metrics["chance"] for c in clfs.values()])),
        "classifier_balanced_accuracy": float(
            np.mean([c.config.metrics["test"]["text_balanced_accuracy"] for c in clfs.values()])
        ),
        "classifier_token_balanced_accuracy": float(
            np.mean([c.config.metrics["test"]["token_balanced_accuracy"] for c in clfs.values()])
        ),
        "calibration": calibration_summary(clfs),
        "selection_rule": SELECTION_RULE,
        "selected": label(*chosen),
        "validation_none": float(np.mean([np.mean(v["none"]["nll"]) for v in valid.values()])),
        "validation": table,
        "test": {
            **analyse(task, names, partner, test),
            "answers": {n: test[n]["answers"] for n in names},
        },
        **({"exploratory": extra} if extra else {}),
        "wall_time": f"{time.perf_counter() - began:.0f}s on {args.threads} thread(s) "
        "(cached classifiers and per-author results are not recomputed)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
