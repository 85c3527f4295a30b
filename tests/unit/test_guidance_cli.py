"""The guidance commands: listing saved classifiers, and --prefer mistakes reported
before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fints.cli import app
from fints.guidance.classifier import Backbone
from fints.guidance.library import ClassifierLibrary
from tests.unit.benchmark_fixtures import tiny_llama
from tests.unit.guidance_fixtures import random_classifier

runner = CliRunner()


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
