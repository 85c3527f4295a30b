"""Every name the benchmark repeats, defined once: tasks, judges, metrics, splits, method
kinds and roles, and the labels of the report's rows.

Row labels are what the report, ``results.json`` (its keys), ``--rows`` and the cross-run
summary all match on, so each is spelled here and nowhere else. The string enums compare
equal to (and serialize as) their values, so recorded results read back unchanged.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

import fints.user_vectors
from fints.sites import Component


class TaskName(StrEnum):
    HEADLINES = "headlines"
    ABSTRACTS = "abstracts"
    PERSONA = "persona"


#: Every task, in the order a run goes through them.
TASKS: tuple[TaskName, ...] = tuple(TaskName)


class Judge(StrEnum):
    """What the judge column measures."""

    ATTRIBUTION = "attribution"  # the share of outputs a classifier attributes to their user
    MOOD_RATE = "mood rate"  # persona: the share of outputs in the user's (the mood's) mood


class Metric(StrEnum):
    ROUGE1 = "rouge1"
    ROUGEL = "rougeL"
    JUDGE = "judge"
    NLL = "nll"  # per-token NLL of the gold output, teacher-forced (nats/token; lower is better)


ROUGE: tuple[Metric, ...] = (Metric.ROUGE1, Metric.ROUGEL)
#: The measures of a row's generated text.
METRICS: tuple[Metric, ...] = (Metric.ROUGE1, Metric.ROUGEL, Metric.JUDGE)
#: Every measure two rows are compared on: the text's and the primary one, the NLL.
COMPARED_METRICS: tuple[Metric, ...] = (*METRICS, Metric.NLL)
#: The primary metric: paired, decoding-free, the same for every row.
PRIMARY_METRIC: Final = Metric.NLL
#: Where a smaller value is the better one.
LOWER_IS_BETTER: frozenset[Metric] = frozenset({Metric.NLL})
#: The metrics whose pre-registered comparisons are Holm-corrected, each family on its own.
HOLM_METRICS: tuple[Metric, ...] = (PRIMARY_METRIC, Metric.ROUGEL)


class Split(StrEnum):
    VALIDATION = "validation"  # settings are chosen on these queries
    TEST = "test"  # and scored on these


class Role(StrEnum):
    """What a row is for in the report."""

    METHOD = "method"  # a spec that names no role
    BASELINE = "baseline"
    FINTS = "fints"  # the setting chosen on validation
    VARIANT = "variant"  # the chosen setting with one design choice changed
    CONTROL = "control"  # the chosen setting (or ICL) with the user's own data replaced
    DEFAULTS = "defaults"  # an extraction method at its own defaults (not searched), e.g.
    # trained vectors as a new user gets them, and its controls


#: The roles the best Fints row is compared against (the verdict's comparisons).
COMPARED: tuple[Role, ...] = (Role.BASELINE, Role.CONTROL)


class Kind:
    """``MethodSpec.kind``: plain strings (the spec's field is a ``Literal`` of them)."""

    NONE: Final = "none"
    ICL: Final = "icl"
    VECTOR: Final = "vector"  # one user-level vector
    FINTS: Final = "fints"  # per-query retrieval from the user's dictionary


#: The kinds that steer (and so need sites, vectors and the validation search).
STEERING_KINDS: tuple[str, ...] = (Kind.VECTOR, Kind.FINTS)


class Source:
    """Whose data a row uses: ``MethodSpec.icl_source`` / ``vector_source``."""

    OWN: Final = "own"
    WRONG: Final = "wrong"  # another user's (fixed per user: ``Task.wrong_user``)
    RANDOM: Final = "random"  # a random direction with the same norm (vectors only)
    OTHERS: Final = "others"  # the mean of the other users' vectors (vectors only)


#: The site component a search starts from, and every one it may try at a layer.
DEFAULT_COMPONENT: Final = "attn+mlp"
COMPONENTS: tuple[str, ...] = (DEFAULT_COMPONENT, *(c.value for c in Component))

#: The in-context items of the ICL baseline every analysis keeps beside the best Fints row.
REFERENCE_ICL_K: Final = 3


class Label:
    """Row labels. Fixed ones are attributes, the ones naming a setting are functions."""

    NONE: Final = "none"
    BEST: Final = "fints (best on val)"
    SEARCH_START: Final = "fints"  # the search's starting point (never a test row)
    RANDOM_DIRECTION: Final = "control: random direction"
    WRONG_USER_DICTIONARY: Final = "control: wrong-user dictionary"
    FINTS_ON_WRONG_USER_ICL: Final = "control: fints on wrong-user icl"
    CENTERED: Final = "fints centered"
    CENTERED_WRONG_USER: Final = "fints centered (wrong-user dictionary)"
    WITHOUT_ICL: Final = "fints without icl"
    ABSOLUTE_STRENGTH: Final = "fints absolute strength"
    RELATIVE_STRENGTH: Final = "fints relative strength"

    @staticmethod
    def icl(k: int) -> str:
        return f"icl k={k}"

    @staticmethod
    def wrong_user_icl(k: int) -> str:
        return f"control: icl k={k} wrong user"

    @staticmethod
    def user_vector(method: str) -> str:
        return f"user vector ({method})"

    @staticmethod
    def fints_at(component: str) -> str:
        return f"fints {component}"

    @staticmethod
    def fints_aggregation(aggregation: str) -> str:
        return f"fints {aggregation} aggregation"

    @staticmethod
    def fints_plus_icl(k: int) -> str:
        return f"fints + icl k={k}"

    @staticmethod
    def fints_contrast(contrast: str) -> str:
        return f"fints {contrast} contrast"

    # An extraction method at its own default sites and the product's default steering
    # (``Preset.default_methods``), and its controls.
    @staticmethod
    def method_defaults(method: str) -> str:
        return f"{method} vectors"

    @staticmethod
    def method_wrong_user(method: str) -> str:
        return f"control: {method} vectors of the wrong user"

    @staticmethod
    def method_others(method: str) -> str:
        return f"control: other users' mean {method} vector"

    @staticmethod
    def method_random(method: str) -> str:
        return f"control: {method} vectors in a random direction"


#: The comparisons fixed before any run, per tested row (at most three each): the row
#: minus each named row, Holm-corrected together on each of :data:`HOLM_METRICS`. A new
#: method (e.g. trained vectors) adds its own row here.
PRE_REGISTERED: dict[str, tuple[str, ...]] = {
    Label.BEST: (
        Label.WRONG_USER_DICTIONARY,
        Label.RANDOM_DIRECTION,
        Label.icl(REFERENCE_ICL_K),
    ),
    # issue 21: own vs another user's delta (on the same shared vector), vs the shared
    # part (the other users' mean: the shared vector plus their mean delta), vs ICL k=3
    Label.method_defaults("trained"): (
        Label.method_wrong_user("trained"),
        Label.method_others("trained"),
        Label.icl(REFERENCE_ICL_K),
    ),
}

#: The user-vector baselines (``fints.user_vectors``); all but the mean one run only
#: where a preset asks for extra baselines.
USER_VECTORS: tuple[str, ...] = tuple(fints.user_vectors.USER_VECTORS)
EXTRA_USER_VECTORS: tuple[str, ...] = USER_VECTORS[1:]


def judge_name(task: str) -> Judge:
    """Persona outputs are judged by their mood; every other task's by author attribution."""
    return Judge.MOOD_RATE if task == TaskName.PERSONA else Judge.ATTRIBUTION


def target_metrics(judge: str) -> tuple[Metric, ...]:
    """What Fints must beat every comparison on (issue #4): ROUGE-1 and ROUGE-L, and the
    mood rate where that is the judge."""
    return (*ROUGE, Metric.JUDGE) if judge == Judge.MOOD_RATE else ROUGE
