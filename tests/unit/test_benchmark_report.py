"""The run report: verdicts, probes, Markdown and JSON, on rows with known scores and on
the rows a tiny random llama gives the fixture task."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from fints.benchmark.analyses import diagnostics
from fints.benchmark.banks import BenchContext, benchmark_sites
from fints.benchmark.labels import (
    COMPARED,
    HOLM_METRICS,
    PRE_REGISTERED,
    ROUGE,
    Judge,
    Label,
    Metric,
    Role,
    Split,
    judge_name,
)
from fints.benchmark.methods import MethodSpec
from fints.benchmark.metrics import RougeScores, StyleStats
from fints.benchmark.report import PROBES, TaskReport, task_markdown, write_report
from fints.benchmark.rows import methods_for_test
from fints.benchmark.runner import Row, Runner, build_judge, evaluate
from fints.benchmark.search import SearchSpace, default_fints
from fints.benchmark.stats import holm, per_user_means
from fints.generation import GenerationOptions
from tests.unit.benchmark_fixtures import HashEncoder, fixture_task, tiny_llama

CONTEXT, CENTERED = (question for question, _ in PROBES)
ATTRIBUTION = Judge.ATTRIBUTION
PASS = "PASS: Fints beats none, every baseline and every control with CI above zero"


# -- rows with known scores ----------------------------------------------------------------


def row(label: str, role: str, rouge: np.ndarray, judge: np.ndarray) -> Row:
    return Row(
        label=label, role=role, description=label, key=label,
        scores=RougeScores(rouge, rouge), judge_hits=judge,
        style=StyleStats(words=5.0, title_case=0.5, length_gap=0.1, casing_gap=0.1),
        seconds_per_query=0.1, tokens_per_second=10.0, texts=["x"] * len(rouge),
    )  # fmt: skip


def known(judge: str, *, best_gain: float = 0.1, best_hits: float = 1.0) -> TaskReport:
    """Fints ``best_gain`` above none, ICL and a control on ROUGE on 60 queries, with a
    judge hit rate of ``best_hits`` against theirs of 0, and a variant that does better."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.3, 60)
    zero = np.zeros(60)
    rows = [
        row(Label.NONE, Role.BASELINE, base, zero),
        row(Label.icl(3), Role.BASELINE, base + rng.normal(0, 0.01, 60), zero),
        row(Label.BEST, Role.FINTS, base + best_gain, np.full(60, best_hits)),
        row(Label.fints_at("attn"), Role.VARIANT, base + 1.0, zero),  # never a comparison
        row(Label.RANDOM_DIRECTION, Role.CONTROL, base, zero),
    ]
    return TaskReport(
        name="t", judge_name=judge, source="fixture", sha256="0" * 64, users=3,
        test_queries=60, validation_queries=3, max_new_tokens=4, rows=rows,
    )  # fmt: skip


def test_fints_above_every_comparison_passes() -> None:
    assert known(ATTRIBUTION).verdict() == PASS


def test_variants_are_not_comparisons() -> None:
    labels = [label for label, _, _ in known(ATTRIBUTION).comparisons()]
    assert labels == [Label.NONE, Label.icl(3), Label.RANDOM_DIRECTION]


def test_a_tie_on_rouge_fails_and_names_each_lost_comparison() -> None:
    verdict = known(ATTRIBUTION, best_gain=0.0).verdict()
    lost = [f"{label} ({m})" for label in (Label.NONE, Label.RANDOM_DIRECTION) for m in ROUGE]
    # ICL differs by noise: its interval straddles zero on both measures, too
    lost[2:2] = [f"{Label.icl(3)} ({m})" for m in ROUGE]
    assert verdict == f"FAIL: CI not above zero against 6 comparison(s): {', '.join(lost)}"


def test_the_judge_counts_only_where_it_is_the_mood_rate() -> None:
    assert known(ATTRIBUTION, best_hits=0.0).verdict() == PASS
    verdict = known(Judge.MOOD_RATE, best_hits=0.0).verdict()
    assert verdict == (
        "FAIL: CI not above zero against 3 comparison(s): none (mood rate), "
        "icl k=3 (mood rate), control: random direction (mood rate)"
    )


def test_without_a_fints_row_there_is_no_verdict() -> None:
    report = known(ATTRIBUTION)
    report.rows = [r for r in report.rows if r.role != Role.FINTS]
    assert report.verdict() == "no Fints row"


def test_the_markdown_lists_every_row_with_its_role() -> None:
    text = task_markdown(known(ATTRIBUTION))
    assert f"| {Label.fints_at('attn')} | {Role.VARIANT} |" in text
    assert f"Verdict: {PASS}" in text


# -- the rows of the fixture task --------------------------------------------------------


@dataclass
class FixtureRun:
    """Every test row of the search's starting setting (no search: it is not tested here)."""

    ctx: BenchContext
    specs: list[MethodSpec]
    rows: list[Row]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> FixtureRun:
    cache = tmp_path_factory.mktemp("report-cache")
    model, task = tiny_llama(), fixture_task(max_history=3, max_new_tokens=4)
    ctx = BenchContext(
        model, HashEncoder(), task, benchmark_sites(model.num_layers, (1, 2)), cache,
        progress=False,
    )  # fmt: skip
    runner = Runner(ctx, GenerationOptions(max_new_tokens=4), cache, progress=False)
    start = default_fints(SearchSpace(layers=(1, 2), strengths=(0.1, 0.5)))
    specs = methods_for_test(start, None, ("context",))
    return FixtureRun(ctx, specs, evaluate(runner, specs, build_judge(task)))


def compared_labels(run: FixtureRun) -> list[str]:
    return [s.label for s in run.specs if s.role in COMPARED]


@pytest.fixture(scope="module")
def report(run: FixtureRun) -> TaskReport:
    task = run.ctx.task
    best = next(s for s in run.specs if s.role == Role.FINTS)
    return TaskReport(
        name=task.name, judge_name=judge_name(task.name), source=task.source,
        sha256=task.sha256, users=len(task.users), test_queries=len(task.queries(Split.TEST)),
        validation_queries=len(task.queries(Split.VALIDATION)), max_new_tokens=4,
        rows=run.rows, chosen=best.describe(),
        selection_log=[("layer", best.describe(), 0.0, run.rows[0].summary())],
        selection_kept=["layer: kept A over B (+0.01, 0.5 standard errors <= 1)"],
        diagnostics=diagnostics(run.ctx, best),
    )  # fmt: skip


@pytest.fixture(scope="module")
def written(report: TaskReport, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the report was written to (once: the plots take a while)."""
    folder = tmp_path_factory.mktemp("report")
    write_report(folder, [report], {"command": "test", "seed": 0})
    return folder


def results_json(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())["tasks"][0]


def test_the_fixture_run_fails_against_every_comparison_on_both_rouge_measures(
    run: FixtureRun, report: TaskReport
) -> None:
    # The tiny random model scores zero ROUGE on every row: Fints ties every comparison.
    assert all(not r.scores.rougeL.any() for r in run.rows)
    labels = compared_labels(run)
    lost = ", ".join(f"{label} ({m})" for label in labels for m in ROUGE)
    assert report.verdict() == (
        f"FAIL: CI not above zero against {2 * len(labels)} comparison(s): {lost}"
    )


def test_the_mood_rate_is_a_target_only_where_it_is_the_judge(report: TaskReport) -> None:
    assert f"({Judge.MOOD_RATE})" not in report.verdict()
    mood = replace(report, judge_name=Judge.MOOD_RATE)
    # no comparison's judge interval is above zero on the fixture run either
    assert mood.verdict().count(f"({Judge.MOOD_RATE})") == len(report.comparisons())


def test_the_written_report_has_the_tables_and_the_plot(written: Path) -> None:
    text = (written / "results.md").read_text()
    assert f"| {Label.RANDOM_DIRECTION} | {Role.CONTROL} |" in text
    assert "Verdict: FAIL" in text
    assert "did not clear the search margin:\n\n- layer: kept A over B" in text
    assert "Diagnostics:" in text and "cosine items same user" in text
    assert (written / "headlines_methods.png").is_file()


def test_results_json_keeps_every_row_its_comparisons_and_per_query_scores(
    run: FixtureRun, report: TaskReport, written: Path
) -> None:
    summary = results_json(written)
    assert set(summary["rows"]) == {s.label for s in run.specs}
    assert set(summary["best_minus"]) == set(compared_labels(run))
    assert summary["selection_log"] and summary["test_queries"] == report.test_queries
    own = report.row(Label.icl(3))
    assert own is not None
    per_query = summary["per_query"][Label.icl(3)]
    assert per_query[Metric.ROUGEL] == pytest.approx(own.scores.rougeL.tolist(), abs=1e-4)


def test_the_probes_pair_each_row_with_its_control(report: TaskReport) -> None:
    probes = dict(report.probes())
    assert [(a, b) for a, b, _ in probes[CENTERED]] == [
        (Label.CENTERED, Label.CENTERED_WRONG_USER),
        (Label.CENTERED, Label.BEST),
        (Label.CENTERED, Label.NONE),
    ]
    assert [(a, b) for a, b, _ in probes[CONTEXT]] == [
        (Label.icl(1), Label.NONE),
        (Label.icl(1), Label.wrong_user_icl(1)),
        (Label.icl(3), Label.NONE),
        (Label.icl(3), Label.wrong_user_icl(3)),
    ]


def test_a_probe_is_the_mean_paired_difference(report: TaskReport) -> None:
    own, wrong = report.row(Label.icl(3)), report.row(Label.wrong_user_icl(3))
    assert own is not None and wrong is not None
    difference = dict(report.probes())[CONTEXT][3][2][Metric.ROUGEL]
    assert difference.mean == pytest.approx(float((own.scores.rougeL - wrong.scores.rougeL).mean()))


def test_the_probes_are_in_both_outputs(written: Path) -> None:
    text = (written / "results.md").read_text()
    assert CONTEXT in text and CENTERED in text
    summary = results_json(written)
    assert [p["minus"] for p in summary["probes"][CONTEXT]][-1] == Label.wrong_user_icl(3)


# -- the NLL and the pre-registered comparisons ------------------------------------------


def test_the_markdown_shows_each_rows_nll_and_the_pre_registered_p_values(
    report: TaskReport,
) -> None:
    text = task_markdown(report)
    assert "| method | role | NLL | ROUGE-1 | ROUGE-L |" in text
    assert "ΔNLL vs none [95% CI]" in text
    none = report.row(Label.NONE)
    assert none is not None and none.has_nll
    assert f"| {Label.NONE} | {Role.BASELINE} | {none.nll.mean():.4f} |" in text
    assert "Pre-registered comparisons (primary metric: NLL" in text
    assert "| p | p(Holm) |" in text
    for other in PRE_REGISTERED[Label.BEST]:
        assert f"| {Label.BEST} | {other} | " in text
    assert "MDE=" in text  # beside every comparison


def test_the_pre_registered_family_is_holm_corrected(report: TaskReport) -> None:
    items = report.preregistered()
    assert [i.minus for i in items] == list(PRE_REGISTERED[Label.BEST])
    for metric in HOLM_METRICS:
        raw = {i.minus: i.diffs[metric].p for i in items}
        assert {i.minus: i.holm[metric] for i in items} == pytest.approx(holm(raw))
    best, wrong = report.row(Label.BEST), report.row(Label.WRONG_USER_DICTIONARY)
    assert best is not None and wrong is not None
    nll = items[0].diffs[Metric.NLL]
    assert nll.n_users == report.users
    assert nll.mean == pytest.approx(float(per_user_means(best.nll - wrong.nll, best.users).mean()))


def test_results_json_keeps_the_nll_the_users_and_the_pre_registered_family(
    report: TaskReport, written: Path
) -> None:
    summary = results_json(written)
    best = report.row(Label.BEST)
    assert best is not None
    assert summary["per_query"][Label.BEST][Metric.NLL] == pytest.approx(
        best.nll.tolist(), abs=1e-5
    )
    assert summary["users"] == best.users
    assert summary["rows"][Label.BEST][Metric.NLL] == pytest.approx(float(best.nll.mean()))
    assert [p["minus"] for p in summary["preregistered"]] == list(PRE_REGISTERED[Label.BEST])
    assert "p=" in summary["best_minus"][Label.NONE][Metric.NLL]


def test_rows_without_an_nll_leave_its_cells_empty() -> None:
    text = task_markdown(known(ATTRIBUTION))
    assert f"| {Label.NONE} | {Role.BASELINE} | n/a |" in text
    assert "n/a | n/a | n/a | n/a" in text  # the pre-registered NLL of rows without one
