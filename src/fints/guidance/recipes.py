"""Labelled text for training classifiers from real data.

``moods``: the ``moodswapper`` package's prompt/response pairs, the mood as the class.
A prompt is held out (never trained on, in every mood) when its sha256 falls in
:data:`HELD_OUT_SHARE`; the held-out prompts serve the classifier's test and the
benchmark. ``length``: the same responses, the shortest third "concise" and the longest
third "long". ``style``: a user's own history outputs against other users' outputs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fints.errors import InvalidInputError
from fints.guidance.training import LabelledTexts

#: The share of moodswapper prompts held out from classifier training (by prompt hash).
HELD_OUT_SHARE = 0.25


@dataclass(frozen=True)
class MoodPair:
    prompt: str
    response: str
    mood: str


def moodswapper_data() -> Path:
    spec = importlib.util.find_spec("moodswapper")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError("the moods recipe needs the 'moodswapper' package")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_moods(folder: str | Path | None = None) -> list[MoodPair]:
    """Every mood pair (refusals, which are the same in every mood, left out)."""
    folder = Path(folder) if folder is not None else moodswapper_data()
    pairs = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            prompt, response = str(row.get("prompt", "")).strip(), str(row.get("response", ""))
            if row.get("kind", "mood") == "mood" and prompt and response.strip():
                pairs.append(MoodPair(prompt, response.strip(), path.stem))
    if len({p.mood for p in pairs}) < 2:
        raise InvalidInputError(f"{folder}: fewer than two moods")
    return pairs


def held_out(prompt: str) -> bool:
    """Whether a prompt is kept out of classifier training (deterministic, by its hash)."""
    value = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return value < HELD_OUT_SHARE


def _sample(pairs: Sequence[MoodPair], per_class: int | None, seed: int, label: str) -> list:
    rng = random.Random(f"{seed}-{label}")
    chosen = list(pairs)
    rng.shuffle(chosen)
    return chosen if per_class is None else chosen[:per_class]


def _by_class(pairs: Sequence[MoodPair], labels: Sequence[str]) -> dict[str, list[MoodPair]]:
    out: dict[str, list[MoodPair]] = {}
    for pair, label in zip(pairs, labels, strict=True):
        out.setdefault(label, []).append(pair)
    return out


def split_texts(
    pairs: Sequence[MoodPair],
    labels: Sequence[str],
    per_class: int | None,
    test_per_class: int | None,
    seed: int = 0,
) -> tuple[LabelledTexts, LabelledTexts]:
    """Training texts from prompts not held out, test texts from held-out prompts, at
    most ``per_class`` (``test_per_class``) of each class."""
    train: list[tuple[str, str]] = []
    test: list[tuple[str, str]] = []
    for label, group in sorted(_by_class(pairs, labels).items()):
        fit = [p for p in group if not held_out(p.prompt)]
        hold = [p for p in group if held_out(p.prompt)]
        train += [(p.response, label) for p in _sample(fit, per_class, seed, label)]
        test += [(p.response, label) for p in _sample(hold, test_per_class, seed, label)]
    if not train or not test:
        raise InvalidInputError("too few pairs for a training and a test set")
    return (
        LabelledTexts(tuple(t for t, _ in train), tuple(c for _, c in train)),
        LabelledTexts(tuple(t for t, _ in test), tuple(c for _, c in test)),
    )


def length_labels(pairs: Sequence[MoodPair]) -> tuple[list[MoodPair], list[str]]:
    """The shortest third of responses (in words) "concise", the longest third "long"."""
    words = sorted(len(p.response.split()) for p in pairs)
    low, high = words[len(words) // 3], words[2 * len(words) // 3]
    kept = [p for p in pairs if len(p.response.split()) <= low or len(p.response.split()) > high]
    return kept, ["concise" if len(p.response.split()) <= low else "long" for p in kept]


def style_texts(
    own: Sequence[str], others: Sequence[str], user: str, seed: int = 0, test_share: float = 0.2
) -> tuple[LabelledTexts, LabelledTexts]:
    """A user's outputs (class ``user``) against other users' (class ``other``), a share
    of each held out for testing."""
    if len(own) < 2 or len(others) < 2:
        raise InvalidInputError(f"{user}: a style classifier needs >= 2 own and other outputs")
    train: list[tuple[str, str]] = []
    test: list[tuple[str, str]] = []
    for label, texts in ((user, list(own)), ("other", list(others))):
        random.Random(f"{seed}-{label}").shuffle(texts)
        cut = max(1, round(len(texts) * test_share))
        test += [(t, label) for t in texts[:cut]]
        train += [(t, label) for t in texts[cut:]]
    return (
        LabelledTexts(tuple(t for t, _ in train), tuple(c for _, c in train)),
        LabelledTexts(tuple(t for t, _ in test), tuple(c for _, c in test)),
    )
