"""``fints guidance ...``: train, list and inspect preference classifiers for guided
decoding. Heavy modules (torch, transformers) are imported by the commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fints.cli_errors import clear_errors
from fints.errors import InvalidInputError

guidance_app = typer.Typer(
    help="Preference classifiers for classifier-guided decoding (CLIPer).",
    no_args_is_help=True,
)
console = Console()


ClassifiersOpt = Annotated[
    Path | None,
    typer.Option("--classifiers", help="classifier folder (default $FINTS_HOME/classifiers)"),
]
BackboneOpt = Annotated[
    str | None, typer.Option("--model", help="the backbone (default: smollm2, the generator's)")
]
LayersOpt = Annotated[int, typer.Option(help="backbone decoder layers the classifier reads")]
MaxTokensOpt = Annotated[int, typer.Option(help="tokens of each text trained on")]
EpochsOpt = Annotated[int, typer.Option(help="passes of the head over the training tokens")]


@contextmanager
def _progress() -> Iterator[Any]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bars:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks or bars.tasks[tasks[stage]].completed > done:
                label = {
                    "features": "backbone features",
                    "head": "training the head",
                    "decoding": "decoding",
                }.get(stage, stage)
                tasks[stage] = bars.add_task(label, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def _train_and_save(
    name: str,
    train: Any,
    test: Any,
    model: str | None,
    layers: int,
    max_tokens: int,
    epochs: int,
    classifiers: Path | None,
    extra: dict[str, Any],
    calibrated: bool = True,
) -> None:
    from fints.guidance.classifier import Backbone
    from fints.guidance.library import ClassifierLibrary
    from fints.guidance.training import TrainConfig, train_classifier
    from fints.models import load_model

    with console.status(f"loading backbone {model or 'smollm2'}"):
        backbone = Backbone(load_model(model, dtype="float32"), layers, owned=True)
    config = TrainConfig(
        max_tokens=max_tokens, epochs=epochs, balanced=calibrated, calibrate=calibrated
    )
    with _progress() as update:
        clf = train_classifier(name, backbone, train, test, config, update, extra)
    path = ClassifierLibrary(classifiers).save(clf)
    _show(clf.config.to_dict(), path)


def _show(config: dict[str, Any], path: Path) -> None:
    m = config["metrics"]
    table = Table(title=f"classifier {config['name']!r} saved in {path}")
    table.add_column("")
    table.add_column("value")
    table.add_row("classes", ", ".join(config["classes"]))
    table.add_row("backbone", f"{config['backbone']} (first {config['layers']} layers, frozen)")
    table.add_row("train texts / positions", f"{m['train_texts']} / {m['train_positions']}")
    table.add_row("features / head time", f"{m['feature_seconds']} s / {m['head_seconds']} s")
    if "test" in m:
        t = m["test"]
        table.add_row(
            "held-out accuracy",
            f"text {t['text_accuracy']:.1%}, token {t['token_accuracy']:.1%} "
            f"({t['texts']} texts; chance {m['chance']:.1%})",
        )
    if "calibration" in m:  # the temperature guidance divides the class logits by
        c = m["calibration"]
        how = (
            f"held-out class NLL {c['nll_before']:.3f} -> {c['nll_after']:.3f}"
            if "nll_before" in c
            else c.get("skipped", "not fitted")
        )
        table.add_row("temperature", f"{c['temperature']:g} ({how})")
    console.print(table)


@guidance_app.command("train-moods")
@clear_errors
def train_moods(
    name: Annotated[str, typer.Option(help="the preference name")] = "mood",
    per_mood: Annotated[int, typer.Option(help="training responses per mood")] = 200,
    test_per_mood: Annotated[int, typer.Option(help="held-out test responses per mood")] = 40,
    length: Annotated[bool, typer.Option(help="classes concise/long instead of moods")] = False,
    model: BackboneOpt = None,
    layers: LayersOpt = 10,
    max_tokens: MaxTokensOpt = 48,
    epochs: EpochsOpt = 4,
    classifiers: ClassifiersOpt = None,
    calibrated: Annotated[
        bool,
        typer.Option(
            "--calibrated/--uncalibrated",
            help="class-balanced loss and a temperature fitted on the held-out prompts "
            "(--uncalibrated: as the classifiers of BENCHMARKS.md's mood tables were trained)",
        ),
    ] = True,
) -> None:
    """Train a mood (or length) classifier on moodswapper pairs; test on held-out prompts."""
    from fints.guidance.recipes import HELD_OUT_SHARE, length_labels, read_moods, split_texts

    pairs = read_moods()
    labelled, labels = length_labels(pairs) if length else (pairs, [p.mood for p in pairs])
    train, test = split_texts(labelled, labels, per_mood, test_per_mood)
    extra = {"recipe": "length" if length else "moods", "held_out_share": HELD_OUT_SHARE}
    _train_and_save(
        name, train, test, model, layers, max_tokens, epochs, classifiers, {"data": extra},
        calibrated,
    )  # fmt: skip


@guidance_app.command("train-style")
@clear_errors
def train_style(
    user: Annotated[str, typer.Argument(help="the user whose outputs are the style")],
    store: Annotated[Path | None, typer.Option(help="SQLite store")] = None,
    tenant: Annotated[str, typer.Option(help="tenant namespace")] = "default",
    name: Annotated[
        str | None,
        typer.Option(
            help="also save it in the classifier folder as this preference (default: only "
            "in the user's folder, where 'own-style' finds it)"
        ),
    ] = None,
    model: BackboneOpt = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
    layers: LayersOpt = 10,
    max_tokens: MaxTokensOpt = 48,
    epochs: EpochsOpt = 8,
    classifiers: ClassifiersOpt = None,
) -> None:
    """Train USER's style classifier now: USER's history outputs (class 'own') against
    other users' of the tenant ('other'), a fifth of each held out.

    Requests asking for 'own-style' train it themselves when it is missing or older than
    the user's history; this command does it ahead of time (and shows the accuracy)."""
    from fints.guidance.library import ClassifierLibrary, check_classifier_name
    from fints.guidance.user_style import StyleSettings, style_layers, train_user_style
    from fints.models import load_model
    from fints.paths import default_store_path
    from fints.store import Store

    with Store(store or default_store_path()) as db:
        if not db.has_user(tenant, user):
            raise typer.BadParameter(f"unknown user {user!r} in tenant {tenant!r}")
        with console.status(f"loading {model or 'smollm2'}"):
            loaded = load_model(model, dtype=dtype)
        settings = StyleSettings(layers=layers, epochs=epochs, max_tokens=max_tokens)
        library = ClassifierLibrary(classifiers)
        backbone = library.backbone_of(loaded, style_layers(loaded, settings))
        with _progress() as update:
            clf = train_user_style(db, backbone, tenant, user, settings, update)
        folder = db.files_dir(tenant, user)
    if name is not None:
        clf.config = replace(clf.config, name=check_classifier_name(name))
        library.save(clf)
    _show(clf.config.to_dict(), folder)


@guidance_app.command("list")
@clear_errors
def list_classifiers(classifiers: ClassifiersOpt = None, as_json: bool = False) -> None:
    """The classifiers available to requests' preferences."""
    from fints.guidance.library import ClassifierLibrary

    library = ClassifierLibrary(classifiers)
    configs = [library.config(n).to_dict() for n in library.names()]
    if as_json:
        print(json.dumps(configs))
        return
    table = Table("name", "classes", "backbone", "held-out text accuracy")
    for c in configs:
        test = c["metrics"].get("test", {})
        acc = f"{test['text_accuracy']:.1%}" if test else "-"
        table.add_row(c["name"], ", ".join(c["classes"]), f"{c['backbone']}/{c['layers']}", acc)
    console.print(table)


@guidance_app.command("bench")
@clear_errors
def bench(
    out: Annotated[Path, typer.Option(help="folder for results.json and results.md")] = Path(
        "benchmarks/results/guidance-moods"
    ),
    model: Annotated[str | None, typer.Option(help="the generator (default smollm2)")] = None,
    classifiers: ClassifiersOpt = None,
    n_prompts: Annotated[int, typer.Option(help="held-out test prompts")] = 5,
    n_valid_prompts: Annotated[
        int, typer.Option(help="validation prompts (0: none): the setting is chosen on them")
    ] = 5,
    moods: Annotated[str | None, typer.Option(help="comma-separated (default: all)")] = None,
    alphas: Annotated[str, typer.Option(help="guidance weights")] = "0.1,0.3,0.5,1",
    plausible: Annotated[
        str, typer.Option(help="plausibility constraints validated with every alpha")
    ] = "0",
    test_alphas: Annotated[
        str | None, typer.Option(help="rows 'guided a=...' on the test prompts (default alphas)")
    ] = None,
    method: Annotated[str, typer.Option(help="full or topk")] = "full",
    top_k: Annotated[int, typer.Option(help="candidates for topk")] = 20,
    max_tokens: Annotated[int, typer.Option(help="new tokens per answer")] = 40,
    two_dims: Annotated[bool, typer.Option(help="also mood + concise at alpha 0.5")] = True,
    steering_items: Annotated[
        int, typer.Option(help="> 0: steering rows, each mood a user with this many answers")
    ] = 0,
) -> None:
    """Attribute success of guidance on held-out moodswapper prompts (TF-IDF judge)."""
    from fints.benchmark.guidance import GuidanceBenchConfig, run_guidance_bench
    from fints.benchmark.guidance_report import markdown
    from fints.guidance.library import ClassifierLibrary
    from fints.models import load_model

    config = GuidanceBenchConfig(
        alphas=_floats(alphas),
        moods=tuple(moods.split(",")) if moods else None,
        n_prompts=n_prompts,
        n_valid_prompts=n_valid_prompts,
        plausibles=_floats(plausible),
        test_alphas=_floats(test_alphas) if test_alphas is not None else None,
        max_new_tokens=max_tokens,
        method=method,
        top_k=top_k,
        two_dims_alpha=0.5 if two_dims else None,
        steering_items=steering_items,
    )
    with console.status(f"loading model {model or 'smollm2'}"):
        loaded = load_model(model, dtype="float32")
    with _progress() as update:
        result = run_guidance_bench(loaded, ClassifierLibrary(classifiers), config, update)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "config": result.config,
        "table": result.table(),
        "judge": result.judge,
        "classifier": result.classifier,
        "cost": result.cost,
        "seconds": result.seconds,
        "validation": result.validation,
        "answers": [a.__dict__ for a in result.answers],
        "validation_answers": [a.__dict__ for a in result.valid_answers],
    }
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    text = markdown(result)
    (out / "results.md").write_text(text + "\n")
    console.print(text, markup=False)


def _floats(text: str) -> tuple[float, ...]:
    """``"0.5,1"`` -> ``(0.5, 1.0)``; an empty list (``""``) is ``()``."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidInputError(f"expected comma-separated numbers, got {text!r}") from None
