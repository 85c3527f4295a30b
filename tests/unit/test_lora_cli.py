"""``fints lora ...`` on a tiny random llama saved as a local model folder: train the
task and the users' adapters with progress, show one, refuse a damaged import, and
``fints delete`` takes the user's adapter with them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fints.adapters.files import WEIGHTS_FILE
from fints.cli import app
from fints.store import Store
from tests.unit.benchmark_fixtures import tiny_llama
from tests.unit.lora_fixtures import history

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama()
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def answer(out: str) -> dict:
    """The JSON line ``generate --json`` printed (progress bars share the captured output)."""
    return json.loads(out[out.rindex('{"query"') :].splitlines()[0])


def test_train_show_import_and_delete(model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    with Store(db) as store:
        for user in ("ann", "ben"):
            store.add_items("default", user, history(user))
    common = ("--store", str(db), "--model", str(model_dir), "--dtype", "float32")
    settings = tmp_path / "lora.json"
    settings.write_text(json.dumps({"r": 4, "alpha": 8, "batch_size": 2}))

    code, out = run("lora", "train-task", "chat", *common, "--config", str(settings))
    assert code == 0, out
    code, out = run("lora", "train", "--task", "chat", *common, "--config", str(settings))
    assert code == 0, out
    assert "ann" in out and "ben" in out

    ask = ("generate", "ann", "hello", *common, "--max-tokens", "2", "--json", "--no-compare")
    code, out = run(*ask)
    assert code == 0, out
    assert answer(out)["adapter"] == "ann"  # served with their adapter
    code, out = run(*ask, "--no-adapter")
    assert code == 0 and answer(out)["adapter"] is None, out
    code, out = run("build", "ann", *common, "--contrast", "context")
    assert code == 0, out
    code, out = run(*ask)  # the plug-in: her adapter and her dictionary in one row
    assert code == 0 and answer(out)["adapter"] == "ann" and answer(out)["steered"], out
    code, out = run(*ask, "--no-steer")  # the adapter alone
    assert code == 0 and answer(out)["adapter"] == "ann" and not answer(out)["steered"], out
    with Store(db) as store:
        store.add_items("default", "cy", history("cy"))
    code, out = run(*ask[:1], "cy", *ask[2:], "--adapter")
    assert code == 1 and "cy" in out and "adapter" in out, out

    code, out = run("lora", "show", "ann", *common)
    assert code == 0, out
    shown = json.loads(out[out.index("{") :])
    assert (shown["task_rank"], shown["user_rank"], shown["items"]) == (4, 4, 4)
    assert shown["train_config"]["alpha"] == 8 and shown["train_config"]["lr"] == 1e-4

    damaged = tmp_path / "damaged"
    shutil.copytree(shown["folder"], damaged)
    (damaged / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    code, out = run("lora", "import", str(damaged), "ben", *common)
    assert code == 1 and "damaged" in out

    code, out = run("delete", "ann", "--yes", "--store", str(db))
    assert code == 0, out
    assert not Path(shown["folder"]).exists()
    code, out = run("lora", "show", "ann", *common)
    assert code == 1 and "unknown user" in out


def test_bad_settings_are_one_clear_line(model_dir: Path, tmp_path: Path) -> None:
    code, out = run("lora", "train", "--store", str(tmp_path / "s.sqlite"), "--r", "0")
    assert code == 1 and "r must be an integer >= 1" in out
