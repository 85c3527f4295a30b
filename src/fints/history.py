"""History items (a user's past input and their own output) and reading them from JSON Lines."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fints.errors import InvalidInputError

MAX_ITEM_CHARS = 20_000
#: The most tokens of an item's input, and of its output, that go into any prompt (extraction
#: and in-context examples): one long item costs what a short one does.
ITEM_PROMPT_TOKENS = 256


@dataclass(frozen=True)
class HistoryItem:
    """One past interaction of a user: what they were given and what they wrote."""

    input: str
    output: str
    item_id: str = ""

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidInputError(f"history item {name!r} must be a string, got {value!r}")
            if not value.strip():
                raise InvalidInputError(f"history item {name!r} is empty")
            if len(value) > MAX_ITEM_CHARS:
                raise InvalidInputError(
                    f"history item {name!r} has {len(value)} characters (limit {MAX_ITEM_CHARS})"
                )
            check_text(f"history item {name!r}", value)
        if isinstance(self.item_id, str):
            check_text("history item id", self.item_id)
        if not self.item_id:
            digest = hashlib.sha256(f"{self.input}\x00{self.output}".encode()).hexdigest()
            object.__setattr__(self, "item_id", digest[:16])

    def to_json(self) -> dict[str, str]:
        return {"id": self.item_id, "input": self.input, "output": self.output}


def clip_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (whole, when it has no more)."""
    if len(text.encode("utf-8")) <= max_tokens:  # no tokenizer makes more tokens than bytes
        return text
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) <= max_tokens:
        return text
    clipped = str(tokenizer.decode(ids[:max_tokens])).rstrip("\ufffd")  # no half character
    return clipped if clipped.strip() else text[:max_tokens]


def clip_item(tokenizer: Any, item: HistoryItem, max_tokens: int | None) -> HistoryItem:
    """``item`` with its input and output cut to ``max_tokens`` tokens each (None: as it is);
    the id stays, so entries and citations still name the stored item."""
    if max_tokens is None:
        return item
    texts = (
        clip_text(tokenizer, item.input, max_tokens),
        clip_text(tokenizer, item.output, max_tokens),
    )
    if texts == (item.input, item.output):
        return item
    return HistoryItem(*texts, item.item_id)


def check_text(what: str, text: str) -> None:
    """Refuse text that is not valid Unicode: a lone UTF-16 surrogate (``\\ud800``, which
    JSON can carry) cannot be stored or tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} has a lone UTF-16 surrogate ({text[exc.start : exc.end]!r} at "
            f"character {exc.start}); text must be valid Unicode"
        ) from None


def item_from_record(
    record: Any, *, input_field: str = "input", output_field: str = "output", where: str = "record"
) -> HistoryItem:
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in (input_field, output_field) if f not in record]
    if missing:
        raise InvalidInputError(f"{where}: missing field(s) {missing} (have {sorted(record)})")
    item_id = record.get("id", "")
    try:
        return HistoryItem(record[input_field], record[output_field], str(item_id or ""))
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None


def parse_history_lines(
    lines: Iterable[str],
    *,
    source: str = "<input>",
    input_field: str = "input",
    output_field: str = "output",
) -> list[HistoryItem]:
    """Parse JSON Lines into history items; every bad line is reported, none is skipped."""
    items: list[HistoryItem] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        try:
            items.append(
                item_from_record(
                    record, input_field=input_field, output_field=output_field, where=where
                )
            )
        except InvalidInputError as exc:
            problems.append(str(exc))
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InvalidInputError(f"{len(problems)} bad history line(s):\n  {shown}{more}")
    if not items:
        raise InvalidInputError(f"{source}: no history items (the input is empty)")
    check_unique_ids(items)
    return items


def read_history(path: str | Path, **fields: str) -> list[HistoryItem]:
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"history file {str(path)!r} does not exist")
    return parse_history_lines(utf8_lines(path), source=str(path), **fields)


def utf8_lines(path: Path) -> list[str]:
    """The file's lines; bytes that are not UTF-8 are an error naming the line."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"{path}:{number}: not valid UTF-8 (byte {raw[exc.start]:#04x} at {exc.start})"
            ) from None
    return lines


def check_unique_ids(items: Sequence[HistoryItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            raise InvalidInputError(f"duplicate history item id {item.item_id!r}")
        seen.add(item.item_id)
