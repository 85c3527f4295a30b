"""`fints demo` on the real default model: every user shown, personalization visible."""

from rich.console import Console

from fints.demo import DEMO_USERS, run_demo


def test_demo_shows_each_user_unsteered_and_personalized(smollm):
    console = Console(record=True, width=160)
    rows = run_demo(max_new_tokens=16, console=console)
    text = console.export_text()
    assert {r["user"] for r in rows} == set(DEMO_USERS)
    assert all(r["history"] == "10" for r in rows)
    for column in ("unsteered", "fints (steering)", "fints + own examples"):
        assert column in text
    # the unsteered answer is the same for every user; the personalized ones are not
    for query in {r["query"] for r in rows}:
        these = [r for r in rows if r["query"] == query]
        assert len({r["unsteered"] for r in these}) == 1
        assert len({r["fints + own examples"] for r in these}) == len(DEMO_USERS)
        assert sum(r["fints (steering)"] != r["unsteered"] for r in these) >= 2
