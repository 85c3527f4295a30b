import pytest

from fints.errors import InvalidInputError
from fints.history import MAX_ITEM_CHARS, HistoryItem, parse_history_lines, read_history


def test_given_ids_are_kept_and_blank_lines_skipped():
    items = parse_history_lines(
        ['{"input": "a", "output": "b", "id": "x1"}', "", '{"input": "c", "output": "d"}']
    )
    assert len(items) == 2
    assert (items[0].input, items[0].output, items[0].item_id) == ("a", "b", "x1")


def test_an_item_without_an_id_gets_a_stable_content_id():
    (item,) = parse_history_lines(['{"input": "c", "output": "d"}'])
    assert item.item_id == HistoryItem("c", "d").item_id
    assert item.item_id != HistoryItem("c", "e").item_id


def test_every_bad_line_is_named():
    lines = [
        '{"input": "a", "output": "b"}',
        "{not json",
        '{"input": "a"}',
        '{"input": "", "output": "b"}',
        '["a", "b"]',
        '{"input": 3, "output": "b"}',
    ]
    with pytest.raises(InvalidInputError) as err:
        parse_history_lines(lines, source="h.jsonl")
    text = str(err.value)
    assert "5 bad history line(s)" in text
    for fragment in (
        "h.jsonl:2: not valid JSON",
        "h.jsonl:3: missing field(s) ['output']",
        "h.jsonl:4: history item 'input' is empty",
        "h.jsonl:5: expected a JSON",
        "h.jsonl:6: history item 'input' must be a string",
    ):
        assert fragment in text


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(InvalidInputError, match="empty"):
        read_history(tmp_path / "e.jsonl")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_history(tmp_path / "nope.jsonl")


def test_an_oversized_item_is_refused():
    with pytest.raises(InvalidInputError, match="characters"):
        HistoryItem("x" * (MAX_ITEM_CHARS + 1), "y")


def test_duplicate_ids_are_refused():
    with pytest.raises(InvalidInputError, match="duplicate"):
        parse_history_lines(
            ['{"input":"a","output":"b","id":"1"}', '{"input":"c","output":"d","id":"1"}']
        )


def test_custom_field_names():
    items = parse_history_lines(['{"q": "a", "r": "b"}'], input_field="q", output_field="r")
    assert items[0].input == "a" and items[0].output == "b"
