"""Every row's per-token NLL of the gold output: teacher-forced on exactly the prompt and
steering vectors the row generates with, cached like the generations. A tiny random llama
and the fixture task (tests/unit/benchmark_fixtures.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fints.benchmark import methods
from fints.benchmark.banks import BenchContext, benchmark_sites
from fints.benchmark.labels import Kind, Label, Metric, Role, Split
from fints.benchmark.methods import MethodSpec, SteeredPrompt, make_method
from fints.benchmark.rows import methods_for_test
from fints.benchmark.runner import Row, Runner, build_judge, evaluate
from fints.benchmark.search import SearchSpace, default_fints
from fints.benchmark.tasks import Query
from fints.generation import GenerationOptions
from fints.prompts import build_prompt_ids
from fints.retrieval import nearest_items
from fints.target_nll import target_nll
from tests.unit.benchmark_fixtures import HashEncoder, fixture_task, tiny_llama

#: Strong enough that steering visibly moves the tiny model's NLL.
BEST = default_fints(SearchSpace(layers=(1, 2), strengths=(0.5,)))


@dataclass
class Scored:
    ctx: BenchContext
    runner: Runner
    queries: list[Query]
    specs: list[MethodSpec]
    rows: dict[str, Row]
    cache: Path


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Scored:
    cache = tmp_path_factory.mktemp("nll-cache")
    model, task = tiny_llama(), fixture_task(max_history=3, max_new_tokens=2, n_test=2)
    ctx = BenchContext(
        model, HashEncoder(), task, benchmark_sites(model.num_layers, (1, 2)), cache,
        progress=False,
    )  # fmt: skip
    runner = Runner(ctx, GenerationOptions(max_new_tokens=2), cache, batch_size=4, progress=False)
    specs = methods_for_test(BEST, None, ("context",))
    rows = evaluate(runner, specs, build_judge(task))
    queries = task.queries(Split.TEST)
    return Scored(ctx, runner, queries, specs, {r.label: r for r in rows}, cache)


def targets(s: Scored) -> list[list[int]]:
    tok = s.ctx.model.tokenizer
    return [
        [*tok(q.reference, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        for q in s.queries
    ]


def bare_prompts(s: Scored) -> list[list[int]]:
    tok = s.ctx.model.tokenizer
    return [build_prompt_ids(tok, s.ctx.template, q.input) for q in s.queries]


def test_every_row_has_an_nll_per_query_and_its_mean_in_the_summary(s: Scored) -> None:
    assert set(s.rows) == {spec.label for spec in s.specs}
    for row in s.rows.values():
        assert row.nll.shape == (len(s.queries),) and (row.nll > 0).all()
        assert row.summary()[Metric.NLL] == pytest.approx(float(row.nll.mean()))
        assert row.users == [q.user for q in s.queries]


def test_the_none_row_is_the_nll_of_the_bare_prompt(s: Scored) -> None:
    expected = target_nll(s.ctx.model, bare_prompts(s), targets(s))
    assert s.rows[Label.NONE].nll == pytest.approx(expected.numpy(), abs=1e-5)


def test_the_icl_row_scores_after_its_in_context_items(s: Scored) -> None:
    tok, task = s.ctx.model.tokenizer, s.ctx.task
    keys = s.ctx.query_keys(s.queries)
    prompts = []
    for q, key in zip(s.queries, keys, strict=True):
        items = nearest_items(s.ctx.history_keys(q.user), task.users[q.user].history, key, 3)
        prompts.append(build_prompt_ids(tok, s.ctx.template, q.input, items))
    assert all(len(p) > len(b) for p, b in zip(prompts, bare_prompts(s), strict=True))
    expected = target_nll(s.ctx.model, prompts, targets(s))
    icl = s.rows[Label.icl(3)].nll
    assert icl == pytest.approx(expected.numpy(), abs=1e-5)
    assert icl != pytest.approx(s.rows[Label.NONE].nll, abs=1e-3)


def test_every_steered_row_scores_with_its_plans_vectors(s: Scored) -> None:
    steered = [spec for spec in s.specs if spec.kind in (Kind.VECTOR, Kind.FINTS)]
    assert {Role.FINTS, Role.CONTROL, Role.BASELINE, Role.VARIANT} <= {x.role for x in steered}
    none = s.rows[Label.NONE].nll
    for spec in steered:
        method = make_method(spec)
        assert isinstance(method, SteeredPrompt)
        plan = method.plan(s.queries, s.ctx)
        assert plan is not None
        expected = target_nll(
            s.ctx.model, method.prompts(s.queries, s.ctx), targets(s), plan.vectors()
        )
        row = s.rows[spec.label].nll
        assert row == pytest.approx(expected.numpy(), abs=1e-5), spec.label
        assert row != pytest.approx(none, abs=1e-4), spec.label


def test_the_nll_takes_the_vectors_generation_adds(
    s: Scored, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One path: what the backend is handed to decode is what the NLL is scored with."""
    seen: dict[str, object] = {}

    def decode(self: object, prompts: object, additions: list, options: object) -> list:
        seen["decode"] = (prompts, additions[0].vectors)
        return []

    def scored_nll(model: object, prompts: object, targets: object, vectors: object, **_: object):
        seen["nll"] = (prompts, vectors)
        return torch.zeros(len(s.queries))

    monkeypatch.setattr(methods.TransformersBackend, "decode", decode)
    monkeypatch.setattr(methods, "target_nll", scored_nll)
    spec = next(x for x in s.specs if x.label == Label.RANDOM_DIRECTION)  # a transformed plan
    method = make_method(spec)
    method.generate(s.queries, s.ctx, GenerationOptions(max_new_tokens=1))
    method.nll(s.queries, s.ctx, 4)
    (gen_prompts, gen_vectors), (nll_prompts, nll_vectors) = seen["decode"], seen["nll"]
    assert gen_prompts == nll_prompts
    assert isinstance(gen_vectors, dict) and isinstance(nll_vectors, dict)
    assert gen_vectors.keys() == nll_vectors.keys()
    for site, v in gen_vectors.items():
        assert torch.equal(v, nll_vectors[site])


def test_a_rerun_reads_every_nll_from_the_cache(s: Scored) -> None:
    again = Runner(
        s.ctx, GenerationOptions(max_new_tokens=2), s.cache, batch_size=2, progress=False
    )
    rows = evaluate(again, s.specs[:4], build_judge(s.ctx.task))
    assert again.generated == 0 and again.scored == 0
    for row in rows:
        assert row.nll.tolist() == s.rows[row.label].nll.tolist()
    # the NLL does not depend on the generation options: other options, the same file
    longer = Runner(s.ctx, GenerationOptions(max_new_tokens=3), s.cache, progress=False)
    method = make_method(s.specs[0])
    assert longer.nll_cache_file(method) == s.runner.nll_cache_file(method)
    assert longer.cache_file(method) != s.runner.cache_file(method)


def test_a_half_written_cache_is_completed(s: Scored, tmp_path: Path) -> None:
    runner = Runner(s.ctx, GenerationOptions(max_new_tokens=2), tmp_path, progress=False)
    method = make_method(s.specs[0])
    path = runner.nll_cache_file(method)
    path.parent.mkdir(parents=True)
    first = s.queries[0]
    path.write_text(f'{{"qid": "{first.qid}", "nll": 1.5}}\n{{"qid": "cut sh')
    values = runner.nll(method, s.queries)
    assert values[0] == 1.5  # from the cache
    assert runner.scored == len(s.queries) - 1
    assert values[1:].tolist() == pytest.approx(s.rows[Label.NONE].nll[1:].tolist(), abs=1e-5)


@pytest.fixture()
def s(scored: Scored) -> Scored:
    return scored
