"""Property tests (issue 25) of every parser and loader fed by users: history JSON Lines,
benchmark task files, dictionary import and request bodies. Random and adversarial input
gives a clear error (:class:`InvalidInputError`, an :class:`ApiError` or a pydantic
validation error) or a correct result; never another exception, and never a changed
store."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fints.benchmark.tasks import abstract_records, headline_records, read_jsonl
from fints.dictionary import DictionaryMeta, UserDictionary
from fints.errors import DictionaryMismatchError, FintsError, InvalidInputError
from fints.history import HistoryItem, parse_history_lines, read_history
from fints.serving.api_errors import ApiError
from fints.serving.api_spec import AddInteractionsRequest, ChatCompletionRequest, FintsOptions
from fints.serving.payloads import (
    Limits,
    check_common,
    check_user,
    generation_options,
    history_items,
    steering_config,
    stop_sequences,
)
from fints.sites import parse_sites
from fints.steering import SteeringConfig
from fints.store import Store

PROPERTY = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# text with what breaks naive parsers: control characters, lone surrogates, long runs
TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xDFFF), max_size=30),
    st.sampled_from(["", " ", "\x00", "\ud800", "a" * 20_001, "\n", "null", "{}"]),
)
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False),
        TEXT,
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=8,
)


def record(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with (some of) the expected fields, each of a random JSON value, or text."""
    return st.dictionaries(st.sampled_from([*fields, "extra"]), st.one_of(TEXT, JSON), max_size=5)


def dump(store: Store) -> list[tuple[Any, ...]]:
    """Everything a store holds, to compare before and after a refused write."""
    db = store._db
    return [
        row
        for table in ("users", "items", "dictionaries", "entries")
        for row in db.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3")
    ]


# -- history JSON Lines -----------------------------------------------------------------------

LINE = st.one_of(
    TEXT,
    record(["input", "output", "id"]).map(lambda r: json.dumps(r)),
    JSON.map(json.dumps),
)


@PROPERTY
@given(lines=st.lists(LINE, max_size=6))
def test_history_lines_parse_or_name_the_problem(lines: list[str]) -> None:
    try:
        items = parse_history_lines(lines)
    except InvalidInputError:
        return
    records = [json.loads(line) for line in lines if line.strip()]
    assert [(i.input, i.output) for i in items] == [(r["input"], r["output"]) for r in records]


@PROPERTY
@given(data=st.binary(max_size=200))
def test_history_files_of_any_bytes_parse_or_name_the_problem(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.jsonl"
        path.write_bytes(data)
        try:
            items = read_history(path)
        except InvalidInputError:
            return
        assert all(isinstance(i, HistoryItem) for i in items) and items


@PROPERTY
@given(batch=st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=4))
def test_a_refused_history_write_changes_nothing(batch: list[tuple[str, str, str]]) -> None:
    with Store(":memory:") as store:  # the same SQL as a file, without the fsyncs
        store.add_items("t", "u", [HistoryItem("kept", "as it was", "k")])
        before = dump(store)
        try:
            items = [HistoryItem(i, o, d) for i, o, d in batch]
            store.add_items("t", "u", items, max_items=4)
        except InvalidInputError:
            assert dump(store) == before
            return
        stored = {i.item_id: (i.input, i.output) for i in store.items("t", "u")}
        assert all(stored[i.item_id] == (i.input, i.output) for i in items)


# -- benchmark task files ---------------------------------------------------------------------


@PROPERTY
@given(data=st.binary(max_size=200))
def test_task_files_of_any_bytes_read_or_name_the_problem(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.jsonl"
        path.write_bytes(data)
        try:
            rows = read_jsonl(path)
        except InvalidInputError:
            return
        assert rows and all(isinstance(r, dict) for r in rows)


@PROPERTY
@given(
    headlines=st.lists(record(["headline", "short_description", "authors", "link"]), max_size=4),
    abstracts=st.lists(record(["title", "abstract", "authors", "id"]), max_size=4),
)
def test_task_records_parse_or_name_the_problem(
    headlines: list[dict[str, Any]], abstracts: list[dict[str, Any]]
) -> None:
    for parse, rows in ((headline_records, headlines), (abstract_records, abstracts)):
        try:
            records = parse(rows)
        except InvalidInputError:
            continue
        assert all(r.input and r.output for r in records)
        assert len({r.record_id for r in records}) == len(records)


# -- dictionary import ------------------------------------------------------------------------

HIDDEN, KEY_DIM = 4, 3
SITES = parse_sites("1.attn")


def valid_payload() -> dict[str, Any]:
    meta = DictionaryMeta("fp", "m", SITES, HIDDEN, "enc", KEY_DIM, "generic", "float32")
    return {
        "format_version": 1,
        "user": "imported",
        "meta": meta.to_json(),
        "item_ids": ["a"],
        "items": [{"id": "a", "input": "in", "output": "out"}],
    }


def mutate(payload: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """``payload`` with the field at ``path`` set to ``value`` (or removed for ``...``)."""
    copy = json.loads(json.dumps(payload))
    node = copy
    for key in path[:-1]:
        node = node[key] if isinstance(node, dict) else node[int(key)]
    if value is Ellipsis:
        node.pop(path[-1], None)
    elif isinstance(node, dict):
        node[path[-1]] = value
    return copy


PAYLOAD_FIELDS = [
    ["format_version"],
    ["user"],
    ["meta"],
    ["item_ids"],
    ["items"],
    *(["meta", k] for k in valid_payload()["meta"]),
]


@PROPERTY
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(PAYLOAD_FIELDS), st.one_of(JSON, st.just(Ellipsis))),
        min_size=1,
        max_size=3,
    ),
    rows=st.integers(min_value=0, max_value=2),
)
def test_a_dictionary_import_loads_or_names_the_problem_and_changes_nothing(
    changes: list[tuple[list[str], Any]], rows: int
) -> None:
    payload = valid_payload()
    for path, value in changes:
        payload = mutate(payload, path, value)
    tensors = {"keys": torch.ones(rows, KEY_DIM), "vectors": torch.ones(rows, len(SITES), HIDDEN)}
    with Store(":memory:") as store:  # the same SQL as a file, without the fsyncs
        store.add_items("t", "other", [HistoryItem("x", "y")])
        before = dump(store)
        try:
            dictionary = UserDictionary._from_payload(payload, tensors, "d.json", "v.st")
            store.import_dictionary("t", dictionary)
        except (InvalidInputError, DictionaryMismatchError):
            assert dump(store) == before
            return
        assert dictionary.user in store.users("t")


# -- request bodies ---------------------------------------------------------------------------

CHAT_FIELDS = list(ChatCompletionRequest.model_fields)
MESSAGE = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]), "content": JSON}
    ),
)
FINTS = st.dictionaries(st.sampled_from([*FintsOptions.model_fields, "bogus"]), JSON, max_size=4)
BODY = st.fixed_dictionaries(
    {"model": st.one_of(TEXT, JSON), "messages": st.lists(MESSAGE, max_size=3)},
    optional={
        **{f: JSON for f in CHAT_FIELDS if f not in ("model", "messages", "fints")},
        "fints": st.one_of(FINTS, JSON),
        "unknown_field": JSON,
    },
)


@PROPERTY
@given(body=BODY)
def test_a_chat_body_validates_and_converts_or_is_a_400(body: dict[str, Any]) -> None:
    """What the handler does before the model: schema, then every payload check."""
    try:
        request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    except ValidationError:
        return
    except ValueError:  # json.dumps of a lone surrogate is fine; anything else is not
        pytest.fail("a body raised ValueError outside validation")
    try:
        check_common(request)
        generation_options(request, Limits())
        stop_sequences(request.stop)
        steering_config(SteeringConfig(), request.fints, num_layers=4)
        if request.user is not None:
            check_user(request.user)
    except ApiError as exc:
        assert exc.status == 400 and exc.message


@PROPERTY
@given(items=st.lists(record(["input", "output", "id"]), max_size=3))
def test_an_interactions_body_validates_or_is_a_400(items: list[dict[str, Any]]) -> None:
    try:
        request = AddInteractionsRequest.model_validate_json(json.dumps({"items": items}))
    except ValidationError:
        return
    try:
        converted = history_items(request.items, Limits())
    except ApiError as exc:
        assert exc.status == 400
        return
    assert [(i.input, i.output) for i in converted] == [(r["input"], r["output"]) for r in items]


def test_the_errors_are_fints_errors() -> None:
    """The properties above accept only these as a 'clear error'."""
    assert issubclass(InvalidInputError, FintsError)
    assert issubclass(DictionaryMismatchError, FintsError)
