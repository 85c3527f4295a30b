"""Trained vectors in ``fints bench`` (issue 21): extracted by the product's extractor at
the method's own default sites, the tenant's shared vector trained once for every user,
and the rows a new user's default gets, with their controls; on a tiny random llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fints.benchmark.banks import BenchContext, benchmark_sites
from fints.benchmark.labels import PRE_REGISTERED, Label, Role
from fints.benchmark.methods import make_method
from fints.benchmark.pipeline import benchmark_task
from fints.benchmark.presets import PRESETS
from fints.benchmark.rows import default_method_rows, rows_for_test, steers
from fints.benchmark.search import SearchSpace, Selection, default_fints
from fints.benchmark.settings import BenchSettings
from fints.models import LoadedModel
from fints.sites import parse_sites
from tests.unit.benchmark_fixtures import HashEncoder, fixture_task, tiny_llama
from tests.unit.test_default_method import shared_trainings

TRAINED = Label.method_defaults("trained")
CONTROLS = [
    Label.method_wrong_user("trained"),
    Label.method_others("trained"),
    Label.method_random("trained"),
]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_llama()


def test_trained_banks_use_the_methods_sites_and_one_shared_vector_for_all_users(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = fixture_task(max_history=3, max_new_tokens=2)
    sites = benchmark_sites(tiny.num_layers, (1,))
    ctx = BenchContext(tiny, HashEncoder(), task, sites, tmp_path, progress=False)
    shared = shared_trainings(monkeypatch)
    banks = {user: ctx.bank(user, "trained") for user in task.users}
    histories = {i.item_id for u in task.users.values() for i in u.history}
    assert shared == [len(histories)]  # once, on every user's history (the tenant's)
    for user, bank in banks.items():
        assert bank.sites == parse_sites("2.block")  # the method's own, not the benchmark's
        assert bank.meta.method == "trained"
        assert bank.item_ids == [i.item_id for i in task.users[user].history]
        vectors = bank.dictionary(bank.sites).vectors
        torch.testing.assert_close(vectors, vectors[:1].expand_as(vectors))  # the user vector
    first, second = list(banks.values())[:2]
    assert not torch.allclose(first.positive, second.positive)
    # a contrast still extracts at every benchmark site
    assert ctx.bank(next(iter(task.users)), "context").sites == sites
    # a second context reads every bank from disk: nothing is trained again
    again = BenchContext(tiny, HashEncoder(), task, sites, tmp_path, progress=False)
    for user, bank in banks.items():
        torch.testing.assert_close(again.bank(user, "trained").positive, bank.positive)
    assert len(shared) == 1


def test_the_trained_rows_steer_at_the_defaults_a_new_user_gets(tiny: LoadedModel) -> None:
    specs = default_method_rows(("trained",), tiny.num_layers)
    assert [s.label for s in specs] == [TRAINED, *CONTROLS]
    own = specs[0]
    assert (own.sites, own.strength, own.relative, own.contrast) == (
        "2.block",
        1.0,
        False,
        "trained",
    )
    assert {s.role for s in specs} == {Role.DEFAULTS}
    assert [s.vector_source for s in specs] == ["own", "wrong", "others", "random"]
    assert not steers(specs)  # nothing to search
    assert not any("," in s.label for s in specs)  # --rows takes comma-separated labels
    assert PRE_REGISTERED[TRAINED] == (
        Label.method_wrong_user("trained"),
        Label.method_others("trained"),
        Label.icl(3),
    )


def test_the_presets_carry_the_trained_rows_beside_the_contrast_rows(tiny: LoadedModel) -> None:
    start = Selection(default_fints(SearchSpace(layers=(1, 2), strengths=(0.1,))), None, [])
    for name in ("medium", "full"):
        preset = PRESETS[name]
        fixed = default_method_rows(preset.default_methods, tiny.num_layers)
        labels = [s.label for s in rows_for_test(start, preset, None, fixed)]
        assert labels[-4:] == [TRAINED, *CONTROLS], name
        assert Label.BEST in labels, name
    assert PRESETS["small"].default_methods == ()  # make bench stays quick
    named = rows_for_test(start, PRESETS["small"], [Label.NONE, TRAINED], fixed)
    assert [s.label for s in named] == [Label.NONE, TRAINED] and not steers(named)


def test_the_controls_replace_the_users_vector(tiny: LoadedModel, tmp_path: Path) -> None:
    task = fixture_task(max_history=3, max_new_tokens=2)
    ctx = BenchContext(
        tiny, HashEncoder(), task, benchmark_sites(tiny.num_layers, (1,)), tmp_path, progress=False
    )
    queries = task.queries("test")[:3]
    site = parse_sites("2.block")[0]
    methods = [make_method(s) for s in default_method_rows(("trained",), tiny.num_layers)]
    own, wrong, others, rnd = (m.vectors(queries, ctx)[site] for m in methods)  # type: ignore[attr-defined]
    for row, q in enumerate(queries):
        user_vector = ctx.bank(q.user, "trained").positive[0, 0]
        torch.testing.assert_close(own[row], user_vector)  # absolute strength 1: as trained
        wrong_vector = ctx.bank(task.wrong_user(q.user), "trained").positive[0, 0]
        torch.testing.assert_close(wrong[row], wrong_vector)
        mean = torch.stack(
            [ctx.bank(u, "trained").positive[:, 0].mean(dim=0) for u in task.users if u != q.user]
        ).mean(dim=0)
        torch.testing.assert_close(others[row], mean)
    torch.testing.assert_close(rnd.norm(dim=-1), own.norm(dim=-1))
    assert not torch.allclose(rnd, own)


def test_a_run_with_only_the_trained_rows_scores_them_without_a_search(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=3, max_new_tokens=3)
    rows = (Label.NONE, Label.icl(3), TRAINED, *CONTROLS)
    settings = BenchSettings(
        preset="small", cache=tmp_path, batch_size=8, timing_repeats=0, n_clusters=0,
        rows=rows, default_methods=("trained",),
    )  # fmt: skip
    report = benchmark_task(task, tiny, HashEncoder(), (1,), settings)
    assert [r.label for r in report.rows] == list(rows)
    assert "validation search" not in report.seconds and report.chosen == ""
    trained = report.row(TRAINED)
    assert trained is not None and trained.role == Role.DEFAULTS
    assert "2.block" in trained.description and "trained" in trained.description
    compared = [(p.row, p.minus) for p in report.preregistered()]
    assert compared == [(TRAINED, other) for other in PRE_REGISTERED[TRAINED]]


def test_no_default_method_rows_when_asked_for_none() -> None:
    settings = BenchSettings(preset="small", default_methods=())
    assert settings.search_preset().default_methods == ()
    assert BenchSettings(preset="medium").search_preset().default_methods == ("trained",)
    asked = BenchSettings(preset="small", default_methods=("trained",))
    assert asked.search_preset().default_methods == ("trained",)
