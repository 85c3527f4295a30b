"""Hardening (issue 25, item 2): one large history item must not block the model for
everyone. An item contributes a bounded number of tokens to any prompt (extraction and
in-context examples), and a write runs in steps with generation batches between them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fints.engine import GenerationRequest, Personalizer
from fints.extraction import ExtractionConfig
from fints.extraction.base import MethodContext
from fints.generation import GenerationOptions
from fints.history import MAX_ITEM_CHARS, HistoryItem, clip_item, clip_text
from fints.serving.app import ServerConfig, create_app
from fints.serving.batcher import Batcher
from fints.serving.inprocess import RunningServer
from fints.serving.metrics import ServingMetrics
from fints.serving.stalltest import KEYS, StallSpec, run_write_stall
from fints.sites import parse_sites
from fints.steering import SteeringConfig
from fints.steps import Steps
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama
from tests.unit.test_serving_units import StandInPersonalizer, sample

BOUND = 48  # tokens per text in these tests (the default is 256)
#: one item at the documented character limit: about 5,000 tokens unclipped
LONG = ("The quick brown fox jumps over the lazy dog near the river bank. " * 400)[:MAX_ITEM_CHARS]


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama()
    torch.set_num_threads(threads)


def personalizer(model: Any, tmp: Path, bound: int | None = BOUND) -> Personalizer:
    return Personalizer(
        model,
        Store(tmp / "store.sqlite"),
        encoder=HashEncoder(),
        # the context contrast: what these tests bound is its prompts (own and others' items)
        extraction=ExtractionConfig(sites=parse_sites("1.attn+mlp"), method="context"),
        item_prompt_tokens=bound,
    )


def test_clip_text_cuts_to_whole_tokens_and_keeps_short_text(model: Any) -> None:
    tok = model.tokenizer
    clipped = clip_text(tok, LONG, BOUND)
    assert LONG.startswith(clipped.rstrip()) and len(clipped) < len(LONG)
    assert len(tok(clipped, add_special_tokens=False)["input_ids"]) <= BOUND + 1
    assert clip_text(tok, "short text", BOUND) == "short text"
    assert clip_text(tok, "🙂" * 200, BOUND).count("\ufffd") == 0  # no half character
    item = HistoryItem(LONG, "fine", "the-id")
    assert clip_item(tok, item, BOUND).item_id == "the-id"
    assert clip_item(tok, item, None) is item
    short = HistoryItem("a", "b")
    assert clip_item(tok, short, BOUND) is short


def record_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every sequence extraction teacher-forces from now on."""
    lengths: list[int] = []
    means = MethodContext.means

    def recording(self: MethodContext, prompts: Any, targets: Any) -> Any:
        lengths.extend(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
        return means(self, prompts, targets)

    monkeypatch.setattr(MethodContext, "means", recording)
    return lengths


def test_a_long_item_costs_extraction_what_a_short_one_does(
    model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extracting the long item itself, and another user's items that draw it as negative
    context, teacher-force sequences bounded by the per-text token limit."""
    p = personalizer(model, tmp_path)
    lengths = record_lengths(monkeypatch)
    p.add_history("bob", [HistoryItem(LONG, LONG, "long"), HistoryItem("bob says", "hi")])
    p.add_history("alice", [HistoryItem(f"alice on {t}", f"words {t}") for t in range(3)])
    full = len(model.tokenizer(LONG)["input_ids"])
    assert full > 10 * BOUND  # the item is long
    # own input + 3 context items (input and output) + target, each <= BOUND, + template
    assert max(lengths) <= BOUND * 8 + 64, (max(lengths), full)
    bob = p.dictionary("bob")
    assert bob is not None and "long" in bob.item_ids
    # without the bound the same history costs the whole text
    unbounded = personalizer(model, tmp_path / "unbounded", bound=None)
    lengths.clear()
    unbounded.add_history("bob", [HistoryItem(LONG, "fine", "long")])
    assert max(lengths) > full // 2


def test_in_context_examples_are_clipped_too(model: Any, tmp_path: Path) -> None:
    p = personalizer(model, tmp_path)
    p.add_history("bob", [HistoryItem(LONG, LONG, "long")], build=True)
    icl = SteeringConfig.from_dict({"icl_k": 1, "enabled": False})
    [result] = p.generate(
        [GenerationRequest("bob", "quick brown fox", steering=icl)],
        GenerationOptions(max_new_tokens=1),
    )
    assert result.prompt_tokens <= 2 * BOUND + 64


def test_extraction_in_steps_stores_what_one_step_does(model: Any, tmp_path: Path) -> None:
    """Chunked extraction (what the server does between decode batches) gives the same
    entries and site norms as one build."""
    items = [HistoryItem(f"item {n} on topic {n % 3}", f"answer number {n}") for n in range(5)]
    whole, steps = personalizer(model, tmp_path / "a"), personalizer(model, tmp_path / "b")
    for p in (whole, steps):
        p.add_history("other", [HistoryItem("other says", "something else")])
        p.store.add_items("default", "u", items)
    whole.build("u", progress=False)
    done = list(steps.build_steps("u", chunk_items=2))
    assert len(done) == 3
    a, b = whole.dictionary("u"), steps.dictionary("u")
    assert a is not None and b is not None and a.item_ids == b.item_ids
    torch.testing.assert_close(a.vectors, b.vectors, rtol=1e-4, atol=1e-5)
    assert a.meta.site_norms == pytest.approx(b.meta.site_norms, rel=1e-5)


# -- the scheduler ---------------------------------------------------------------------------


def test_requests_are_decoded_between_the_steps_of_a_write() -> None:
    """A generation request sent while a write's first step runs is answered before the
    write's next step: a long write delays decoding by one step, not by the whole write."""
    personalizer = StandInPersonalizer()
    log: list[str] = []
    started, go = threading.Event(), threading.Event()

    def write() -> Steps[str]:
        log.append("step 1")
        started.set()
        go.wait(timeout=60)
        yield
        log.append(f"step 2 after {len(personalizer.decoded)} batch(es)")
        yield
        log.append("step 3")
        return "written"

    async def work(batcher: Batcher) -> None:
        writing = asyncio.ensure_future(batcher.run_steps(write()))
        await asyncio.to_thread(started.wait, 60)
        job = batcher.submit(GenerationRequest("u", "hello"), GenerationOptions(), stream=False)
        go.set()
        result, _ = await job.result()
        assert result.text == "ok" and not writing.done()
        assert await writing == "written"

    metrics = run(personalizer, work)
    assert log == ["step 1", "step 2 after 1 batch(es)", "step 3"]
    assert sample(metrics, "fints_write_step_seconds_count") == 3
    assert sample(metrics, "fints_write_seconds_count") == 1


def test_writes_keep_their_order_and_a_failing_step_fails_only_its_write() -> None:
    log: list[str] = []

    def write(name: str, fail: bool = False) -> Steps[str]:
        log.append(f"{name}1")
        yield
        if fail:
            raise OSError("disk full")
        log.append(f"{name}2")
        return name

    async def work(batcher: Batcher) -> None:
        a = asyncio.ensure_future(batcher.run_steps(write("a", fail=True)))
        b = asyncio.ensure_future(batcher.run_steps(write("b")))
        with pytest.raises(OSError, match="disk full"):
            await a
        assert await b == "b"

    metrics = run(StandInPersonalizer(), work)
    assert log == ["a1", "b1", "b2"]
    assert sample(metrics, "fints_write_errors_total") == 1


def run(personalizer: StandInPersonalizer, work: Any) -> ServingMetrics:
    metrics = ServingMetrics()

    async def main() -> None:
        # the stand-in answers a whole request at once: no slices
        batcher = Batcher(personalizer, metrics, max_wait_ms=0, slice_tokens=None)  # type: ignore[arg-type]
        await batcher.start()
        try:
            await work(batcher)
        finally:
            await batcher.stop()

    asyncio.run(main())
    return metrics


def test_the_write_stall_scenario_reports_both_writes_and_the_chats(
    model: Any, tmp_path: Path
) -> None:
    """``fints loadtest --write-stall`` on the tiny model: every request answered, the
    report names the write latencies and the stall."""
    p = personalizer(model, tmp_path)
    config = ServerConfig(api_keys=KEYS, extract_chunk_items=1, max_wait_ms=0)
    with RunningServer(create_app(p, config)) as server:
        spec = StallSpec(item_chars=3000, before_s=0.3, after_s=0.1)
        report = run_write_stall(server.url, "tiny-llama", spec, "title")
    assert report.errors == []
    assert report.write_s > 0 and report.later_write_s > 0 and report.during
    assert p.store.users("write") == ["stall-big", "stall-later"]  # the big item came first
    text = report.render()
    assert "decode stall" in text and "while the writes ran" in text
