"""The cross-run summary: intervals recomputed from per-query scores, counts, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fints.benchmark.labels import Judge, Label, Metric, Role
from fints.benchmark.summary import (
    RunSummary,
    run_folders,
    summarize_run,
    summarize_runs,
    summary_markdown,
)
from fints.cli import app
from fints.errors import InvalidInputError

RECORDED = Path(__file__).parents[2] / "benchmarks" / "results" / "qwen1.5b-abstracts-fints"


def _row(role: str, rouge: np.ndarray, judge: np.ndarray) -> tuple[dict, dict]:
    means = {"rouge1": float(rouge.mean()), "rougeL": float(rouge.mean()), "judge": judge.mean()}
    scores = {"rouge1": rouge.tolist(), "rougeL": rouge.tolist(), "judge": judge.tolist()}
    return {**means, "role": role, "method": role}, scores


def write_run(folder: Path, task: str, *, with_scores: bool = True) -> Path:
    """A run where Fints clearly beats none on ROUGE, ties the random direction on
    ROUGE and beats it on the judge, and loses to ICL."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.3, 60)
    hits = (rng.uniform(size=60) < 0.5).astype(float)
    rows = {
        Label.BEST: _row(Role.FINTS, base + 0.05, hits),
        Label.NONE: _row(Role.BASELINE, base, np.zeros(60)),
        Label.icl(3): _row(Role.BASELINE, base + 0.08, hits),
        Label.RANDOM_DIRECTION: _row(Role.CONTROL, base + 0.05, np.zeros(60)),
        Label.fints_at("attn"): _row(Role.VARIANT, base, hits),  # not a comparison
    }
    task_entry: dict = {
        "name": task,
        "chosen": "fints 10.block s=2abs",
        "rows": {label: summary for label, (summary, _) in rows.items()},
    }
    if with_scores:
        task_entry["per_query"] = {label: scores for label, (_, scores) in rows.items()}
    folder.mkdir(parents=True)
    header = {"model": "smollm2 (fingerprint f5cb850930de, dtype torch.float32)"}
    (folder / "results.json").write_text(json.dumps({"header": header, "tasks": [task_entry]}))
    return folder


def summarized(folder: Path, task: str) -> RunSummary:
    (summary,), skipped = summarize_run(write_run(folder / task, task))
    assert skipped == []
    return summary


def test_the_run_summary_names_the_model_and_counts_the_queries(tmp_path):
    headlines = summarized(tmp_path, "headlines")
    assert (headlines.model, headlines.queries) == ("smollm2", 60)


def test_baselines_and_controls_are_compared_and_variants_are_not(tmp_path):
    headlines = summarized(tmp_path, "headlines")
    labels = [c.label for c in headlines.comparisons]
    assert labels == [Label.NONE, Label.icl(3), Label.RANDOM_DIRECTION]


def test_a_comparison_is_beaten_only_when_every_target_measure_clears_zero(tmp_path):
    # Fints beats none on ROUGE, ties the random direction on ROUGE, loses to ICL.
    headlines = summarized(tmp_path, "headlines")
    assert headlines.versus(Label.NONE).beaten(headlines.target_metrics)
    assert not headlines.versus(Label.RANDOM_DIRECTION).beaten(headlines.target_metrics)
    assert headlines.beaten == 1


def test_the_hardest_rows_are_where_fints_leads_least(tmp_path):
    headlines = summarized(tmp_path, "headlines")
    assert headlines.hardest(Role.BASELINE, Metric.ROUGEL).label == Label.icl(3)
    hardest_control = headlines.hardest(Role.CONTROL, Metric.ROUGEL)
    assert hardest_control.diffs[Metric.ROUGEL].mean == pytest.approx(0.0)


def test_on_persona_the_mood_rate_is_a_target_measure_too(tmp_path):
    # none is beaten on it, the random direction beaten on it but tied on ROUGE,
    # ICL lost on ROUGE: one comparison beaten.
    persona = summarized(tmp_path, "persona")
    assert persona.judge_name == Judge.MOOD_RATE
    assert persona.target_metrics == (Metric.ROUGE1, Metric.ROUGEL, Metric.JUDGE)
    assert persona.beaten == 1


def test_recomputed_intervals_match_the_recorded_report():
    # recorded before users were kept: each query is its own user, which draws exactly the
    # per-query bootstrap the report used then
    (summary,), _ = summarize_run(RECORDED)
    assert summary.users == summary.queries
    recorded = json.loads((RECORDED / "results.json").read_text())["tasks"][0]["best_minus"]
    assert {c.label for c in summary.comparisons} == set(recorded)
    for comparison in summary.comparisons:
        for metric, difference in comparison.diffs.items():
            # "+0.0013 [-0.0049, +0.0072]"; the stored per-query scores are rounded to 4 digits
            mean, low, high = map(
                float, re.findall(r"[-+]\d\.\d+", recorded[comparison.label][metric])
            )
            assert (difference.mean, difference.lo, difference.hi) == pytest.approx(
                (mean, low, high), abs=2e-4
            )


def test_markdown_names_the_hardest_rows_and_what_was_left_out(tmp_path):
    runs = tmp_path / "results"
    write_run(runs / "a", "headlines")
    write_run(runs / "b", "persona", with_scores=False)
    assert [f.name for f in run_folders([runs])] == ["a", "b"]
    summaries, skipped = summarize_runs([runs])
    assert skipped == ["b (persona): recorded before per-query scores were kept"]
    table = summary_markdown(summaries, skipped)
    line = next(row for row in table.splitlines() if row.startswith("| a |"))
    assert f"({Label.icl(3)})" in line
    assert f"({Label.RANDOM_DIRECTION}; {Judge.ATTRIBUTION})" in line
    assert line.endswith("| 1/3 |")
    assert "Left out: b (persona)" in table


def test_a_folder_without_results_is_not_a_run(tmp_path):
    with pytest.raises(InvalidInputError, match=r"no results\.json"):
        summarize_run(tmp_path)


def test_a_broken_results_file_is_named(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not a fints benchmark results file"):
        summarize_run(tmp_path)


def test_run_folders_must_exist_and_hold_runs(tmp_path):
    with pytest.raises(InvalidInputError, match="no such folder"):
        run_folders([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"no results\.json in it"):
        run_folders([tmp_path / "empty"])


def test_cli_prints_and_writes_the_table(tmp_path):
    run = write_run(tmp_path / "run", "headlines")
    out = tmp_path / "summary.md"
    result = CliRunner().invoke(app, ["bench-summary", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| run | task |" in result.output and out.read_text().startswith("| run | task |")


def test_cli_reports_a_missing_folder(tmp_path):
    result = CliRunner().invoke(app, ["bench-summary", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no such folder" in result.output


def test_recorded_users_and_nll_are_used(tmp_path):
    folder = write_run(tmp_path / "run", "headlines")
    data = json.loads((folder / "results.json").read_text())
    task = data["tasks"][0]
    users = [f"u{i // 6}" for i in range(60)]  # ten users, six queries each
    task["users"] = users
    rng = np.random.default_rng(1)
    nll = rng.uniform(2, 4, 60)
    for label, scores in task["per_query"].items():
        shift = -0.1 if label == Label.BEST else 0.0
        scores["nll"] = (nll + shift).tolist()
    (folder / "results.json").write_text(json.dumps(data))
    (summary,), _ = summarize_run(folder)
    assert (summary.queries, summary.users) == (60, 10)
    none = summary.versus(Label.NONE).diffs
    assert none[Metric.NLL].mean == pytest.approx(-0.1)
    assert none[Metric.NLL].n_users == 10 and none[Metric.ROUGEL].n_users == 10
    assert none[Metric.NLL].p == pytest.approx(2 / 2**10)  # every user better: only +/-all
    # the pre-registered family present in this run: the random direction and ICL k=3
    assert [p.minus for p in summary.preregistered] == [Label.RANDOM_DIRECTION, Label.icl(3)]
    line = summary_markdown([summary]).splitlines()[2]
    assert "| 60 (10) |" in line
    assert f"{Label.RANDOM_DIRECTION}: -0.1000 [-0.1000, -0.1000] p(Holm)=0.0039" in line


def test_a_run_with_trained_vectors_only_is_summarized_on_them(tmp_path):
    """`fints bench --default-methods trained` runs without a validated Fints row: the
    summary evaluates the trained row, with its pre-registered comparisons."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0.1, 0.3, 40)
    zeros = np.zeros(40)
    trained = Label.method_defaults("trained")
    rows = {
        trained: _row(Role.DEFAULTS, base + 0.04, zeros),
        Label.method_wrong_user("trained"): _row(Role.DEFAULTS, base + 0.01, zeros),
        Label.method_others("trained"): _row(Role.DEFAULTS, base + 0.02, zeros),
        Label.NONE: _row(Role.BASELINE, base, zeros),
        Label.icl(3): _row(Role.BASELINE, base + 0.06, zeros),
    }
    task = {
        "name": "headlines",
        "rows": {label: summary for label, (summary, _) in rows.items()},
        "per_query": {label: scores for label, (_, scores) in rows.items()},
    }
    folder = tmp_path / "trained-only"
    folder.mkdir()
    (folder / "results.json").write_text(
        json.dumps({"header": {"model": "smollm2"}, "tasks": [task]})
    )
    (summary,), skipped = summarize_run(folder)
    assert skipped == [] and summary.chosen == trained
    assert [c.label for c in summary.comparisons] == [Label.NONE, Label.icl(3)]
    assert summary.versus(Label.NONE).diffs[Metric.ROUGEL].mean == pytest.approx(0.04)
    assert summary.versus(Label.icl(3)).diffs[Metric.ROUGEL].mean == pytest.approx(-0.02)
    minus = [p.minus for p in summary.preregistered]
    assert minus == [Label.method_wrong_user("trained"), Label.method_others("trained"),
                     Label.icl(3)]  # fmt: skip
    assert "trained vectors" in summary_markdown([summary])
