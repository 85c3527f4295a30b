"""Benchmark tasks: per-user time-based splits of real data.

A task is a set of users, each with a chronological history (what steering and
in-context retrieval may use), validation queries (the last history items, held
out of the history; hyperparameters are chosen on them) and test queries (the
latest items). Negatives come from a pool of other users' items.

Builders:

* :func:`load_headlines` - news JSONL (``short_description`` -> ``headline``;
  the user is the ``authors`` string, empty means no user).
* :func:`load_abstracts` - arXiv JSONL (``title`` -> ``abstract``; every name in
  the ``authors`` list is a user).
* :func:`fints.benchmark.persona.load_persona` - the ``moodswapper`` package: each
  mood is a user.

All of them accept any file of the same format.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fints.benchmark.labels import Split, TaskName
from fints.errors import InvalidInputError
from fints.history import HistoryItem, check_text, utf8_lines

#: The environment variable naming the folder with the JSONL data (``--data-dir``).
DATA_DIR_ENV = "FINTS_BENCH_DATA"
HEADLINES_FILE = "news_headlines.jsonl"
ABSTRACTS_FILE = "arxiv_abstracts.jsonl"
#: ``Task.extra`` key of the persona task's mood-judge training pairs.
CLASSIFIER_DATA = "classifier_data"


@dataclass(frozen=True)
class Record:
    """One dated (input, output) pair written by one or more users."""

    record_id: str
    users: tuple[str, ...]
    input: str
    output: str
    date: str = ""

    def item(self) -> HistoryItem:
        return HistoryItem(self.input, self.output, self.record_id)


@dataclass(frozen=True)
class Query:
    """One query of one user: the input, and the user's own output as the reference."""

    qid: str  # unique within a task: "<user>::<record id>"
    user: str
    input: str
    reference: str
    split: Split


@dataclass
class UserSplit:
    user: str
    history: list[HistoryItem]  # oldest first; never contains a query's record
    validation: list[Query]
    test: list[Query]


@dataclass(frozen=True)
class SplitConfig:
    """How a time-based split is made.

    A user qualifies with at least ``min_items`` records. The latest ``n_test``
    records are test queries, the ``n_val`` before them validation queries, and
    at most ``max_history`` of the records before those (the most recent) form
    the history.
    """

    min_items: int = 20
    n_test: int = 5
    n_val: int = 2
    max_history: int = 50
    max_users: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_test < 1 or self.n_val < 0 or self.max_history < 1:
            raise InvalidInputError("n_test and max_history must be >= 1, n_val >= 0")
        if self.min_items < self.n_test + self.n_val + 1:
            raise InvalidInputError(
                f"min_items ({self.min_items}) must leave at least one history item after "
                f"{self.n_test} test and {self.n_val} validation queries"
            )


@dataclass
class Task:
    """Users with their splits, a negative pool, and where the data came from."""

    name: str
    template: str  # a key of fints.prompts.TEMPLATES
    users: dict[str, UserSplit]
    pool: list[Record]  # other users' records, never a query of any user
    source: str
    sha256: str
    max_new_tokens: int
    split: SplitConfig
    history_fraction: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. persona classifier data

    def queries(self, split: str = Split.TEST) -> list[Query]:
        if split not in tuple(Split):
            expected = " or ".join(repr(s.value) for s in Split)
            raise InvalidInputError(f"split must be {expected}, got {split!r}")
        return [q for u in self.users.values() for q in getattr(u, split)]

    @property
    def judge_data(self) -> list[tuple[str, str]] | None:
        """(text, mood) pairs to train the persona task's mood judge; None elsewhere."""
        data: list[tuple[str, str]] | None = self.extra.get(CLASSIFIER_DATA)
        return data

    def negatives_for(self, user: str, limit: int = 256) -> list[HistoryItem]:
        """Items written by others (deterministic sample) for negative / wrong contexts."""
        own = {i.item_id for i in self.users[user].history} if user in self.users else set()
        candidates = [r for r in self.pool if user not in r.users and r.record_id not in own]
        rng = random.Random(seed_of(self.split.seed, "negatives", user))
        if len(candidates) > limit:
            candidates = rng.sample(candidates, limit)
        return [r.item() for r in candidates]

    def wrong_user(self, user: str) -> str:
        """Another user for controls: fixed per user, sharing none of this user's records."""
        names = sorted(self.users)
        if len(names) < 2:
            raise InvalidInputError(f"task {self.name!r} needs at least two users for controls")
        own = _record_ids(self.users[user])
        rng = random.Random(seed_of(self.split.seed, "wrong-user", user))
        order = [n for n in names if n != user]
        rng.shuffle(order)
        for other in order:
            if not own & _record_ids(self.users[other]):
                return other
        return order[0]

    def key(self) -> str:
        """Identifies the task's data and split (for caches)."""
        payload = json.dumps(
            [
                self.name,
                self.sha256,
                self.split.__dict__,
                self.history_fraction,
                sorted(self.users),
            ],
            sort_keys=True,
        )
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"

    def with_history_fraction(self, fraction: float) -> Task:
        """The same task, each user keeping only the latest ``fraction`` of their history."""
        if not 0 < fraction <= 1:
            raise InvalidInputError(f"history fraction must be in (0, 1], got {fraction}")
        users = {
            name: replace(
                split, history=split.history[-max(1, math.ceil(fraction * len(split.history))) :]
            )
            for name, split in self.users.items()
        }
        return replace(self, users=users, history_fraction=fraction)

    def with_history_size(self, size: int) -> Task:
        """Each user keeps their latest ``size`` history items (persona sweeps)."""
        if size < 1:
            raise InvalidInputError(f"history size must be >= 1, got {size}")
        users = {n: replace(s, history=s.history[-size:]) for n, s in self.users.items()}
        longest = max(len(s.history) for s in self.users.values())
        return replace(self, users=users, history_fraction=min(1.0, size / longest))

    def limit_test(self, per_user: int) -> Task:
        """Keep each user's first ``per_user`` test queries; histories (and caches) unchanged."""
        if per_user < 1:
            raise InvalidInputError(f"test queries per user must be >= 1, got {per_user}")
        users = {n: replace(s, test=s.test[:per_user]) for n, s in self.users.items()}
        return replace(self, users=users)

    def subset_users(self, names: Iterable[str]) -> Task:
        chosen = {n: self.users[n] for n in names}
        return replace(self, users=chosen)


def _record_ids(split: UserSplit) -> set[str]:
    ids = {i.item_id for i in split.history}
    return ids | {q.qid.split("::", 1)[1] for q in split.validation + split.test}


def seed_of(seed: int, *parts: str) -> int:
    text = ":".join([str(seed), *parts])
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def existing_file(path: str | Path) -> Path:
    """``path``, if it is a file; else an error saying how to name the data."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(
            f"data file {str(path)!r} does not exist (pass --data-dir or the file path)"
        )
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON Lines; every bad line is reported with its number."""
    path = existing_file(path)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, line in enumerate(utf8_lines(path), start=1):  # each line must be UTF-8
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: expected a JSON object")
            continue
        rows.append(row)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InvalidInputError("; ".join(problems[:5]) + more)
    if not rows:
        raise InvalidInputError(f"data file {str(path)!r} has no records")
    return rows


def require_fields(row: dict[str, Any], fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise InvalidInputError(f"{where}: missing field(s) {missing} (have {sorted(row)})")


def checked_texts(where: str, *texts: str) -> None:
    """Refuse a record whose text is not valid Unicode (a lone surrogate from JSON)."""
    for text in texts:
        try:
            check_text("a text", text)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where}: {exc}") from None


def clean_text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def time_split(records: Sequence[Record], config: SplitConfig) -> dict[str, UserSplit]:
    """Per user: sort by (date, id); latest ``n_test`` test, ``n_val`` before them validation."""
    by_user: dict[str, list[Record]] = {}
    for record in records:
        for user in record.users:
            by_user.setdefault(user, []).append(record)
    qualifying = sorted(u for u, rs in by_user.items() if len(rs) >= config.min_items)
    if config.max_users is not None and len(qualifying) > config.max_users:
        rng = random.Random(seed_of(config.seed, "users"))
        qualifying = sorted(rng.sample(qualifying, config.max_users))
    splits: dict[str, UserSplit] = {}
    for user in qualifying:
        ordered = sorted(by_user[user], key=lambda r: (r.date, r.record_id))
        test = ordered[-config.n_test :]
        val = ordered[len(ordered) - config.n_test - config.n_val : len(ordered) - config.n_test]
        history = ordered[: len(ordered) - config.n_test - config.n_val][-config.max_history :]
        splits[user] = UserSplit(
            user=user,
            history=[r.item() for r in history],
            validation=[make_query(user, r, Split.VALIDATION) for r in val],
            test=[make_query(user, r, Split.TEST) for r in test],
        )
    return splits


def make_query(user: str, record: Record, split: Split) -> Query:
    return Query(f"{user}::{record.record_id}", user, record.input, record.output, split)


def build_task(
    name: str,
    template: str,
    records: Sequence[Record],
    config: SplitConfig,
    *,
    source: str,
    sha256: str,
    max_new_tokens: int,
    pool_limit: int = 4000,
) -> Task:
    users = time_split(records, config)
    if len(users) < 2:
        raise InvalidInputError(
            f"{source}: only {len(users)} user(s) have >= {config.min_items} records; "
            f"a benchmark needs at least two (lower --min-items?)"
        )
    query_ids = {q.qid.split("::", 1)[1] for u in users.values() for q in u.validation + u.test}
    pool = [r for r in records if r.record_id not in query_ids]
    if len(pool) > pool_limit:
        pool = random.Random(seed_of(config.seed, "pool")).sample(pool, pool_limit)
    return Task(name, template, users, pool, source, sha256, max_new_tokens, config)


def _dedupe_ids(records: list[Record]) -> list[Record]:
    seen: dict[str, int] = {}
    out = []
    for r in records:
        n = seen.get(r.record_id, 0)
        seen[r.record_id] = n + 1
        out.append(r if n == 0 else replace(r, record_id=f"{r.record_id}#{n}"))
    return out


def headline_records(rows: Sequence[dict[str, Any]], source: str = "<rows>") -> list[Record]:
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{source} record {number}"
        require_fields(row, ("headline", "short_description", "authors"), where)
        author = clean_text(row["authors"])
        article, headline = clean_text(row["short_description"]), clean_text(row["headline"])
        checked_texts(
            where, author, article, headline, clean_text(row.get("link") or row.get("id"))
        )
        if not article or not headline:
            continue  # an article without text or headline cannot be a task item
        rid = (
            clean_text(row.get("link") or row.get("id"))
            or hashlib.sha256(f"{article}\x00{headline}".encode()).hexdigest()[:16]
        )
        users = (author,) if author else ()
        records.append(Record(rid, users, article, headline, clean_text(row.get("date", ""))))
    return _dedupe_ids(records)


def abstract_records(rows: Sequence[dict[str, Any]], source: str = "<rows>") -> list[Record]:
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{source} record {number}"
        require_fields(row, ("title", "abstract", "authors"), where)
        authors = row["authors"]
        if not isinstance(authors, list):
            raise InvalidInputError(f"{where}: 'authors' must be a list of names")
        title, abstract = clean_text(row["title"]), clean_text(row["abstract"])
        checked_texts(where, title, abstract, clean_text(row.get("id")), *map(clean_text, authors))
        if not title or not abstract:
            continue
        rid = clean_text(row.get("id")) or hashlib.sha256(title.encode()).hexdigest()[:16]
        users = tuple(dict.fromkeys(clean_text(a) for a in authors if clean_text(a)))
        records.append(Record(rid, users, title, abstract, clean_text(row.get("date", ""))))
    return _dedupe_ids(records)


def _load(
    path: str | Path,
    name: str,
    template: str,
    parse: Callable[[Sequence[dict[str, Any]], str], list[Record]],
    config: SplitConfig,
    max_new_tokens: int,
) -> Task:
    rows = read_jsonl(path)
    records = parse(rows, str(path))
    return build_task(
        name,
        template,
        records,
        config,
        source=str(path),
        sha256=file_sha256(path),
        max_new_tokens=max_new_tokens,
    )


def load_headlines(
    path: str | Path, config: SplitConfig | None = None, max_new_tokens: int = 24
) -> Task:
    config = config or SplitConfig(min_items=20, n_test=5, n_val=2)
    return _load(path, TaskName.HEADLINES, "headline", headline_records, config, max_new_tokens)


def load_abstracts(
    path: str | Path, config: SplitConfig | None = None, max_new_tokens: int = 128
) -> Task:
    config = config or SplitConfig(min_items=20, n_test=3, n_val=2)
    return _load(path, TaskName.ABSTRACTS, "abstract", abstract_records, config, max_new_tokens)
