"""Choosing guidance's setting on validation prompts, and testing the choice.

The CLIPer bench decodes every guided setting (a weight alpha and a plausibility
constraint rho) on validation prompts, which are neither the judge's prompts nor the
test prompts, and picks one setting by :data:`SELECTION_RULE`, fixed before any test
answer is judged. Only that setting's row on the test prompts ("guided, validated") is
compared with none, prompting and ICL: paired per (prompt, mood), resampled by prompt,
Holm-corrected over the three comparisons.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fints.benchmark.stats import holm, user_bootstrap
from fints.errors import InvalidInputError

#: The bound on perplexity (geometric mean, under the generator) relative to plain decoding.
MAX_PPL_RATIO = 1.5
#: The comparisons of the validated row, Holm-corrected as one family.
BASELINES = ("none", "prompting", "icl")

SELECTION_RULE = (
    "the highest validation mood rate among the settings whose validation perplexity is at "
    "most {bound:g}x plain decoding's (ties: the lower perplexity ratio, then the earlier "
    "setting); if none is within the bound, the lowest perplexity ratio among the settings "
    "whose validation mood rate beats none's; if none beats none either, the highest "
    "validation mood rate"
)


@dataclass(frozen=True)
class Setting:
    """One guided setting: the weight towards the target mood, the plausibility constraint."""

    alpha: float
    plausible: float = 0.0

    @property
    def label(self) -> str:
        rho = f" rho={self.plausible:g}" if self.plausible > 0 else ""
        return f"guided a={self.alpha:g}{rho}"


@dataclass(frozen=True)
class Scored:
    """A setting's validation figures."""

    setting: Setting
    mood_rate: float
    ppl_ratio: float


@dataclass(frozen=True)
class Selection:
    """The chosen setting; ``rule``: ``within`` (within the perplexity bound), ``beats-none``
    (none was within it: the most fluent that beats none) or ``best-rate`` (none beat none
    either); ``why`` says which in words."""

    setting: Setting
    rule: str
    why: str

    @property
    def label(self) -> str:
        s = self.setting
        return f"guided, validated (a={s.alpha:g}, rho={s.plausible:g})"


def select_setting(
    scored: Sequence[Scored], none_rate: float, max_ratio: float = MAX_PPL_RATIO
) -> Selection:
    """The setting :data:`SELECTION_RULE` picks from validation figures alone."""
    if not scored:
        raise InvalidInputError("no guided setting was validated")
    order = {s.setting: n for n, s in enumerate(scored)}
    within = [s for s in scored if s.ppl_ratio <= max_ratio]
    if within:
        best = max(within, key=lambda s: (s.mood_rate, -s.ppl_ratio, -order[s.setting]))
        why = (
            f"{len(within)} of {len(scored)} settings within {max_ratio:g}x plain perplexity "
            f"on validation; the highest mood rate among them ({best.mood_rate:.2f})"
        )
        return Selection(best.setting, "within", why)
    beating = [s for s in scored if s.mood_rate > none_rate]
    if beating:
        best = min(beating, key=lambda s: (s.ppl_ratio, -s.mood_rate, order[s.setting]))
        why = (
            f"no setting within {max_ratio:g}x plain perplexity on validation; the lowest "
            f"perplexity ratio ({best.ppl_ratio:.2f}) among the {len(beating)} that beat "
            f"none's mood rate ({none_rate:.2f})"
        )
        return Selection(best.setting, "beats-none", why)
    best = max(scored, key=lambda s: (s.mood_rate, -s.ppl_ratio, -order[s.setting]))
    why = (
        f"no setting within {max_ratio:g}x plain perplexity and none beats none's mood rate "
        f"({none_rate:.2f}) on validation; the highest mood rate ({best.mood_rate:.2f})"
    )
    return Selection(best.setting, "best-rate", why)


def split_validation(
    ordered: Sequence[str], judge: Collection[str], n_test: int, n_valid: int
) -> tuple[list[str], list[str]]:
    """The first ``n_test`` of ``ordered`` are the test prompts, the next ``n_valid`` the
    validation prompts; neither may be a judge prompt, and they never overlap."""
    if n_test < 1 or n_valid < 0:
        raise InvalidInputError(
            f"need >= 1 test and >= 0 validation prompts, got {n_test}, {n_valid}"
        )
    if n_test + n_valid > len(ordered):
        raise InvalidInputError(
            f"{n_test} test + {n_valid} validation prompts asked, {len(ordered)} held out"
        )
    test, valid = list(ordered[:n_test]), list(ordered[n_test : n_test + n_valid])
    assert not set(test) & set(valid), "validation prompts overlap the test prompts"
    assert not (set(test) | set(valid)) & set(judge), "a judge prompt is a test/validation one"
    return test, valid


class _Judged(Protocol):
    condition: str
    mood: str
    prompt: str
    hit: float


def compare_validated(
    answers: Sequence[_Judged],
    condition: str,
    seed: int,
    baselines: Sequence[str] = BASELINES,
    level: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """``condition``'s mood hits minus each baseline's, paired per (prompt, mood) and
    resampled by prompt: the mean, its 95% interval, the simultaneous interval over the
    family (Bonferroni, level / len(baselines) each), the sign-flip p over prompts and its
    Holm adjustment; ``above_zero``: Holm p < level and the simultaneous interval > 0."""
    hits = {(a.condition, a.mood, a.prompt): a.hit for a in answers}
    mine = [a for a in answers if a.condition == condition]
    raw: dict[str, dict[str, Any]] = {}
    for name in baselines:
        paired = [a for a in mine if (name, a.mood, a.prompt) in hits]
        if not paired:
            continue
        x = [a.hit for a in paired]
        y = [hits[(name, a.mood, a.prompt)] for a in paired]
        prompts = [a.prompt for a in paired]
        wide = user_bootstrap(x, y, prompts, seed=seed)
        both = user_bootstrap(x, y, prompts, seed=seed, confidence=1 - level / len(baselines))
        raw[name] = {
            "mean": wide.mean,
            "lo": wide.lo,
            "hi": wide.hi,
            "lo_simultaneous": both.lo,
            "hi_simultaneous": both.hi,
            "p": wide.p,
            "prompts": wide.n_users,
        }
    adjusted = holm({name: r["p"] for name, r in raw.items()})
    for name, r in raw.items():
        r["p_holm"] = adjusted[name]
        r["above_zero"] = bool(adjusted[name] < level and r["lo_simultaneous"] > 0)
    return raw
