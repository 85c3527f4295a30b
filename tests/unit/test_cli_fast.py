"""The `fints` command line without a model: lazy commands, light imports, flag parsing."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import fints
from fints.cli import app, steering_from_flags
from fints.cli_lazy import LAZY_COMMANDS
from fints.errors import InvalidInputError
from fints.steering import SteeringConfig

runner = CliRunner()

EVERY_COMMAND = {
    "add",
    "build",
    "generate",
    "users",
    "export",
    "import",
    "delete",
    "demo",
    "perf",
    "lora",
    "bench-summary",
    "serve",
    "loadtest",
    "bench",
    "guidance",
}
#: Modules `fints --help` must not import: the server, the benchmark and the ML stack.
HEAVY = ["fints.serving", "fints.benchmark", "sklearn", "torch", "transformers", "fastapi"]


def _fresh_python(code: str) -> dict[str, object]:
    """Run ``code`` in a new interpreter (this one has torch loaded already); it prints JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def _listed_commands(help_text: str) -> set[str]:
    """Command names in the first column of the help's Commands panel."""
    panel = help_text[help_text.index("Commands") :]
    return {m.group(1) for m in re.finditer(r"^│ (\S+)\s", panel, flags=re.MULTILINE)}


def test_help_lists_every_command_without_importing_heavy_modules():
    out = _fresh_python(
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from fints.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'code': r.exit_code, 'help': r.output, 'heavy': heavy}))\n"
    )
    assert out["code"] == 0, out["help"]
    assert out["heavy"] == []
    assert _listed_commands(str(out["help"])) == EVERY_COMMAND


def test_import_fints_is_light_and_every_export_resolves():
    out = _fresh_python(
        "import json, sys\n"
        "import fints\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert out == []
    assert sorted(fints.__all__) == sorted(fints._EXPORTS)
    for name, module in fints._EXPORTS.items():
        assert getattr(fints, name) is getattr(importlib.import_module(module), name), name


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_lazy_command_short_help_is_its_docstring_and_help_loads_it(name):
    spec = LAZY_COMMANDS[name]
    function = getattr(importlib.import_module(spec.module), spec.function)
    assert spec.short_help == function.__doc__.strip().splitlines()[0]
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert f"fints {name}" in result.output or name in result.output
    # the real command's own options are shown, not the stand-in's bare --help
    assert len(re.findall(r"--[a-z][a-z-]+", result.output)) > 3, result.output


def test_a_typo_suggests_lazy_commands_too():
    result = runner.invoke(app, ["serv"])
    assert result.exit_code == 2
    assert "'serve'" in result.output + result.stderr


def test_steering_flags_go_through_from_dict():
    flags = {
        "strengths": {"attn": 0.25, "mlp": 0.75, "block": 0.0},
        "relative": True,
        "top_k": 3,
        "aggregation": "mean",
        "tau": 0.2,
        "icl_k": 1,
    }
    config = steering_from_flags(flags)
    assert config == SteeringConfig.from_dict(flags)
    assert config.to_dict()["strengths"] == {"attn": 0.25, "mlp": 0.75, "block": 0.0}
    assert (config.top_k, config.aggregation, config.relative) == (3, "mean", True)


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("top_k", 0, "--top-k"),
        ("aggregation", "max", "--aggregation"),
        ("tau", -1.0, "--tau"),
        ("icl_k", -2, "--icl-k"),
        ("strengths", {"attn": float("nan")}, "--attn/--mlp/--block"),
    ],
)
def test_a_bad_steering_flag_is_named_with_the_parsers_message(field, value, flag):
    with pytest.raises(InvalidInputError) as shared:
        SteeringConfig.from_dict({field: value})
    with pytest.raises(InvalidInputError) as cli:
        steering_from_flags({field: value})
    assert str(cli.value) == f"{flag}: {shared.value}"
    assert cli.value.param == shared.value.param == field


def test_generate_rejects_a_bad_flag_before_opening_the_store(tmp_path):
    store = tmp_path / "store.sqlite"
    result = runner.invoke(app, ["generate", "alice", "hi", "--store", str(store), "--top-k", "0"])
    assert result.exit_code == 1
    assert "--top-k: top_k must be an integer >= 1, got 0" in result.output + result.stderr
    assert not store.exists()
