"""`fints demo` on the real default model: every user shown, personalization visible."""

from rich.console import Console

from fints.demo import DEMO_USERS, STEERED, run_demo


def test_demo_steering_alone_puts_each_user_in_their_style(smollm):
    console = Console(record=True, width=200)
    rows = run_demo(max_new_tokens=16, console=console)  # trains the 4 users' vectors (~75 s)
    text = console.export_text()
    assert {r["user"] for r in rows} == set(DEMO_USERS)
    assert all(r["history"] == "10" for r in rows)
    assert f"trained {len(DEMO_USERS)} users' steering vectors" in text
    judged = text.split("whose style is it?")[1].splitlines()
    for column in ("unsteered", STEERED, "fints + own examples"):
        assert column in text
        # the judge's row for every column: answers attributed, users right, per user
        assert any(line.strip().startswith(f"{column} ") and "/4" in line for line in judged)
    for query in {r["query"] for r in rows}:
        these = [r for r in rows if r["query"] == query]
        # the unsteered answer is the same for every user; the personalized ones are not
        assert len({r["unsteered"] for r in these}) == 1
        assert len({r[STEERED] for r in these}) == len(DEMO_USERS)
        assert len({r["fints + own examples"] for r in these}) == len(DEMO_USERS)
        # one unsteered text, one verdict: right for exactly one user (chance)
        assert sum(r["judged unsteered"] == r["user"] for r in these) == 1

    def users_right(column: str) -> int:
        return sum(
            2 * sum(r[f"judged {column}"] == u for r in rows if r["user"] == u)
            > sum(r["user"] == u for r in rows)
            for u in DEMO_USERS
        )

    # steering alone, no examples in the prompt: the judge names the right user for most
    # of the answers of at least 3 of the 4 users
    assert users_right(STEERED) >= 3
