"""The CLIPer benchmark end to end on a tiny random llama (random classifiers named like
the real ones): every condition per test prompt and mood, the plain answer counted once
per mood, judge hits, perplexities, the setting chosen on validation prompts apart from
the test prompts, and the Markdown report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fints.benchmark.guidance import GuidanceBenchConfig, run_guidance_bench
from fints.benchmark.guidance_report import markdown
from fints.benchmark.guidance_select import Scored, Setting, select_setting
from fints.guidance.classifier import Backbone
from fints.guidance.library import ClassifierLibrary
from fints.guidance.recipes import held_out, read_moods
from tests.unit.benchmark_fixtures import tiny_llama
from tests.unit.guidance_fixtures import random_classifier

MOODS = ("happy", "zen")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory):
    model = tiny_llama()
    backbone = Backbone(model, layers=2)
    library = ClassifierLibrary(Path(tmp_path_factory.mktemp("classifiers")))
    library.save(random_classifier(backbone, "mood", MOODS, seed=1))
    library.save(random_classifier(backbone, "length", ("concise", "long"), seed=2))
    config = GuidanceBenchConfig(
        alphas=(0.5, 5.0),
        n_prompts=2,
        n_valid_prompts=2,
        plausibles=(0.0, 0.9),
        max_new_tokens=3,
        batch_size=7,
        cost_rows=2,
        cost_tokens=2,
    )
    return run_guidance_bench(model, library, config)


def test_every_condition_answers_every_prompt_and_mood(result) -> None:
    conditions = {
        "none",
        "prompting",
        "icl",
        "guided a=0.5",
        "guided a=5",
        "guided a=0.5 + concise",
        result.validation["selection"]["label"],
    }
    assert {a.condition for a in result.answers} == conditions
    for condition in conditions:
        rows = [a for a in result.answers if a.condition == condition]
        assert sorted((a.mood, a.prompt) for a in rows) == sorted(
            (m, p) for m in MOODS for p in {a.prompt for a in result.answers}
        )
    assert len({a.prompt for a in result.answers}) == 2
    none = [a for a in result.answers if a.condition == "none"]
    by_prompt = {p: {a.text for a in none if a.prompt == p} for p in {a.prompt for a in none}}
    assert all(len(texts) == 1 for texts in by_prompt.values())  # one plain answer per prompt


def test_test_prompts_were_never_trained_on(result) -> None:
    assert all(held_out(a.prompt) for a in result.answers)
    assert result.judge["train_texts"] > 100


def test_guidance_changes_answers_and_scores_are_sane(result) -> None:
    plain = {a.prompt: a.text for a in result.answers if a.condition == "none"}
    strong = [a for a in result.answers if a.condition == "guided a=5"]
    assert any(a.text != plain[a.prompt] for a in strong)
    assert all(a.hit in (0.0, 1.0) and math.isfinite(a.ppl) and a.ppl > 0 for a in result.answers)
    table = {r["condition"]: r for r in result.table()}
    assert table["none"]["ppl_ratio"] == pytest.approx(1.0)
    assert "vs_none" in table["guided a=5"] and "vs_prompting" in table["guided a=5"]
    assert "vs_none" not in table["none"] and "vs_prompting" not in table["prompting"]
    report = markdown(result)
    assert "| guided a=5 |" in report and "tok/s" in report


def test_the_setting_is_chosen_on_validation_prompts_apart_from_the_test(result) -> None:
    v = result.validation
    test = {a.prompt for a in result.answers}
    valid = {a.prompt for a in result.valid_answers}
    assert valid == set(v["prompts"]) and len(valid) == 2 and len(test) == 2
    assert not valid & test and all(held_out(q) for q in valid)
    grid = {a.condition for a in result.valid_answers}
    assert grid == {
        "none",
        "guided a=0.5",
        "guided a=5",
        "guided a=0.5 rho=0.9",
        "guided a=5 rho=0.9",
    }
    assert len(v["scored"]) == 4
    scored = [
        Scored(Setting(s["alpha"], s["plausible"]), s["mood_rate"], s["ppl_ratio"])
        for s in v["scored"]
    ]
    again = select_setting(scored, v["none_rate"], v["max_ppl_ratio"])
    assert again.label == v["selection"]["label"] and again.rule == v["selection"]["rule"]
    assert set(v["comparisons"]) == {"none", "prompting", "icl"}
    for c in v["comparisons"].values():
        assert c["lo_simultaneous"] <= c["lo"] <= c["mean"] <= c["hi"] <= c["hi_simultaneous"]
        assert c["p"] <= c["p_holm"] <= 1
    assert isinstance(v["target_met"], bool)
    report = markdown(result)
    assert "## Validation" in report and "Rule (fixed before" in report
    assert v["selection"]["label"] in report and "Target" in report


def test_moodswapper_prompts_are_held_out_by_hash() -> None:
    prompts = {p.prompt for p in read_moods()}
    share = sum(held_out(p) for p in prompts) / len(prompts)
    assert 0.15 < share < 0.35
