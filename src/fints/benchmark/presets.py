"""The benchmark's presets: how much data each task uses and what the validation search tries.

``small`` is what ``make bench`` runs (a few users, every task, the main methods and
controls), ``medium`` the recorded CPU run, ``full`` the whole specification. Every
``fints bench`` option overrides its preset (:class:`fints.benchmark.pipeline.BenchSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fints.benchmark.labels import COMPONENTS, DEFAULT_COMPONENT, Label, TaskName
from fints.benchmark.methods import ALL_ENTRIES, DEFAULT_TAU


@dataclass(frozen=True)
class TaskSizes:
    """How much of one task a run uses."""

    max_users: int | None  # None: every qualifying user
    n_test: int  # test queries per user
    n_val: int  # validation queries per user
    max_history: int  # history items per user
    max_new_tokens: int


@dataclass(frozen=True)
class Preset:
    sizes: dict[TaskName, TaskSizes]
    strengths: tuple[float, ...]
    absolute_strengths: tuple[float, ...]
    components: tuple[str, ...]
    aggregations: tuple[str, ...]
    top_ks: tuple[int, ...]  # searched after the task's default K (ALL_ENTRIES: all)
    taus: tuple[float, ...]  # attentive temperatures searched; the search starts at the first
    icl_k: tuple[int, ...]
    contrasts: tuple[str, ...]
    variants: bool  # site / aggregation / icl / contrast variants on test
    extra_baselines: bool  # PCA and logistic user vectors beside the mean one
    baselines: tuple[str, ...] | None  # baseline rows kept on test (None: all)
    sparsity: tuple[float, ...]  # shares of each user's history to sweep (not persona)
    persona_sizes: tuple[int, ...]  # persona history sizes to sweep
    clusters: int  # user clusters (0: none)
    # extraction methods run on test at their own defaults, with their controls
    # (rows.default_method_rows): trained vectors, the default for a new user
    default_methods: tuple[str, ...] = ("trained",)


HEADLINES, ABSTRACTS, PERSONA = TaskName.HEADLINES, TaskName.ABSTRACTS, TaskName.PERSONA

PRESETS: dict[str, Preset] = {
    # make bench: a smoke run of every task with the main methods and controls.
    "small": Preset(
        sizes={
            HEADLINES: TaskSizes(max_users=4, n_test=2, n_val=1, max_history=6, max_new_tokens=20),
            ABSTRACTS: TaskSizes(max_users=3, n_test=1, n_val=1, max_history=4, max_new_tokens=48),
            PERSONA: TaskSizes(max_users=3, n_test=2, n_val=1, max_history=6, max_new_tokens=32),
        },
        strengths=(0.2,),
        absolute_strengths=(),
        components=(DEFAULT_COMPONENT,),
        aggregations=("attentive",),
        top_ks=(),
        taus=(DEFAULT_TAU,),
        icl_k=(0,),
        contrasts=("context",),
        variants=False,
        extra_baselines=False,
        baselines=(Label.NONE, Label.icl(1), Label.icl(3), Label.user_vector("mean")),
        sparsity=(),
        persona_sizes=(),
        clusters=0,
        # a tenant's shared trained vector takes minutes per task on CPU: add it with
        # --default-methods trained
        default_methods=(),
    ),
    # The recorded CPU run (see BENCHMARKS.md): what fits in about an hour on 2 shared cores.
    "medium": Preset(
        sizes={
            HEADLINES: TaskSizes(max_users=25, n_test=4, n_val=1, max_history=8, max_new_tokens=24),
            ABSTRACTS: TaskSizes(max_users=10, n_test=2, n_val=1, max_history=6, max_new_tokens=64),
            PERSONA: TaskSizes(
                max_users=None, n_test=6, n_val=2, max_history=10, max_new_tokens=48
            ),
        },
        strengths=(0.1, 0.3),
        absolute_strengths=(),
        components=(DEFAULT_COMPONENT, "attn"),
        aggregations=("attentive",),
        top_ks=(),
        taus=(DEFAULT_TAU,),
        icl_k=(0,),
        contrasts=("context",),
        variants=False,
        extra_baselines=False,
        baselines=(Label.NONE, Label.icl(3), Label.user_vector("mean")),
        sparsity=(),
        persona_sizes=(),
        clusters=3,
    ),
    # The full specification (every variant, sparsity, >= 200 / 100 queries); needs a GPU
    # or many CPU hours.
    "full": Preset(
        sizes={
            HEADLINES: TaskSizes(
                max_users=None, n_test=5, n_val=2, max_history=30, max_new_tokens=24
            ),
            ABSTRACTS: TaskSizes(
                max_users=None, n_test=3, n_val=1, max_history=20, max_new_tokens=128
            ),
            PERSONA: TaskSizes(
                max_users=None, n_test=12, n_val=3, max_history=50, max_new_tokens=64
            ),
        },
        strengths=(0.05, 0.15, 0.4),
        absolute_strengths=(2.0, 8.0),
        components=COMPONENTS,
        aggregations=("attentive", "mean"),
        top_ks=(1, ALL_ENTRIES),
        taus=(DEFAULT_TAU, 0.03, 0.3),
        icl_k=(0, 3),
        contrasts=("context", "response"),
        variants=True,
        extra_baselines=True,
        baselines=None,
        sparsity=(0.05, 0.1, 0.25, 0.5),
        persona_sizes=(5, 10, 25),
        clusters=3,
    ),
}

#: The preset ``fints bench`` runs unless told otherwise.
DEFAULT_PRESET = "full"


def default_top_k(task: str) -> int:
    """Retrieved entries K the search starts from: fewer for long abstracts."""
    return 3 if task == ABSTRACTS else 5
