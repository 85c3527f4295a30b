"""``fints bench``'s options: parsing, BenchSettings (checks, JSON, the data folder) and the
command's errors, none of which loads a model."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fints.benchmark.commands import bench, parse_ints, parse_items, parse_methods, parse_top_ks
from fints.benchmark.labels import Label, TaskName
from fints.benchmark.methods import ALL_ENTRIES
from fints.benchmark.pipeline import command_line
from fints.benchmark.presets import PRESETS
from fints.benchmark.settings import BenchSettings
from fints.benchmark.tasks import DATA_DIR_ENV, HEADLINES_FILE
from fints.errors import InvalidInputError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "bench"

#: A value for every field, none of them the default.
EVERYTHING = BenchSettings(
    preset="small", tasks=("persona", "headlines"), model="m.gguf", data_dir=Path("data"),
    headlines_file=Path("h.jsonl"), abstracts_file=Path("a.jsonl"), persona_dir=Path("moods"),
    out=Path("out"), cache=Path("cache"), layers=(10, 15), max_users=4, n_test=2, n_val=1,
    max_history=6, max_new_tokens=20, min_items=12, queries_per_user=1, strengths=(0.1, 0.3),
    components=("attn", "block"), contrasts=("response",), default_methods=("context",),
    top_ks=(1, ALL_ENTRIES),
    taus=(0.1, 0.3), search_rounds=3, search_margin=1.0, rows=(Label.NONE, Label.icl(3)),
    sparsity_fractions=(), persona_sizes=(5, 10), n_clusters=0, batch_size=8,
    timing_repeats=0, dtype="bfloat16", seed=7,
)  # fmt: skip


# -- option parsing ------------------------------------------------------------------------


def test_number_lists() -> None:
    assert parse_ints("5,10,25", "persona_sizes") == (5, 10, 25)
    assert parse_ints("", "persona_sizes") == ()  # an empty list switches the sweep off
    assert parse_ints(None, "persona_sizes") is None  # the preset's own sizes
    with pytest.raises(InvalidInputError, match="--persona-sizes"):
        parse_ints("5,ten", "persona_sizes")


def test_comma_separated_items_are_stripped() -> None:
    assert parse_items("attn, block") == ("attn", "block")
    assert parse_items(None) is None


def test_default_methods_take_names_or_none() -> None:
    assert parse_methods("trained, context") == ("trained", "context")
    assert parse_methods("none") == () and parse_methods(None) is None
    with pytest.raises(InvalidInputError, match="--default-methods"):
        BenchSettings(default_methods=("sideways",))


def test_retrieval_sizes() -> None:
    assert parse_top_ks("5, 1,all") == (5, 1, ALL_ENTRIES)
    assert parse_top_ks("") == ()  # the task's default K alone
    for bad in ("0", "-2", "five", "2.5"):
        with pytest.raises(InvalidInputError, match="--top-ks"):
            parse_top_ks(bad)


# -- BenchSettings -------------------------------------------------------------------------


def test_settings_round_trip_through_json() -> None:
    for settings in (EVERYTHING, BenchSettings()):
        text = json.dumps(settings.to_dict())
        assert BenchSettings.from_dict(json.loads(text)) == settings


def test_every_field_is_set_in_the_round_trip_example() -> None:
    defaults = BenchSettings()
    names = [f.name for f in fields(BenchSettings)]
    assert [n for n in names if getattr(EVERYTHING, n) == getattr(defaults, n)] == []


def test_settings_from_json_name_the_bad_field() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown benchmark setting\(s\) \['colour'\]"):
        BenchSettings.from_dict({"colour": "red"})
    with pytest.raises(InvalidInputError, match="'seed': expected int, got '7'"):
        BenchSettings.from_dict({"seed": "7"})
    with pytest.raises(InvalidInputError, match="'layers'"):
        BenchSettings.from_dict({"layers": [10, True]})


def test_settings_check_the_search_choices() -> None:
    with pytest.raises(InvalidInputError, match=r"--components.*'attn,ffn'"):
        BenchSettings(components=("attn", "ffn"))
    with pytest.raises(InvalidInputError, match="--contrasts"):
        BenchSettings(contrasts=())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"tasks": ("headlines", "poems")}, r"unknown task\(s\) \['poems'\]"),
        ({"tasks": ()}, r"unknown task\(s\) \[\]"),
        ({"search_rounds": 0}, "--search-rounds must be at least 1"),
        ({"search_margin": -1.0}, "--search-margin must be >= 0"),
        ({"taus": (0.1, 0.0)}, "--taus must be positive"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
    ],
)
def test_settings_refuse_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        BenchSettings(**changes)


def test_options_override_the_preset_and_empty_lists_keep_it() -> None:
    settings = BenchSettings(preset="small", strengths=(), top_ks=(), n_clusters=2)
    preset = settings.search_preset()
    assert preset.strengths == PRESETS["small"].strengths  # empty: the preset's
    assert preset.top_ks == () and preset.clusters == 2
    sizes = BenchSettings(preset="small", n_test=9).task_sizes(TaskName.ABSTRACTS)
    assert (sizes.n_test, sizes.n_val) == (9, PRESETS["small"].sizes[TaskName.ABSTRACTS].n_val)


# -- the data folder -----------------------------------------------------------------------


def test_a_task_without_a_data_folder_names_the_option_and_the_variable() -> None:
    settings = BenchSettings(tasks=(TaskName.HEADLINES,))
    with pytest.raises(InvalidInputError, match=rf"--data-dir.*--headlines-file.*{DATA_DIR_ENV}"):
        settings.data_file(TaskName.HEADLINES)
    with pytest.raises(InvalidInputError, match="--data-dir"):
        settings.check_data()


def test_persona_needs_no_data_folder() -> None:
    BenchSettings(tasks=(TaskName.PERSONA,)).check_data()


def test_a_task_file_option_wins_over_the_data_folder() -> None:
    settings = BenchSettings(data_dir=Path("data"), headlines_file=Path("mine.jsonl"))
    assert settings.data_file(TaskName.HEADLINES) == Path("mine.jsonl")
    assert settings.data_file(TaskName.ABSTRACTS) == Path("data") / "arxiv_abstracts.jsonl"


def test_a_missing_data_file_is_reported_before_any_model_loads(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=rf"{HEADLINES_FILE}' does not exist"):
        BenchSettings(tasks=(TaskName.HEADLINES,), data_dir=tmp_path).check_data()


# -- the command ---------------------------------------------------------------------------


def invoke(args: list[str], env: dict[str, str | None]) -> tuple[int, str]:
    app = typer.Typer()
    app.command()(bench)
    result = CliRunner().invoke(app, args, env=env)
    return result.exit_code, result.output


def test_the_command_without_data_names_the_option_and_the_variable() -> None:
    code, output = invoke(["--tasks", "headlines,persona"], {DATA_DIR_ENV: None})
    assert code == 2
    assert "error: the headlines task needs its data: pass --data-dir" in output
    assert DATA_DIR_ENV in output


def test_the_command_takes_the_data_folder_from_the_variable() -> None:
    # the fixture folder has no news_headlines.jsonl: the error shows the folder was used
    code, output = invoke(["--tasks", "headlines"], {DATA_DIR_ENV: str(FIXTURES)})
    assert code == 2
    assert f"{FIXTURES / HEADLINES_FILE}' does not exist" in output.replace("\n", "")


def test_the_command_reports_bad_options_as_errors() -> None:
    code, output = invoke(["--tasks", "persona", "--components", "attn,ffn"], {})
    assert code == 2 and "error: --components takes some of" in output


def test_the_recorded_command_line() -> None:
    module = ["/x/src/fints/benchmark/commands.py", "--rows", "none,icl k=3"]
    assert command_line(module) == "python -m fints.benchmark.commands --rows 'none,icl k=3'"
    assert command_line(["fints", "bench", "--preset", "small"]) == "fints bench --preset small"
