"""Task builders on small fixtures written for the project (tests/fixtures/bench)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fints.benchmark.labels import Split, TaskName
from fints.benchmark.persona import PersonaConfig, load_persona
from fints.benchmark.tasks import SplitConfig, load_abstracts, load_headlines, read_jsonl
from fints.errors import InvalidInputError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "bench"


@pytest.fixture()
def headlines():
    return load_headlines(FIXTURES / "news.jsonl", SplitConfig(min_items=10, n_test=2, n_val=1))


def test_tasks_are_named_by_their_task(headlines):
    assert headlines.name == TaskName.HEADLINES


def test_headlines_time_split_is_per_user_and_chronological(headlines):
    # Dee Occasional (2 items) and anonymous rows never qualify.
    assert sorted(headlines.users) == ["Ada Quill", "Bo Reyes", "Cy Tran"]
    ada = headlines.users["Ada Quill"]
    # Two records on 2021-03-12: the tie is broken by id, so "...ada-zz" is the very last.
    assert [q.qid for q in ada.test] == [
        "Ada Quill::https://example.test/ada-11",
        "Ada Quill::https://example.test/ada-zz",
    ]
    assert [q.qid.split("::")[1] for q in ada.validation] == ["https://example.test/ada-10"]
    assert len(ada.history) == 10  # 13 records - 2 test - 1 validation
    assert ada.history[0].item_id.endswith("ada-00")  # oldest first
    assert all(q.reference.startswith("WATCH:") for q in ada.test)


def test_queries_never_leak_into_history_or_pool(headlines):
    queries = headlines.queries(Split.TEST) + headlines.queries(Split.VALIDATION)
    query_ids = {q.qid.split("::")[1] for q in queries}
    for split in headlines.users.values():
        assert not query_ids & {i.item_id for i in split.history}
    assert not query_ids & {r.record_id for r in headlines.pool}
    assert len(headlines.queries(Split.TEST)) == 6
    assert len(headlines.queries(Split.VALIDATION)) == 3


def test_negatives_come_from_other_users(headlines):
    negatives = headlines.negatives_for("Bo Reyes")
    assert negatives
    assert not any("explained" in n.output for n in negatives)  # Bo's own style
    assert headlines.wrong_user("Bo Reyes") != "Bo Reyes"
    assert headlines.wrong_user("Bo Reyes") == headlines.wrong_user("Bo Reyes")  # fixed


def test_history_fraction_keeps_the_latest_items(headlines):
    small = headlines.with_history_fraction(0.25)
    history = small.users["Ada Quill"].history
    assert len(history) == 3
    assert history[-1] == headlines.users["Ada Quill"].history[-1]
    assert small.key() != headlines.key()
    with pytest.raises(InvalidInputError):
        headlines.with_history_fraction(0)


def test_min_items_and_max_users_are_configurable():
    task = load_headlines(
        FIXTURES / "news.jsonl", SplitConfig(min_items=10, n_test=2, n_val=1, max_users=2)
    )
    assert len(task.users) == 2
    with pytest.raises(InvalidInputError, match="at least two"):
        load_headlines(FIXTURES / "news.jsonl", SplitConfig(min_items=50, n_test=2, n_val=1))


def test_abstracts_every_author_is_a_user_and_wrong_user_shares_nothing():
    task = load_abstracts(FIXTURES / "arxiv.jsonl", SplitConfig(min_items=8, n_test=2, n_val=1))
    assert sorted(task.users) == ["Ana Li", "Ben Okafor"]
    ana, ben = task.users["Ana Li"], task.users["Ben Okafor"]
    assert [q.qid.split("::")[1] for q in ana.test] == ["2501.00010", "2501.00012"]
    assert [q.qid.split("::")[1] for q in ben.test] == ["2501.00011", "2501.00013"]
    # Shared papers (0-3) are in both histories; queries are in nobody's history.
    assert "2501.00000" in {i.item_id for i in ana.history} & {i.item_id for i in ben.history}
    assert task.queries("test")[0].input.startswith("Paper")


@pytest.fixture()
def persona():
    return load_persona(
        FIXTURES / "moods", PersonaConfig(n_test=3, n_val=1, n_classifier=4, max_history=10)
    )


def test_persona_moods_are_users_with_disjoint_splits(persona):
    assert sorted(persona.users) == ["gloomy", "sleepy", "sunny"]
    sunny = persona.users["sunny"]
    assert len(sunny.history) == 12 - 3 - 1 - 4  # the refusal row is dropped
    assert not {q.input for q in sunny.test} & {i.input for i in sunny.history}


def test_persona_moods_share_their_test_prompts(persona):
    # shared prompts are taken first
    assert {q.input for q in persona.users["sunny"].test} == {
        q.input for q in persona.users["gloomy"].test
    }


def test_the_mood_judge_trains_on_pairs_no_query_or_history_uses(persona):
    data = persona.judge_data
    assert data is not None
    assert len(data) == 12 and {m for _, m in data} == {"sunny", "gloomy", "sleepy"}
    judge_texts = {t for t, _ in data}
    assert not judge_texts & {q.reference for q in persona.queries(Split.TEST)}
    assert not judge_texts & {i.output for u in persona.users.values() for i in u.history}


def test_only_persona_has_judge_data(headlines):
    assert headlines.judge_data is None


def test_persona_history_size_keeps_the_latest_items(persona):
    assert len(persona.with_history_size(2).users["sunny"].history) == 2


def test_a_missing_file_says_how_to_name_the_data(tmp_path):
    with pytest.raises(InvalidInputError, match=r"does not exist \(pass --data-dir"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_a_bad_line_is_reported_with_its_number(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"headline": "x"}\nnot json\n')
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad)


def test_a_missing_field_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"headline": "x", "authors": "A"}) + "\n")
    with pytest.raises(InvalidInputError, match="short_description"):
        load_headlines(bad)


def test_abstract_authors_must_be_a_list(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "t", "abstract": "a", "authors": "A"}) + "\n")
    with pytest.raises(InvalidInputError, match="list of names"):
        load_abstracts(bad)


def test_a_split_must_leave_some_history():
    with pytest.raises(InvalidInputError, match="min_items"):
        SplitConfig(min_items=3, n_test=2, n_val=1)


def test_an_unknown_split_is_refused(headlines):
    with pytest.raises(InvalidInputError, match="split must be 'validation' or 'test'"):
        headlines.queries("train")
