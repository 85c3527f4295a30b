"""The `fints` command line, run in-process on the real default model."""

from __future__ import annotations

import json
import re
import traceback

import pytest
from typer.testing import CliRunner

from fints.cli import app
from fints.demo import DEMO_USERS, demo_data_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, smollm):  # smollm: the model cache is warm
    return str(tmp_path_factory.mktemp("cli") / "store.sqlite")


def run(*args: str) -> tuple[int, str]:
    """Exit code and everything printed; an unexpected exception's traceback is appended."""
    result = runner.invoke(app, list(args))
    out = result.output + (result.stderr if result.stderr_bytes else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        out += "".join(traceback.format_exception(result.exception))
    return result.exit_code, out


def users(store_path: str) -> dict[str, int]:
    """`fints users` as {user: number of history items}, read from its table rows."""
    code, out = run("users", "--store", store_path)
    assert code == 0, out
    rows = re.findall(r"^\W+ (\S+)\s+\W+ (\d+)\s+\W+$", out, flags=re.MULTILINE)
    assert rows, out
    return {name: int(count) for name, count in rows}


def test_add_build_generate_export_import_delete(store_path, tmp_path):
    data = demo_data_dir()
    # the context contrast, named (the default, trained, first trains a tenant vector:
    # minutes; tests/unit/test_default_method.py covers it)
    contrast = ("--sites", "12.attn+mlp", "--contrast", "context")
    code, out = run("add", "zoe", str(data / "zoe.jsonl"), "--store", store_path, *contrast)
    assert code == 0, out
    assert "added 10 items" in out and "extracted 10 entries" in out
    code, out = run("build", "zoe", "--store", store_path, *contrast)
    assert code == 0 and "already has its vectors" in out
    code, out = run(
        "generate",
        "zoe",
        "What should I eat?",
        "--store",
        store_path,
        "--max-tokens",
        "8",
        "--json",
        "--no-compare",
    )
    assert code == 0, out
    line = json.loads(out[out.index('{"query"') :].splitlines()[0])
    assert line["steered"] and len(line["retrieved"]) == 5
    word = line["text"].split()[1]
    code, out = run(
        "generate", "zoe", "What should I eat?", "--store", store_path, "--max-tokens", "8",
        "--json", "--no-compare", "--stop", word, "--stop", "never there",
    )  # fmt: skip
    assert code == 0, out
    cut = json.loads(out[out.index('{"query"') :].splitlines()[0])["text"]
    assert cut == line["text"][: line["text"].index(word)]
    code, out = run(
        "generate", "zoe", "Hi", "--store", store_path, "--no-compare",
        "--repetition-penalty", "0.5",
    )  # fmt: skip
    assert code != 0 and "repetition_penalty must be in [1, 10]" in out, out
    code, out = run("export", "zoe", str(tmp_path / "zoe"), "--store", store_path)
    assert code == 0 and (tmp_path / "zoe" / "vectors.safetensors").is_file()
    code, out = run("import", str(tmp_path / "zoe"), "--as", "zoe2", "--store", store_path)
    assert code == 0 and "imported 10 entries as zoe2" in out
    before = users(store_path)
    assert before["zoe"] == 10 and "zoe2" in before
    code, out = run("delete", "zoe", "--store", store_path, "--yes")
    assert code == 0 and "deleted zoe" in out
    after = users(store_path)
    assert "zoe" not in after and after["zoe2"] == before["zoe2"]


def test_bad_input_gets_a_clear_error_and_changes_nothing(store_path, tmp_path):
    good = demo_data_dir() / f"{DEMO_USERS[0]}.jsonl"
    lines = len(good.read_text().splitlines())
    assert run("add", "cap", str(good), "--store", store_path, "--no-build")[0] == 0
    assert users(store_path)["cap"] == lines
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a"}\nnot json\n')
    code, out = run("add", "cap", str(bad), "--store", store_path, "--no-build")
    assert code == 1 and "missing field(s) ['output']" in out and ":3: not valid JSON" in out
    assert users(store_path)["cap"] == lines  # the good first line was not stored either
    code, out = run("add", "cap", str(good), "--store", store_path, "--no-build")
    assert code == 0  # the same items again: a retry, stored once
    assert users(store_path)["cap"] == lines
    first = json.loads(good.read_text().splitlines()[0])
    edited = tmp_path / "edited.jsonl"
    edited.write_text(json.dumps({**first, "output": first["output"] + " (edited)"}) + "\n")
    code, out = run("add", "cap", str(edited), "--store", store_path, "--no-build")
    assert code == 1 and "already has item" in out
    assert users(store_path)["cap"] == lines
    code, out = run("add", "cap", str(tmp_path / "missing.jsonl"), "--store", store_path)
    assert code == 1 and "does not exist" in out
    code, out = run("build", "cap", "--store", store_path, "--sites", "31.attn")
    assert code == 1 and "out of range" in out
    code, out = run("delete", "ghost", "--store", store_path, "--yes")
    assert code == 1 and "unknown user 'ghost'" in out
    assert "ghost" not in users(store_path)
    code, out = run("build", "cap", "--store", store_path, "--sites", "3.ffn")
    assert code == 1 and "unknown site component" in out
