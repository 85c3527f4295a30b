import pytest

from fints.errors import InvalidInputError
from fints.history import MAX_ITEM_CHARS, HistoryItem, parse_history_lines, read_history


def test_parse_good_lines_with_ids_and_blank_lines():
    items = parse_history_lines(
        ['{"input": "a", "output": "b", "id": "x1"}', "", '{"input": "c", "output": "d"}']
    )
    assert items[0].item_id == "x1" and len(items) == 2
    assert items[1].item_id == HistoryItem("c", "d").item_id  # stable content id


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


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(InvalidInputError, match="empty"):
        read_history(tmp_path / "e.jsonl")
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_history(tmp_path / "nope.jsonl")


def test_oversized_and_duplicate_items():
    with pytest.raises(InvalidInputError, match="characters"):
        HistoryItem("x" * (MAX_ITEM_CHARS + 1), "y")
    with pytest.raises(InvalidInputError, match="duplicate"):
        parse_history_lines(
            ['{"input":"a","output":"b","id":"1"}', '{"input":"c","output":"d","id":"1"}']
        )


def test_custom_field_names():
    items = parse_history_lines(['{"q": "a", "r": "b"}'], input_field="q", output_field="r")
    assert items[0].input == "a" and items[0].output == "b"
