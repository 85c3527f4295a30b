"""Runner smoke test: a tiny random llama, a hashing key encoder, the fixture tasks."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fints.benchmark.commands import (
    PRESETS,
    benchmark_task,
    diagnostics,
    layers_searched,
    rows_for_test,
    sparsity,
    steers,
)
from fints.benchmark.latency import measure_latency
from fints.benchmark.methods import (
    ALL_ENTRIES,
    BenchContext,
    MethodSpec,
    benchmark_sites,
    make_method,
)
from fints.benchmark.report import MOOD_JUDGE, PROBES, TaskReport, write_report
from fints.benchmark.runner import (
    Runner,
    SearchSpace,
    Selection,
    build_judge,
    default_fints,
    evaluate,
    methods_for_test,
    select_fints,
    standard_errors,
)
from fints.benchmark.tasks import SplitConfig, Task, load_headlines
from fints.errors import InvalidInputError
from fints.generation import GenerationOptions
from fints.layers import resolve_layout
from fints.models import LoadedModel, model_fingerprint, prepare_tokenizer, resolve_source

FIXTURES = Path(__file__).parents[1] / "fixtures" / "bench"
CONTEXT, CENTERED = (question for question, _ in PROBES)


def fixture_task(max_history: int, max_new_tokens: int, n_test: int = 1) -> Task:
    """The headlines fixture, split with one validation query per user."""
    split = SplitConfig(min_items=10, n_test=n_test, n_val=1, max_history=max_history)
    return load_headlines(FIXTURES / "news.jsonl", split, max_new_tokens)


class HashEncoder:
    """Bag of hashed words, unit length: a deterministic stand-in for MiniLM."""

    name = "hash-encoder"
    dim = 64

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_source(None)))
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(
        model, tokenizer, "tiny-llama", model_fingerprint(model), resolve_layout(model)
    )


def test_runner_end_to_end_and_resumes_from_cache(tiny: LoadedModel, tmp_path: Path) -> None:
    task = fixture_task(max_history=3, max_new_tokens=4)
    sites = benchmark_sites(tiny.num_layers, (1, 2))
    ctx = BenchContext(tiny, HashEncoder(), task, sites, tmp_path, progress=False)
    runner = Runner(
        ctx, GenerationOptions(max_new_tokens=4), tmp_path, batch_size=8, progress=False
    )
    judge = build_judge(task)
    space = SearchSpace(
        layers=(1, 2), strengths=(0.1, 0.5), absolute_strengths=(2.0,),
        components=("attn+mlp", "block"), top_k=(2, ALL_ENTRIES),
        aggregations=("attentive", "mean"), taus=(0.1, 0.5), icl_k=(0, 1),
    )  # fmt: skip
    selection = select_fints(runner, space, judge)
    assert selection.best.kind == "fints"
    stages = {stage for stage, *_ in selection.log}
    assert stages >= {"layer", "strength", "sites", "top_k", "icl"}
    tried = [desc for stage, desc, *_ in selection.log if stage == "tau"]
    assert all("tau=0.5" in d and " attentive " in d for d in tried)  # only where tau matters
    assert runner.generated > 0 and all(q.split == "validation" for q in task.queries("validation"))

    # A second pass starts where the first ended, so it can only do as well or better,
    # and it stops once a pass changes nothing.
    again = select_fints(runner, replace(space, rounds=3), judge)
    assert again.log[: len(selection.log)] == selection.log
    objective = {desc: value for _, desc, value, _ in again.log}
    assert objective[again.best.describe()] >= objective[selection.best.describe()]
    later = [stage for stage, *_ in again.log[len(selection.log) :]]
    assert later and all(stage.endswith(("(2)", "(3)")) for stage in later)
    assert selection.kept == [] and again.kept == []  # no margin: every winner moves

    # The tiny model ties every candidate, so without a margin each stage moved to its
    # first candidate; with one, no tie (and no gain a few queries can show) moves it.
    assert selection.best != default_fints(space)
    strict = select_fints(runner, replace(space, margin=1e6), judge)
    assert strict.best == default_fints(space)
    assert all(" standard errors <= 1e+06)" in note for note in strict.kept)
    with pytest.raises(InvalidInputError, match="margin must be >= 0"):
        replace(space, margin=-1.0)

    specs = methods_for_test(selection.best, selection.best_absolute, ("context",))
    roles = {s.role for s in specs}
    assert roles == {"baseline", "fints", "variant", "control"}
    labels = {s.label for s in specs}
    assert {"none", "icl k=1", "icl k=3", "control: random direction"} <= labels
    assert {"control: icl k=1 wrong user", "control: icl k=3 wrong user"} <= labels
    assert "control: wrong-user dictionary" in labels
    rows = evaluate(runner, specs, judge)
    assert len(rows) == len(specs)
    assert all(len(r.texts) == len(task.queries("test")) for r in rows)

    before = runner.generated
    again = Runner(ctx, GenerationOptions(max_new_tokens=4), tmp_path, batch_size=8, progress=False)
    rows_again = evaluate(again, specs, judge)
    assert again.generated == 0  # everything came from the cache
    assert [r.texts for r in rows_again] == [r.texts for r in rows]
    assert runner.generated == before

    timed = [specs[0], *(s for s in specs if s.role == "fints")]
    latency = measure_latency(ctx, timed, GenerationOptions(max_new_tokens=3), batch_size=2)
    assert [t.label for t in latency] == ["none", "fints (best on val)"]
    assert latency[0].cpu_vs_first == 1.0 and latency[0].queries == 2
    assert all(t.new_tokens == 3 and t.tokens_per_second > 0 for t in latency)

    report = TaskReport(
        name=task.name, judge_name="attribution", source=task.source, sha256=task.sha256,
        users=len(task.users), test_queries=len(task.queries()), validation_queries=3,
        max_new_tokens=4, rows=rows, chosen=selection.best.describe(),
        selection_log=selection.log, selection_kept=["layer: kept A over B (+0.01, 0.5 ...)"],
        diagnostics=diagnostics(ctx, selection.best),
        latency=latency,
    )  # fmt: skip
    assert report.verdict().startswith(("PASS", "FAIL"))
    # The mood rate is a target measure only where it is the judge.
    assert "(mood rate)" not in report.verdict()
    mood = replace(report, judge_name=MOOD_JUDGE)
    lost_on_mood = sum(not d["judge"].above_zero for _, _, d in report.comparisons())
    assert mood.verdict().count("(mood rate)") == lost_on_mood > 0
    md = write_report(tmp_path / "out", [report], {"command": "test", "seed": 0})
    text = md.read_text()
    assert "control: random direction" in text and "Verdict" in text and "Latency on one" in text
    assert "did not clear the search margin:\n\n- layer: kept A over B" in text
    assert (tmp_path / "out" / "headlines_methods.png").is_file()
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"][0]
    assert set(summary["rows"]) == {s.label for s in specs}
    assert set(summary["best_minus"]) == {
        s.label for s in specs if s.role in ("baseline", "control")
    }
    assert summary["selection_log"] and summary["test_queries"] == len(task.queries())

    # the probes: own ICL minus none and minus another user's ICL; centered own minus
    # centered wrong-user dictionary; in both outputs
    probes = dict(report.probes())
    assert [(a, b) for a, b, _ in probes[CENTERED]] == [
        ("fints centered", "fints centered (wrong-user dictionary)"),
        ("fints centered", "fints (best on val)"),
        ("fints centered", "none"),
    ]
    probe = probes[CONTEXT]
    assert [(a, b) for a, b, _ in probe] == [
        ("icl k=1", "none"),
        ("icl k=1", "control: icl k=1 wrong user"),
        ("icl k=3", "none"),
        ("icl k=3", "control: icl k=3 wrong user"),
    ]
    own, wrong = report.row("icl k=3"), report.row("control: icl k=3 wrong user")
    assert own is not None and wrong is not None
    expected = float((own.scores.rougeL - wrong.scores.rougeL).mean())
    assert probe[3][2]["rougeL"].mean == pytest.approx(expected)
    assert CONTEXT in text and CENTERED in text
    assert [p["minus"] for p in summary["probes"][CONTEXT]][-1] == "control: icl k=3 wrong user"
    per_query = summary["per_query"]["icl k=3"]
    assert len(per_query["rougeL"]) == len(task.queries())
    assert per_query["rougeL"] == pytest.approx(own.scores.rougeL.tolist(), abs=1e-4)


def test_rows_pick_the_test_methods_and_skip_the_search_without_steering() -> None:
    selection = Selection(default_fints(SearchSpace(layers=(1, 2), strengths=(0.1,))), None, [])
    assert selection.best.sites == "2.attn+mlp" and selection.best.strength == 0.1
    probe = ["control: icl k=3 wrong user", "none", "icl k=3"]
    specs = rows_for_test(selection, PRESETS["small"], probe)
    assert [s.label for s in specs] == ["none", "icl k=3", "control: icl k=3 wrong user"]
    assert not steers(specs)
    small = [s.label for s in rows_for_test(selection, PRESETS["small"], None)]
    assert {"icl k=1", "control: icl k=1 wrong user", "control: icl k=3 wrong user"} <= set(small)
    # a wrong-user ICL control runs only beside the own-items ICL row it controls
    medium = [s.label for s in rows_for_test(selection, PRESETS["medium"], None)]
    assert "icl k=1" not in medium and "control: icl k=1 wrong user" not in medium
    assert "control: icl k=3 wrong user" in medium
    assert steers(rows_for_test(selection, PRESETS["small"], None))
    # a variant that is the chosen setting itself may be named, and runs once
    both = ["fints (best on val)", "fints context contrast", "fints response contrast"]
    specs = rows_for_test(selection, PRESETS["full"], both)
    assert [s.label for s in specs] == ["fints (best on val)", "fints response contrast"]
    assert [s.contrast for s in specs] == ["context", "response"]
    with pytest.raises(InvalidInputError, match="unknown row"):
        rows_for_test(selection, PRESETS["full"], ["fints sideways contrast"])
    with pytest.raises(InvalidInputError, match=r"unknown row.*'fints typo'"):
        rows_for_test(selection, PRESETS["small"], ["none", "fints typo"])


def test_a_probe_without_steering_runs_no_search_and_no_sparsity_sweep(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=3, max_new_tokens=4)
    preset = replace(PRESETS["small"], sparsity=(0.5,), clusters=0)
    args = {"cache": tmp_path, "seed": 0, "batch_size": 8, "timing_repeats": 0}
    args |= {"search_rounds": 1, "search_margin": 0.0}
    report = benchmark_task(
        task, tiny, HashEncoder(), preset, (1,), {**args, "rows": ["none", "icl k=1"]}
    )
    assert [r.label for r in report.rows] == ["none", "icl k=1"]
    assert report.sparsity == [] and report.selection_log == [] and report.chosen == ""
    assert "validation search" not in report.seconds
    assert layers_searched([report], (1,)) == "none (no row steers)"


def test_caches_are_per_dtype(tiny: LoadedModel, tmp_path: Path) -> None:
    """A bf16 run must not reuse an fp32 run's generations or activations."""
    task = fixture_task(max_history=3, max_new_tokens=4)
    half = copy.deepcopy(tiny.model).to(torch.bfloat16)
    tiny_bf16 = LoadedModel(
        half, tiny.tokenizer, tiny.name, model_fingerprint(half), resolve_layout(half)
    )
    assert tiny_bf16.fingerprint == tiny.fingerprint  # same weights, same store entries
    sites = benchmark_sites(tiny.num_layers, (1,))
    paths = []
    for model in (tiny, tiny_bf16):
        ctx = BenchContext(model, HashEncoder(), task, sites, tmp_path, progress=False)
        runner = Runner(ctx, GenerationOptions(max_new_tokens=2), tmp_path, progress=False)
        method = make_method(MethodSpec("none", role="baseline"))
        user = next(iter(task.users))
        paths.append((runner.cache_file(method), ctx._bank_path(user, "context")))
    assert paths[0][0] != paths[1][0] and paths[0][1] != paths[1][1]


def test_controls_change_the_vectors_but_keep_their_norm(tiny: LoadedModel, tmp_path: Path) -> None:
    task = fixture_task(max_history=4, max_new_tokens=6, n_test=2)
    ctx = BenchContext(
        tiny, HashEncoder(), task, benchmark_sites(tiny.num_layers, (1,)), tmp_path, progress=False
    )
    queries = task.queries("test")[:3]
    base = MethodSpec("f", kind="fints", sites="1.attn+mlp", strength=2.0, relative=False)
    own = make_method(base).vectors(queries, ctx)  # type: ignore[attr-defined]
    rnd = make_method(base.with_(vector_source="random")).vectors(queries, ctx)  # type: ignore[attr-defined]
    wrong = make_method(base.with_(vector_source="wrong")).vectors(queries, ctx)  # type: ignore[attr-defined]
    for site, v in own.items():
        assert torch.allclose(v.norm(dim=-1), rnd[site].norm(dim=-1), rtol=1e-4)
        assert not torch.allclose(v, rnd[site])
        assert not torch.allclose(v, wrong[site])
    rel = make_method(base.with_(relative=True, strength=0.5)).vectors(queries, ctx)  # type: ignore[attr-defined]
    bank = ctx.bank(queries[0].user, "context")
    site = next(iter(rel))
    expected = 0.5 * float(bank.site_norms[bank.index([site])[0]])
    assert float(rel[site][0].norm()) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(Exception, match="sites"):
        MethodSpec("bad", kind="fints")


def test_centering_removes_the_other_users_mean_difference(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=3, max_new_tokens=4)
    ctx = BenchContext(
        tiny, HashEncoder(), task, benchmark_sites(tiny.num_layers, (1,)), tmp_path, progress=False
    )
    query = task.queries("test")[0]
    spec = MethodSpec("v", kind="vector", sites="1.attn", strength=1.0, relative=False)
    plain = make_method(spec).vectors([query], ctx)  # type: ignore[attr-defined]
    centered = make_method(spec.with_(centered=True)).vectors([query], ctx)  # type: ignore[attr-defined]
    site = next(iter(plain))
    others = [u for u in task.users if u not in (query.user, task.wrong_user(query.user))]
    assert others
    index = ctx.bank(query.user, "context").index([site])
    shared = torch.stack(
        [ctx.bank(u, "context").differences[:, index].mean(dim=0) for u in others]
    ).mean(dim=0)
    assert torch.allclose(centered[site][0], plain[site][0] - shared[0], atol=1e-5)
    assert not torch.allclose(centered[site], plain[site])
    # the wrong-user twin subtracts the same vector, so the pair differs as before
    wrong = spec.with_(vector_source="wrong")
    plain_wrong = make_method(wrong).vectors([query], ctx)  # type: ignore[attr-defined]
    centered_wrong = make_method(wrong.with_(centered=True)).vectors([query], ctx)  # type: ignore[attr-defined]
    assert torch.allclose(
        centered[site] - centered_wrong[site], plain[site] - plain_wrong[site], atol=1e-5
    )
    # Recorded runs' caches stay valid: an uncentered spec keeps the key it had before.
    assert MethodSpec("none").key() == "c982cf9ff8113b10"
    assert spec.with_(centered=True).key() != spec.key()
    assert "centered" in spec.with_(centered=True).describe()
    with pytest.raises(InvalidInputError, match="does not steer"):
        MethodSpec("icl", kind="icl", icl_k=1, centered=True)


def test_retrieving_every_entry_with_mean_aggregation_is_the_mean_user_vector(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=4, max_new_tokens=4, n_test=2)
    ctx = BenchContext(
        tiny, HashEncoder(), task, benchmark_sites(tiny.num_layers, (1,)), tmp_path, progress=False
    )
    queries = task.queries("test")[:3]
    base = MethodSpec("f", kind="fints", sites="1.block", strength=2.0, relative=False)

    def vectors(spec: MethodSpec) -> torch.Tensor:
        return next(iter(make_method(spec).vectors(queries, ctx).values()))  # type: ignore[attr-defined]

    every = base.with_(top_k=ALL_ENTRIES, aggregation="mean")
    mean_vector = base.with_(kind="vector", user_vector="mean")
    assert torch.allclose(vectors(every), vectors(mean_vector), atol=1e-5)
    assert not torch.allclose(vectors(base.with_(top_k=1, aggregation="mean")), vectors(every))
    # tau: near zero only the best-scored entries count, so K beyond them changes nothing;
    # large, the softmax weights are uniform and attentive is mean aggregation
    sharp = vectors(base.with_(top_k=ALL_ENTRIES, tau=1e-4))
    assert torch.allclose(sharp, vectors(base.with_(tau=1e-4)), atol=1e-5)
    assert not torch.allclose(sharp, vectors(base.with_(top_k=ALL_ENTRIES)), atol=1e-5)
    flat = vectors(base.with_(top_k=ALL_ENTRIES, tau=1e3))
    assert torch.allclose(flat, vectors(every), atol=1e-4)

    assert "K=all mean" in every.describe()
    assert "tau=0.3" in base.with_(tau=0.3).describe()
    assert "tau" not in base.with_(tau=0.3, top_k=1).describe()  # one entry: tau is moot
    assert base.weighs_by_score and not every.weighs_by_score
    assert base.key() == base.with_(tau=0.1).key() != base.with_(tau=0.3).key()
    assert every.with_(tau=0.3).key() == every.key()  # where tau is moot it is not in the key
    assert base.with_(top_k=1, tau=0.3).key() == base.with_(top_k=1).key()
    # ... while the recorded runs' caches stay valid (qwen1.5b-abstracts-fints' chosen row)
    recorded = MethodSpec("f", kind="fints", sites="14.attn+mlp", strength=0.1, top_k=3)
    assert recorded.key() == "069a68418b188bb3"
    with pytest.raises(InvalidInputError, match="top_k"):
        base.with_(top_k=-1)
    with pytest.raises(InvalidInputError, match="tau"):
        base.with_(tau=0.0)


def test_sparsity_runs_less_history_and_ends_with_the_whole(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    task = fixture_task(max_history=4, max_new_tokens=3)
    best = MethodSpec(
        "fints (best on val)", kind="fints", sites="1.attn+mlp", strength=0.2, role="fints"
    )
    points = sparsity(
        task, tiny, HashEncoder(), benchmark_sites(tiny.num_layers, (1,)), best, build_judge(task),
        GenerationOptions(max_new_tokens=3), {"cache": tmp_path, "seed": 0, "batch_size": 8},
        fractions=(0.25,), sizes=(),
    )  # fmt: skip
    assert [(p["history"], p["label"]) for p in points] == [
        (h, label)
        for h in ("25%", "100%")
        for label in ("fints (best on val)", "control: random direction", "icl k=3")
    ]
    assert all(0 <= p["rougeL"] <= 1 and "[" in p["delta_rougeL"] for p in points)


def test_number_lists_from_the_command_line() -> None:
    from fints.benchmark.commands import _ints

    assert _ints("5,10,25", "persona-sizes") == (5, 10, 25)
    assert _ints("", "persona-sizes") == ()  # an empty list switches the sweep off
    assert _ints(None, "persona-sizes") is None  # the preset's own sizes
    with pytest.raises(InvalidInputError, match="--persona-sizes"):
        _ints("5,ten", "persona-sizes")


def test_search_choices_from_the_command_line() -> None:
    from fints.benchmark.commands import COMPONENTS, _choices
    from fints.extraction import CONTRASTS

    assert _choices("attn, block", "components", COMPONENTS) == ("attn", "block")
    assert _choices(None, "components", COMPONENTS) is None  # the preset's own
    with pytest.raises(InvalidInputError, match=r"--components.*'attn,ffn'"):
        _choices("attn,ffn", "components", COMPONENTS)
    with pytest.raises(InvalidInputError, match="--contrasts"):
        _choices("", "contrasts", CONTRASTS)


def test_standard_errors_of_a_paired_gain() -> None:
    assert standard_errors(np.array([0.1, 0.3])) == pytest.approx(2.0)  # mean 0.2, se 0.1
    assert standard_errors(np.array([-0.1, -0.3])) == pytest.approx(-2.0)
    assert standard_errors(np.zeros(5)) == 0.0  # identical outputs: no gain at all
    assert standard_errors(np.full(3, 0.05)) == np.inf  # the same gain on every query


def test_retrieval_sizes_from_the_command_line() -> None:
    from fints.benchmark.commands import _top_ks

    assert _top_ks("5, 1,all") == (5, 1, ALL_ENTRIES)
    assert _top_ks("") == ()  # the task's default K alone
    for bad in ("0", "-2", "five", "2.5"):
        with pytest.raises(InvalidInputError, match="--top-ks"):
            _top_ks(bad)
