"""The CLIPer bench's tables: per condition mood rate, perplexity and paired differences
(:func:`condition_table`), and the Markdown report with the validation of guidance's
setting (:func:`markdown`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fints.benchmark.stats import user_bootstrap

if TYPE_CHECKING:
    from fints.benchmark.guidance import GuidanceBenchResult
    from fints.benchmark.guidance_decode import Answer


def condition_table(answers: Sequence[Answer], seed: int) -> list[dict[str, Any]]:
    """Per condition: mood rate, perplexity (geometric mean) and its ratio to none's;
    differences with none and prompting, paired per (prompt, mood), resampled by prompt."""
    by: dict[str, list[Answer]] = {}
    for a in answers:
        by.setdefault(a.condition, []).append(a)
    base = {(a.mood, a.prompt): a for a in by.get("none", [])}
    prompting = {(a.mood, a.prompt): a for a in by.get("prompting", [])}
    plain_ppl = float(np.exp(np.mean([np.log(a.ppl) for a in by.get("none", [])])))
    rows = []
    for condition, group in by.items():
        hits = np.array([a.hit for a in group])
        ppl = float(np.exp(np.mean([np.log(a.ppl) for a in group])))
        row: dict[str, Any] = {
            "condition": condition,
            "n": len(group),
            "mood_rate": float(hits.mean()),
            "ppl": ppl,
            "ppl_ratio": ppl / plain_ppl,
            "words": float(np.mean([len(a.text.split()) for a in group])),
        }
        for name, other in (("vs_none", base), ("vs_prompting", prompting)):
            if condition in ("none", name.removeprefix("vs_")) or not other:
                continue
            mine = [a for a in group if (a.mood, a.prompt) in other]
            diff = user_bootstrap(
                [a.hit for a in mine],
                [other[(a.mood, a.prompt)].hit for a in mine],
                [a.prompt for a in mine],  # resampled by prompt
                seed=seed,
            )
            row[name] = {"mean": diff.mean, "lo": diff.lo, "hi": diff.hi}
        rows.append(row)
    return rows


def _ci(d: dict[str, float] | None) -> str:
    if d is None:
        return ""
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


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
    for r in result.table():
        lines.append(
            f"| {r['condition']} | {r['n']} | {r['mood_rate']:.2f} | {_ci(r.get('vs_none'))} | "
            f"{_ci(r.get('vs_prompting'))} | {r['ppl']:.1f} | {r['ppl_ratio']:.2f} | "
            f"{r['words']:.0f} |"
        )
    if result.validation:
        lines += validation_markdown(result)
    c = result.cost
    if c:
        lines += [
            "",
            f"cost ({c['batch_rows']:.0f} rows x {cfg['cost_tokens']} tokens): "
            f"plain {c['plain_tokens_per_s']:.1f} tok/s, top-k {c['topk_tokens_per_s']:.1f} "
            f"tok/s (+{c['plain_tokens_per_s'] / c['topk_tokens_per_s'] - 1:.0%} time), full "
            f"head {c['full_tokens_per_s']:.1f} tok/s "
            f"(+{c['plain_tokens_per_s'] / c['full_tokens_per_s'] - 1:.0%} time)",
        ]
    lines.append(f"whole run {result.seconds / 60:.1f} min")
    return "\n".join(lines)


def validation_markdown(result: GuidanceBenchResult) -> list[str]:
    """The validation grid, the rule, the choice and the validated row's test comparisons."""
    v = result.validation
    chosen = v["selection"]
    lines = [
        "",
        f"## Validation: {len(v['prompts'])} prompts (neither the judge's nor the test "
        f"prompts) x {len({a.mood for a in result.valid_answers if a.mood})} moods",
        "",
        f"Rule (fixed before the test answers are judged): {v['rule']}.",
        "",
        "| setting | alpha | rho | mood rate | ppl / none | within bound | chosen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| none | | | {v['none_rate']:.2f} | 1.00 | | |",
    ]
    for s in v["scored"]:
        mark = "**yes**" if s["label"] == chosen["setting_label"] else ""
        within = "yes" if s["ppl_ratio"] <= v["max_ppl_ratio"] else "no"
        lines.append(
            f"| {s['label']} | {s['alpha']:g} | {s['plausible']:g} | {s['mood_rate']:.2f} | "
            f"{s['ppl_ratio']:.2f} | {within} | {mark} |"
        )
    lines += ["", f"Chosen: {chosen['setting_label']} ({chosen['rule']}: {chosen['why']})."]
    test = {r["condition"]: r for r in result.table()}.get(chosen["label"])
    if test is None:
        return lines
    lines += [
        "",
        f"On the test prompts, {chosen['label']}: mood rate {test['mood_rate']:.2f}, "
        f"perplexity {test['ppl_ratio']:.2f}x plain (bound {v['max_ppl_ratio']:g}x).",
        "",
        "| vs | difference | 95% CI | simultaneous CI (Bonferroni) | p (sign flip) | p (Holm) "
        "| above zero |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in v["comparisons"].items():
        lines.append(
            f"| {name} | {d['mean']:+.2f} | [{d['lo']:+.2f}, {d['hi']:+.2f}] | "
            f"[{d['lo_simultaneous']:+.2f}, {d['hi_simultaneous']:+.2f}] | {d['p']:.3f} | "
            f"{d['p_holm']:.3f} | {'yes' if d['above_zero'] else 'no'} |"
        )
    met = "met" if v["target_met"] else "NOT met"
    lines += [
        "",
        f"Target (validated setting beats none, prompting and ICL with Holm p < 0.05 and the "
        f"simultaneous interval above zero, perplexity <= {v['max_ppl_ratio']:g}x plain): "
        f"**{met}**.",
    ]
    return lines
