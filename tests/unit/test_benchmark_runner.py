"""Runner, validation search, test rows and methods on a tiny random llama with a hashing
key encoder and the fixture tasks (tests/unit/benchmark_fixtures.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fints.benchmark.analyses import sparsity
from fints.benchmark.banks import BenchContext, benchmark_sites
from fints.benchmark.labels import (
    Kind,
    Label,
    Role,
    Split,
)
from fints.benchmark.latency import measure_latency
from fints.benchmark.methods import ALL_ENTRIES, MethodSpec, make_method
from fints.benchmark.metrics import TextClassifier
from fints.benchmark.pipeline import benchmark_task, layers_searched, task_runner
from fints.benchmark.presets import PRESETS
from fints.benchmark.rows import methods_for_test, rows_for_test, steers
from fints.benchmark.runner import Row, Runner, build_judge, evaluate
from fints.benchmark.search import (
    SearchSpace,
    Selection,
    default_fints,
    select_fints,
    standard_errors,
)
from fints.benchmark.settings import BenchSettings
from fints.benchmark.tasks import Task
from fints.errors import InvalidInputError
from fints.generation import GenerationOptions
from fints.layers import resolve_layout
from fints.models import LoadedModel, model_fingerprint
from tests.unit.benchmark_fixtures import HashEncoder, fixture_task, tiny_llama


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_llama()


@dataclass
class Searched:
    """One validation search and the test rows it leads to, shared by the tests below."""

    task: Task
    ctx: BenchContext
    runner: Runner
    judge: TextClassifier
    space: SearchSpace
    selection: Selection
    generated_by_search: int
    specs: list[MethodSpec]
    rows: list[Row]
    cache: Path


@pytest.fixture(scope="module")
def searched(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Searched:
    cache = tmp_path_factory.mktemp("bench-cache")
    task = fixture_task(max_history=3, max_new_tokens=4)
    sites = benchmark_sites(tiny.num_layers, (1, 2))
    ctx = BenchContext(tiny, HashEncoder(), task, sites, cache, progress=False)
    options = GenerationOptions(max_new_tokens=4)
    runner = Runner(ctx, options, cache, batch_size=8, progress=False)
    judge = build_judge(task)
    space = SearchSpace(
        layers=(1, 2), strengths=(0.1, 0.5), absolute_strengths=(2.0,),
        components=("attn+mlp", "block"), top_k=(2, ALL_ENTRIES),
        aggregations=("attentive", "mean"), taus=(0.1, 0.5), icl_k=(0, 1),
    )  # fmt: skip
    selection = select_fints(runner, space, judge)
    generated = runner.generated
    specs = methods_for_test(selection.best, selection.best_absolute, ("context",))
    rows = evaluate(runner, specs, judge)
    return Searched(task, ctx, runner, judge, space, selection, generated, specs, rows, cache)


# -- the validation search ---------------------------------------------------------------


def test_the_search_visits_every_stage_and_picks_a_fints_setting(searched: Searched) -> None:
    stages = {stage for stage, *_ in searched.selection.log}
    assert stages >= {"layer", "strength", "sites", "top_k", "aggregation", "tau", "icl"}
    assert searched.selection.best.kind == Kind.FINTS


def test_the_search_tries_tau_only_with_attentive_aggregation(searched: Searched) -> None:
    tried = [desc for stage, desc, *_ in searched.selection.log if stage == "tau"]
    assert tried and all("tau=0.5" in d and " attentive " in d for d in tried)


def test_the_search_generates_validation_queries_only(searched: Searched) -> None:
    validation = len(searched.task.queries(Split.VALIDATION))
    assert searched.generated_by_search == len(searched.selection.log) * validation


def test_more_rounds_continue_the_first_pass_and_never_do_worse(searched: Searched) -> None:
    first = searched.selection
    again = select_fints(searched.runner, replace(searched.space, rounds=3), searched.judge)
    assert again.log[: len(first.log)] == first.log
    objective = {desc: value for _, desc, value, _ in again.log}
    assert objective[again.best.describe()] >= objective[first.best.describe()]
    later = [stage for stage, *_ in again.log[len(first.log) :]]
    assert later and all(stage.endswith(("(2)", "(3)")) for stage in later)


def test_without_a_margin_every_stage_winner_moves(searched: Searched) -> None:
    # The tiny model ties every candidate, so each stage moved to its first candidate.
    assert searched.selection.kept == []
    assert searched.selection.best != default_fints(searched.space)


def test_a_large_margin_keeps_the_starting_setting(searched: Searched) -> None:
    strict = select_fints(searched.runner, replace(searched.space, margin=1e6), searched.judge)
    assert strict.best == default_fints(searched.space)
    # Every candidate ties on the tiny model: no winner had a gain for the margin to turn down.
    assert strict.kept == []


def test_a_negative_margin_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="margin must be >= 0"):
        SearchSpace(layers=(1,), margin=-1.0)


def test_standard_errors_of_a_paired_gain() -> None:
    assert standard_errors(np.array([0.1, 0.3])) == pytest.approx(2.0)  # mean 0.2, se 0.1
    assert standard_errors(np.array([-0.1, -0.3])) == pytest.approx(-2.0)
    assert standard_errors(np.zeros(5)) == 0.0  # identical outputs: no gain at all
    assert standard_errors(np.full(3, 0.05)) == np.inf  # the same gain on every query


# -- test rows, the cache and latency -----------------------------------------------------


def test_the_test_rows_have_every_role_and_every_control(searched: Searched) -> None:
    assert {s.role for s in searched.specs} == {
        Role.BASELINE,
        Role.FINTS,
        Role.VARIANT,
        Role.CONTROL,
    }
    labels = {s.label for s in searched.specs}
    assert {Label.NONE, Label.icl(1), Label.icl(3), Label.BEST} <= labels
    assert {Label.RANDOM_DIRECTION, Label.WRONG_USER_DICTIONARY} <= labels
    assert {Label.wrong_user_icl(1), Label.wrong_user_icl(3)} <= labels


def test_every_test_row_scores_every_test_query(searched: Searched) -> None:
    assert [r.label for r in searched.rows] == [s.label for s in searched.specs]
    assert all(len(r.texts) == len(searched.task.queries(Split.TEST)) for r in searched.rows)


def test_a_second_runner_reads_every_generation_from_the_cache(searched: Searched) -> None:
    options = GenerationOptions(max_new_tokens=4)
    again = Runner(searched.ctx, options, searched.cache, batch_size=8, progress=False)
    rows = evaluate(again, searched.specs, searched.judge)
    assert again.generated == 0
    assert [r.texts for r in rows] == [r.texts for r in searched.rows]


def test_latency_times_each_method_on_the_same_batch(searched: Searched) -> None:
    timed = [searched.specs[0], *(s for s in searched.specs if s.role == Role.FINTS)]
    options = GenerationOptions(max_new_tokens=3)
    latency = measure_latency(searched.ctx, timed, options, batch_size=2)
    assert [t.label for t in latency] == [Label.NONE, Label.BEST]
    assert [(t.queries, t.new_tokens) for t in latency] == [(2, 3), (2, 3)]


@pytest.fixture()
def start() -> Selection:
    """The search's starting point, as a selection (what a run without steering keeps)."""
    return Selection(default_fints(SearchSpace(layers=(1, 2), strengths=(0.1,))), None, [])


def test_the_search_starts_at_the_middle_layer_and_strength(start: Selection) -> None:
    assert start.best.sites == "2.attn+mlp" and start.best.strength == 0.1


def test_named_rows_run_in_the_report_order_and_need_no_search(start: Selection) -> None:
    named = [Label.wrong_user_icl(3), Label.NONE, Label.icl(3)]
    specs = rows_for_test(start, PRESETS["small"], named)
    assert [s.label for s in specs] == [Label.NONE, Label.icl(3), Label.wrong_user_icl(3)]
    assert not steers(specs)


def test_the_small_preset_runs_both_icl_baselines_and_their_controls(start: Selection) -> None:
    specs = rows_for_test(start, PRESETS["small"], None)
    expected = {Label.icl(1), Label.icl(3), Label.wrong_user_icl(1), Label.wrong_user_icl(3)}
    assert expected <= {s.label for s in specs}
    assert steers(specs)


def test_a_wrong_user_icl_control_runs_only_beside_its_own_icl_row(start: Selection) -> None:
    medium = {s.label for s in rows_for_test(start, PRESETS["medium"], None)}
    assert Label.icl(1) not in medium and Label.wrong_user_icl(1) not in medium
    assert Label.icl(3) in medium and Label.wrong_user_icl(3) in medium


def test_a_named_variant_that_is_the_chosen_setting_runs_once(start: Selection) -> None:
    named = [Label.BEST, Label.fints_contrast("context"), Label.fints_contrast("response")]
    specs = rows_for_test(start, PRESETS["full"], named)
    assert [s.label for s in specs] == [Label.BEST, Label.fints_contrast("response")]
    assert [s.contrast for s in specs] == ["context", "response"]


def test_unknown_rows_are_named_in_the_error(start: Selection) -> None:
    with pytest.raises(InvalidInputError, match=r"unknown row.*'fints sideways contrast'"):
        rows_for_test(start, PRESETS["full"], ["fints sideways contrast"])
    with pytest.raises(InvalidInputError, match=r"unknown row.*'fints typo'"):
        rows_for_test(start, PRESETS["small"], [Label.NONE, "fints typo"])


# -- a task's run from its settings, and the sparsity sweep -------------------------------


def test_a_probe_without_steering_runs_no_search_and_no_sparsity_sweep(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=3, max_new_tokens=4)
    settings = BenchSettings(
        preset="small", cache=tmp_path, batch_size=8, timing_repeats=0,
        sparsity_fractions=(0.5,), n_clusters=0, rows=(Label.NONE, Label.icl(1)),
    )  # fmt: skip
    report = benchmark_task(task, tiny, HashEncoder(), (1,), settings)
    assert [r.label for r in report.rows] == [Label.NONE, Label.icl(1)]
    assert report.sparsity == [] and report.selection_log == [] and report.chosen == ""
    assert "validation search" not in report.seconds
    assert layers_searched([report], (1,)) == "none (no row steers)"


def test_sparsity_runs_less_history_and_ends_with_the_whole(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=4, max_new_tokens=3)
    best = MethodSpec(
        Label.BEST, kind=Kind.FINTS, sites="1.attn+mlp", strength=0.2, role=Role.FINTS
    )

    def runner_for(t: Task) -> Runner:
        return task_runner(
            t, model=tiny, encoder=HashEncoder(), sites=benchmark_sites(tiny.num_layers, (1,)),
            options=GenerationOptions(max_new_tokens=3),
            settings=BenchSettings(cache=tmp_path, batch_size=8),
        )  # fmt: skip

    points = sparsity(task, best, build_judge(task), runner_for, fractions=(0.25,), sizes=())
    assert [(p["history"], p["label"]) for p in points] == [
        (h, label)
        for h in ("25%", "100%")
        for label in (Label.BEST, Label.RANDOM_DIRECTION, Label.icl(3))
    ]
    assert all(0 <= p["rougeL"] <= 1 and "[" in p["delta_rougeL"] for p in points)


# -- methods: caches, controls, centering, retrieval ----------------------------------------


def test_caches_are_per_dtype(tiny: LoadedModel, tmp_path: Path) -> None:
    """A bf16 run must not reuse an fp32 run's generations or activations."""
    task = fixture_task(max_history=3, max_new_tokens=4)
    half = copy.deepcopy(tiny.model).to(torch.bfloat16)
    tiny_bf16 = LoadedModel(
        half, tiny.tokenizer, tiny.name, model_fingerprint(half), resolve_layout(half)
    )
    assert tiny_bf16.fingerprint == tiny.fingerprint  # same weights, same store entries
    sites = benchmark_sites(tiny.num_layers, (1,))
    paths = []
    for model in (tiny, tiny_bf16):
        ctx = BenchContext(model, HashEncoder(), task, sites, tmp_path, progress=False)
        runner = Runner(ctx, GenerationOptions(max_new_tokens=2), tmp_path, progress=False)
        method = make_method(MethodSpec("none", role="baseline"))
        user = next(iter(task.users))
        paths.append((runner.cache_file(method), ctx._bank_path(user, "context")))
    assert paths[0][0] != paths[1][0] and paths[0][1] != paths[1][1]


def test_controls_change_the_vectors_but_keep_their_norm(tiny: LoadedModel, tmp_path: Path) -> None:
    task = fixture_task(max_history=4, max_new_tokens=6, n_test=2)
    ctx = BenchContext(
        tiny, HashEncoder(), task, benchmark_sites(tiny.num_layers, (1,)), tmp_path, progress=False
    )
    queries = task.queries("test")[:3]
    base = MethodSpec("f", kind="fints", sites="1.attn+mlp", strength=2.0, relative=False)
    own = make_method(base).vectors(queries, ctx)  # type: ignore[attr-defined]
    rnd = make_method(base.with_(vector_source="random")).vectors(queries, ctx)  # type: ignore[attr-defined]
    wrong = make_method(base.with_(vector_source="wrong")).vectors(queries, ctx)  # type: ignore[attr-defined]
    for site, v in own.items():
        assert torch.allclose(v.norm(dim=-1), rnd[site].norm(dim=-1), rtol=1e-4)
        assert not torch.allclose(v, rnd[site])
        assert not torch.allclose(v, wrong[site])
    rel = make_method(base.with_(relative=True, strength=0.5)).vectors(queries, ctx)  # type: ignore[attr-defined]
    bank = ctx.bank(queries[0].user, "context")
    site = next(iter(rel))
    expected = 0.5 * float(bank.site_norms[bank.index([site])[0]])
    assert float(rel[site][0].norm()) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(Exception, match="sites"):
        MethodSpec("bad", kind="fints")


def test_centering_removes_the_other_users_mean_difference(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=3, max_new_tokens=4)
    ctx = BenchContext(
        tiny, HashEncoder(), task, benchmark_sites(tiny.num_layers, (1,)), tmp_path, progress=False
    )
    query = task.queries("test")[0]
    spec = MethodSpec("v", kind="vector", sites="1.attn", strength=1.0, relative=False)
    plain = make_method(spec).vectors([query], ctx)  # type: ignore[attr-defined]
    centered = make_method(spec.with_(centered=True)).vectors([query], ctx)  # type: ignore[attr-defined]
    site = next(iter(plain))
    others = [u for u in task.users if u not in (query.user, task.wrong_user(query.user))]
    assert others
    index = ctx.bank(query.user, "context").index([site])
    shared = torch.stack(
        [ctx.bank(u, "context").differences[:, index].mean(dim=0) for u in others]
    ).mean(dim=0)
    assert torch.allclose(centered[site][0], plain[site][0] - shared[0], atol=1e-5)
    assert not torch.allclose(centered[site], plain[site])
    # the wrong-user twin subtracts the same vector, so the pair differs as before
    wrong = spec.with_(vector_source="wrong")
    plain_wrong = make_method(wrong).vectors([query], ctx)  # type: ignore[attr-defined]
    centered_wrong = make_method(wrong.with_(centered=True)).vectors([query], ctx)  # type: ignore[attr-defined]
    assert torch.allclose(
        centered[site] - centered_wrong[site], plain[site] - plain_wrong[site], atol=1e-5
    )
    # Recorded runs' caches stay valid: an uncentered spec keeps the key it had before.
    assert MethodSpec("none").key() == "c982cf9ff8113b10"
    assert spec.with_(centered=True).key() != spec.key()
    assert "centered" in spec.with_(centered=True).describe()
    with pytest.raises(InvalidInputError, match="does not steer"):
        MethodSpec("icl", kind="icl", icl_k=1, centered=True)


def test_retrieving_every_entry_with_mean_aggregation_is_the_mean_user_vector(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=4, max_new_tokens=4, n_test=2)
    ctx = BenchContext(
        tiny, HashEncoder(), task, benchmark_sites(tiny.num_layers, (1,)), tmp_path, progress=False
    )
    queries = task.queries("test")[:3]
    base = MethodSpec("f", kind="fints", sites="1.block", strength=2.0, relative=False)

    def vectors(spec: MethodSpec) -> torch.Tensor:
        return next(iter(make_method(spec).vectors(queries, ctx).values()))  # type: ignore[attr-defined]

    every = base.with_(top_k=ALL_ENTRIES, aggregation="mean")
    mean_vector = base.with_(kind="vector", user_vector="mean")
    assert torch.allclose(vectors(every), vectors(mean_vector), atol=1e-5)
    assert not torch.allclose(vectors(base.with_(top_k=1, aggregation="mean")), vectors(every))
    # tau: near zero only the best-scored entries count, so K beyond them changes nothing;
    # large, the softmax weights are uniform and attentive is mean aggregation
    sharp = vectors(base.with_(top_k=ALL_ENTRIES, tau=1e-4))
    assert torch.allclose(sharp, vectors(base.with_(tau=1e-4)), atol=1e-5)
    assert not torch.allclose(sharp, vectors(base.with_(top_k=ALL_ENTRIES)), atol=1e-5)
    flat = vectors(base.with_(top_k=ALL_ENTRIES, tau=1e3))
    assert torch.allclose(flat, vectors(every), atol=1e-4)

    assert "K=all mean" in every.describe()
    assert "tau=0.3" in base.with_(tau=0.3).describe()
    assert "tau" not in base.with_(tau=0.3, top_k=1).describe()  # one entry: tau is moot
    assert base.weighs_by_score and not every.weighs_by_score
    assert base.key() == base.with_(tau=0.1).key() != base.with_(tau=0.3).key()
    assert every.with_(tau=0.3).key() == every.key()  # where tau is moot it is not in the key
    assert base.with_(top_k=1, tau=0.3).key() == base.with_(top_k=1).key()
    # ... while the recorded runs' caches stay valid (qwen1.5b-abstracts-fints' chosen row)
    recorded = MethodSpec("f", kind="fints", sites="14.attn+mlp", strength=0.1, top_k=3)
    assert recorded.key() == "069a68418b188bb3"
    with pytest.raises(InvalidInputError, match="top_k"):
        base.with_(top_k=-1)
    with pytest.raises(InvalidInputError, match="tau"):
        base.with_(tau=0.0)
