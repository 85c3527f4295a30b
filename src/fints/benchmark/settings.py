"""Every setting of one benchmark run, typed, checked once, and kept as JSON with the results.

``fints bench`` parses its options into a :class:`BenchSettings`; the pipeline
(:mod:`fints.benchmark.pipeline`) runs from it alone. ``None`` means "the preset's value".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from fints.benchmark.labels import COMPONENTS, TASKS, TaskName
from fints.benchmark.presets import DEFAULT_PRESET, PRESETS, Preset, TaskSizes
from fints.benchmark.tasks import ABSTRACTS_FILE, DATA_DIR_ENV, HEADLINES_FILE, existing_file
from fints.errors import InvalidInputError
from fints.extraction import method_names
from fints.paths import fints_home

T = TypeVar("T")


def pick(given: T | None, default: T) -> T:
    """An option's value where it was given, else the preset's."""
    return default if given is None else given


#: Each task's data file in ``--data-dir``, and the option that names the file itself.
DATA_FILES: dict[str, tuple[str, str]] = {
    TaskName.HEADLINES: (HEADLINES_FILE, "headlines_file"),
    TaskName.ABSTRACTS: (ABSTRACTS_FILE, "abstracts_file"),
}


def flag(name: str) -> str:
    """The command-line option of a settings field: ``search_rounds`` -> ``--search-rounds``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run: what to run on, the search, the analyses and the machine side."""

    preset: str = DEFAULT_PRESET  # a key of PRESETS
    tasks: tuple[str, ...] = TASKS
    model: str | None = None  # HF id, folder or .gguf (None: the embedded SmolLM2)
    data_dir: Path | None = None  # the folder with the JSONL data (headlines, abstracts)
    headlines_file: Path | None = None  # instead of data_dir / HEADLINES_FILE
    abstracts_file: Path | None = None  # instead of data_dir / ABSTRACTS_FILE
    persona_dir: Path | None = None  # mood JSONL files (None: the moodswapper package)
    out: Path | None = None  # results folder (None: benchmarks/results/<run name>)
    cache: Path | None = None  # generation and activation cache (None: $FINTS_HOME/bench)
    layers: tuple[int, ...] | None = None  # layers to search (None or empty: 1/3 and 1/2)
    # How much of each task (None: the preset's).
    max_users: int | None = None
    n_test: int | None = None
    n_val: int | None = None
    max_history: int | None = None
    max_new_tokens: int | None = None
    min_items: int | None = None  # records a user needs (None: 20)
    queries_per_user: int | None = None  # score only the first N test queries (None/0: all)
    # The validation search (None, or empty strengths / taus: the preset's).
    strengths: tuple[float, ...] | None = None
    components: tuple[str, ...] | None = None
    contrasts: tuple[str, ...] | None = None
    default_methods: tuple[str, ...] | None = None  # methods run at their defaults (empty: none)
    top_ks: tuple[int, ...] | None = None  # beside the task's default K (0: every entry)
    taus: tuple[float, ...] | None = None
    search_rounds: int = 1
    search_margin: float = 0.0  # standard errors a stage's winner needs (0: any gain)
    # What runs on test and beside it (None: the preset's).
    rows: tuple[str, ...] | None = None  # exactly these test rows
    sparsity_fractions: tuple[float, ...] | None = None
    persona_sizes: tuple[int, ...] | None = None
    n_clusters: int | None = None
    batch_size: int = 16
    timing_repeats: int = 2  # interleaved latency runs per method (0: none)
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise InvalidInputError(f"unknown preset {self.preset!r}: expected {sorted(PRESETS)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise InvalidInputError(
                f"unknown task(s) {unknown}: expected some of {tuple(t.value for t in TASKS)}"
            )
        if self.search_rounds < 1:
            raise InvalidInputError(f"--search-rounds must be at least 1, got {self.search_rounds}")
        if not self.search_margin >= 0:
            raise InvalidInputError(f"--search-margin must be >= 0, got {self.search_margin}")
        if self.taus is not None and not all(t > 0 for t in self.taus):
            raise InvalidInputError(f"--taus must be positive numbers, got {self.taus}")
        if self.top_ks is not None and not all(k >= 0 for k in self.top_ks):
            raise InvalidInputError(f"--top-ks takes positive integers or 'all', got {self.top_ks}")
        _check_choices("components", self.components, COMPONENTS)
        _check_choices("contrasts", self.contrasts, method_names())
        if self.default_methods:
            _check_choices("default_methods", self.default_methods, method_names())
        for name in ("batch_size", "timing_repeats", "n_clusters", "queries_per_user"):
            value, least = getattr(self, name), 1 if name == "batch_size" else 0
            if value is not None and value < least:
                raise InvalidInputError(f"{flag(name)} must be at least {least}, got {value}")

    # -- what the settings resolve to -------------------------------------------------

    def search_preset(self) -> Preset:
        """The preset with every search and analysis option of these settings applied."""
        preset = PRESETS[self.preset]
        return replace(
            preset,
            strengths=self.strengths or preset.strengths,
            top_ks=pick(self.top_ks, preset.top_ks),
            taus=self.taus or preset.taus,
            components=pick(self.components, preset.components),
            contrasts=pick(self.contrasts, preset.contrasts),
            default_methods=pick(self.default_methods, preset.default_methods),
            sparsity=pick(self.sparsity_fractions, preset.sparsity),
            persona_sizes=pick(self.persona_sizes, preset.persona_sizes),
            clusters=pick(self.n_clusters, preset.clusters),
        )

    def task_sizes(self, task: str) -> TaskSizes:
        """The preset's sizes for ``task`` with these settings' overrides."""
        sizes = PRESETS[self.preset].sizes[TaskName(task)]
        given = {
            f: getattr(self, f)
            for f in ("max_users", "n_test", "n_val", "max_history", "max_new_tokens")
            if getattr(self, f) is not None
        }
        return replace(sizes, **given)

    def data_file(self, task: str) -> Path:
        """Where ``task``'s JSONL file is: its own option, else in the data folder."""
        file_name, option = DATA_FILES[task]
        explicit: Path | None = getattr(self, option)
        if explicit is not None:
            return explicit
        if self.data_dir is None:
            raise InvalidInputError(
                f"the {task} task needs its data: pass --data-dir (the folder with "
                f"{file_name}) or {flag(option)}, or set {DATA_DIR_ENV}"
            )
        return self.data_dir / file_name

    def check_data(self) -> None:
        """Fail now, before a model loads, if a task's data file is not named or not there."""
        for task in self.tasks:
            if task in DATA_FILES:
                existing_file(self.data_file(task))

    @property
    def cache_dir(self) -> Path:
        return self.cache if self.cache is not None else fints_home() / "bench"

    def out_dir(self, model_name: str) -> Path:
        run = f"{self.preset}-{Path(model_name).stem}-seed{self.seed}"
        return self.out if self.out is not None else Path("benchmarks/results") / run

    # -- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists, every field present."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchSettings:
        """The inverse of :meth:`to_dict`; missing fields take their defaults."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidInputError(f"unknown benchmark setting(s) {unknown}")
        values = {}
        for name, value in data.items():
            convert = _CONVERTERS[str(known[name].type)]
            try:
                values[name] = convert(value)
            except (TypeError, ValueError):
                raise InvalidInputError(
                    f"benchmark setting {name!r}: expected {known[name].type}, got {value!r}"
                ) from None
        return cls(**values)


def _check_choices(name: str, values: tuple[str, ...] | None, allowed: tuple[str, ...]) -> None:
    if values is not None and (not values or any(v not in allowed for v in values)):
        raise InvalidInputError(
            f"{flag(name)} takes some of {', '.join(allowed)}; got {','.join(values)!r}"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path | str):
        return str(value)  # a string enum's value
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _exact(kind: type) -> Callable[[Any], Any]:
    """A JSON value of ``kind`` as is (an int is a float too; a bool is neither)."""

    def convert(value: Any) -> Any:
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or isinstance(value, bool):
            raise TypeError(value)
        return kind(value)

    return convert


def _tuple_of(kind: type) -> Callable[[Any], tuple[Any, ...]]:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise TypeError(value)
        return tuple(_exact(kind)(v) for v in value)

    return convert


def _path(value: Any) -> Path:
    return Path(_exact(str)(value))


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


# Field annotations (strings: postponed evaluation) to JSON converters.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "str": _exact(str),
    "int": _exact(int),
    "float": _exact(float),
    "str | None": _optional(_exact(str)),
    "int | None": _optional(_exact(int)),
    "Path | None": _optional(_path),
    "tuple[str, ...]": _tuple_of(str),
    "tuple[str, ...] | None": _optional(_tuple_of(str)),
    "tuple[int, ...] | None": _optional(_tuple_of(int)),
    "tuple[float, ...] | None": _optional(_tuple_of(float)),
}
assert all(str(f.type) in _CONVERTERS for f in fields(BenchSettings)), "a field without converter"
