"""The guidance commands: listing saved classifiers, and --prefer mistakes reported
before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fints.cli import app
from fints.guidance.classifier import Backbone, read_config
from fints.guidance.library import ClassifierLibrary
from fints.guidance.user_style import style_folder
from fints.history import HistoryItem
from fints.store import Store
from tests.unit.benchmark_fixtures import tiny_llama
from tests.unit.guidance_fixtures import random_classifier

runner = CliRunner()


def saved_tiny_model(tmp_path: Path) -> Path:
    """A tiny random llama saved as a model folder the commands can load."""
    model = tiny_llama()
    folder = tmp_path / "tiny-model"
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def test_list_shows_the_saved_classifiers(tmp_path: Path) -> None:
    backbone = Backbone(tiny_llama(), layers=2)
    library = ClassifierLibrary(tmp_path)
    library.save(random_classifier(backbone, "mood", ("happy", "sad"), seed=1))
    out = runner.invoke(app, ["guidance", "list", "--classifiers", str(tmp_path), "--as-json"])
    assert out.exit_code == 0, out.output
    (config,) = json.loads(out.output)
    assert config["name"] == "mood" and config["classes"] == ["happy", "sad"]
    table = runner.invoke(app, ["guidance", "list", "--classifiers", str(tmp_path)])
    assert "mood" in table.output and "happy, sad" in table.output


def test_a_bad_prefer_flag_is_one_clear_error(tmp_path: Path) -> None:
    args = ["generate", "-", "Hi", "--store", str(tmp_path / "s.sqlite"), "--prefer", "mood"]
    out = runner.invoke(app, args)
    assert out.exit_code == 1
    assert "DIMENSION=CLASS:WEIGHT" in out.output and "Traceback" not in out.output


def test_train_style_saves_a_users_style_classifier(tmp_path: Path) -> None:
    folder = saved_tiny_model(tmp_path)
    store = tmp_path / "store.sqlite"
    with Store(store) as db:
        db.add_items(
            "default", "pirate", [HistoryItem(f"q{i}", f"arr matey ahoy {i}") for i in range(10)]
        )
        db.add_items(
            "default", "prof", [HistoryItem(f"q{i}", f"indeed, one notes {i}") for i in range(10)]
        )
    classifiers = tmp_path / "classifiers"
    args = ["guidance", "train-style", "pirate", "--store", str(store), "--model", str(folder)]
    args += ["--layers", "2", "--classifiers", str(classifiers)]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    with Store(store) as db:
        config = read_config(style_folder(db, "default", "pirate"))  # where own-style looks
    assert config.classes == ("other", "own") and config.layers == 2
    assert config.metrics["test"]["texts"] == 4  # a fifth of each side held out
    assert config.metrics["data"]["own"] == 10 and config.metrics["data"]["others"] == 10
    fitted = config.metrics["calibration"]["temperature"]
    assert "temperature" in out.output and f"{fitted:g} (held-out class NLL" in out.output
    assert ClassifierLibrary(classifiers).names() == []
    out = runner.invoke(app, [*args, "--name", "pirate-style"])  # a named copy as well
    assert out.exit_code == 0, out.output
    assert ClassifierLibrary(classifiers).config("pirate-style").classes == ("other", "own")
    out = runner.invoke(app, [*args[:2], "nobody", *args[3:]])
    assert out.exit_code != 0 and "unknown user 'nobody'" in out.output


def test_train_moods_calibrates_unless_told_not_to(tmp_path: Path) -> None:
    """--uncalibrated trains as the mood tables' classifiers were (T = 1, unweighted)."""
    folder = saved_tiny_model(tmp_path)
    classifiers = tmp_path / "classifiers"
    args = ["guidance", "train-moods", "--model", str(folder), "--layers", "2", "--epochs", "1"]
    args += ["--per-mood", "3", "--test-per-mood", "2", "--classifiers", str(classifiers)]
    for flag, name in (("--calibrated", "calibrated"), ("--uncalibrated", "plain")):
        out = runner.invoke(app, [*args, flag, "--name", name])
        assert out.exit_code == 0, out.output
    library = ClassifierLibrary(classifiers)
    calibrated, plain = library.config("calibrated"), library.config("plain")
    assert calibrated.metrics["settings"]["calibrate"] and calibrated.temperature != 1
    assert "calibration" in calibrated.metrics
    assert plain.temperature == 1 and not plain.metrics["settings"]["balanced"]
    assert "calibration" not in plain.metrics
