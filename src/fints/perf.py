"""`fints perf`: speed and cost of personalization, as ratios measured in one run.

1. Steered vs plain generation for a batch of 8 requests from 8 users (same
   prompts, same number of new tokens), interleaved and repeated; medians.
2. Extraction time per history item vs one plain forward pass over the same
   tokens (the item's positive prompt + target, same batching).
3. Top-K retrieval + aggregation over a 1,000-entry dictionary, per query.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fints.demo import DEMO_USERS, demo_data_dir
from fints.dictionary import DictionaryEntry, DictionaryMeta
from fints.encoders import SentenceTransformerEncoder
from fints.engine import GenerationRequest, Personalizer
from fints.extraction import ExtractionConfig, Extractor
from fints.generation import GenerationOptions
from fints.history import HistoryItem, read_history
from fints.models import LoadedModel, load_model
from fints.prompts import TEMPLATES, build_prompt_ids, pad_batch
from fints.retrieval import retrieve_and_aggregate
from fints.sites import default_sites
from fints.steering import SteeringConfig, SteeringVector
from fints.store import Store

QUERIES = [
    "How do I keep my kitchen clean?",
    "What is a good hobby to pick up?",
    "How can I stay focused at work?",
    "What should I read next?",
    "How do I fix a squeaky door?",
    "Any advice for a first marathon?",
    "How do I make friends in a new city?",
    "What is the best way to learn to cook?",
]


@dataclass
class Timing:
    """Median wall-clock and process CPU seconds of repeated runs."""

    wall: float
    cpu: float

    def ratio(self, base: Timing) -> Timing:
        return Timing(self.wall / base.wall, self.cpu / base.cpu)

    def scaled(self, factor: float) -> Timing:
        return Timing(self.wall * factor, self.cpu * factor)


def _time(fn: Callable[[], object], repeats: int) -> list[tuple[float, float]]:
    samples = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        samples.append((time.perf_counter() - wall, time.process_time() - cpu))
    return samples


def _median(samples: list[tuple[float, float]]) -> Timing:
    return Timing(
        statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)
    )


def interleaved(fns: Sequence[Callable[[], object]], repeats: int) -> list[Timing]:
    """Run the functions in ABBA order (forward, then backward), so drift in machine load
    and order effects cancel; one warm-up call each. Medians per function."""
    for fn in fns:
        fn()
    samples: list[list[tuple[float, float]]] = [[] for _ in fns]
    for round_ in range(repeats):
        order = list(range(len(fns)))
        for i in order if round_ % 2 == 0 else reversed(order):
            samples[i] += _time(fns[i], 1)
    return [_median(s) for s in samples]


def _random_entries(
    model: LoadedModel, meta: DictionaryMeta, n: int, seed: int
) -> list[DictionaryEntry]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(n, meta.key_dim, generator=g), dim=1)
    values = torch.randn(n, len(meta.sites), model.hidden_size, generator=g)
    return [
        DictionaryEntry(f"e{i}", keys[i], SteeringVector(meta.sites, values[i])) for i in range(n)
    ]


def generation_overhead(
    engine: Personalizer, repeats: int, max_new_tokens: int
) -> tuple[Timing, Timing]:
    """(plain, steered) timings of one batch of 8 requests from 8 users, same tokens."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True)
    steered = [GenerationRequest(f"user{i}", q) for i, q in enumerate(QUERIES)]
    plain = [
        GenerationRequest(f"user{i}", q, steering=engine.steering.with_(enabled=False))
        for i, q in enumerate(QUERIES)
    ]
    assert all(r.steered for r in engine.generate(steered[:2], options))
    plain_t, steered_t = interleaved(
        [lambda: engine.generate(plain, options), lambda: engine.generate(steered, options)],
        repeats,
    )
    return plain_t, steered_t


def extraction_cost(
    model: LoadedModel,
    encoder: SentenceTransformerEncoder,
    items: list[HistoryItem],
    pool: list[HistoryItem],
    repeats: int,
) -> tuple[Timing, Timing]:
    """Per item: (full extraction, one plain forward over the positive prompt + target)."""
    # the paper's context contrast, whose cost this measures (trained vectors' cost is the
    # probe's --cost-only, BENCHMARKS.md)
    config = ExtractionConfig(sites=default_sites(model.num_layers), method="context", batch_size=8)
    template = TEMPLATES["generic"]
    extractor = Extractor(model, encoder, template, config)
    tok = model.tokenizer
    sequences = [
        build_prompt_ids(tok, template, item.input, items[:3])
        + list(tok(item.output, add_special_tokens=False)["input_ids"])
        for item in items
    ]

    def plain_forward() -> None:
        with torch.inference_mode():
            for start in range(0, len(sequences), config.batch_size):
                ids, attention = pad_batch(
                    sequences[start : start + 8], tok.pad_token_id, side="right"
                )
                model.model(input_ids=ids, attention_mask=attention)

    def extract() -> None:
        extractor.extract(items, items, pool, progress=False)

    t_forward, t_extract = interleaved([plain_forward, extract], repeats)
    return t_extract.scaled(1 / len(items)), t_forward.scaled(1 / len(items))


def retrieval_time(model: LoadedModel, meta: DictionaryMeta, repeats: int) -> tuple[Timing, Timing]:
    """Seconds per query: (one query alone, a batch of 8 users' queries)."""
    from fints.dictionary import UserDictionary

    dictionaries = []
    for u in range(8):
        entries = _random_entries(model, meta, 1000, seed=u)
        dictionaries.append(
            UserDictionary(
                f"u{u}",
                meta,
                [e.item_id for e in entries],
                torch.stack([e.key for e in entries]),
                torch.stack([e.vector.values for e in entries]),
            )
        )
    queries = torch.nn.functional.normalize(torch.randn(8, meta.key_dim), dim=1)

    def one() -> None:
        retrieve_and_aggregate(queries[:1], dictionaries[:1], top_k=5, aggregation="attentive")

    def batch() -> None:
        retrieve_and_aggregate(queries, dictionaries, top_k=5, aggregation="attentive")

    single, batched = interleaved([one, batch], repeats * 20)
    return single, batched.scaled(1 / 8)


def run_perf(
    model_name: str | None = None,
    *,
    dtype: str = "auto",
    repeats: int = 5,
    max_new_tokens: int = 32,
    threads: int | None = None,
    console: Console | None = None,
) -> list[Figure]:
    """Run the three measurements and print them; wall-clock and process CPU time both."""
    console = console or Console()
    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_name, dtype=dtype)
    encoder = SentenceTransformerEncoder()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "perf.sqlite") as store:
        steering = SteeringConfig(relative=True, strengths={"attn": 0.5, "mlp": 0.5})
        engine = Personalizer(model, store, encoder=encoder, steering=steering)
        meta = DictionaryMeta(
            model_fingerprint=model.fingerprint,
            model_name=model.name,
            sites=engine.extraction.sites,
            hidden_size=model.hidden_size,
            key_encoder=encoder.name,
            key_dim=encoder.dim,
            prompt_template="generic",
            dtype=str(model.dtype),
            site_norms=tuple(30.0 for _ in engine.extraction.sites),
        )
        for u in range(8):  # 8 users, 50 entries each (vector values do not affect cost)
            items = [HistoryItem(f"q{u}-{i}", f"a{u}-{i}", f"e{i}") for i in range(50)]
            store.add_items("default", f"user{u}", items)
            store.put_entries("default", f"user{u}", meta, _random_entries(model, meta, 50, u))
        with console.status("timing steered vs plain generation (batch of 8 users)"):
            plain, steered = generation_overhead(engine, repeats, max_new_tokens)
    overhead = steered.ratio(plain)
    figures += [
        Figure("generation, plain (batch 8)", plain, "s"),
        Figure("generation, steered (batch 8, 8 users)", steered, "s"),
        Figure("steered / plain", overhead, "x", "<= 1.05 x", 1.05),
    ]

    data = demo_data_dir()
    histories = [read_history(data / f"{u}.jsonl") for u in DEMO_USERS]
    with console.status("timing extraction vs a plain forward pass"):
        t_extract, t_forward = extraction_cost(
            model,
            encoder,
            histories[0] + histories[1][:6],
            [i for h in histories[2:] for i in h],
            repeats,
        )
    figures += [
        Figure("extraction per item (context contrast)", t_extract, "s"),
        Figure("one plain forward per item", t_forward, "s"),
        Figure("extraction / forward", t_extract.ratio(t_forward), "x", "<= 2.5 x", 2.5),
    ]

    with console.status("timing retrieval + aggregation over 1,000 entries"):
        single, batched = retrieval_time(model, meta, repeats)
    figures += [
        Figure(
            "top-5 retrieval + aggregation, 1,000 entries, 1 query",
            single.scaled(1000),
            "ms",
            "< 2 ms",
            2.0,
        ),
        Figure(
            "  same, per query in a batch of 8 users", batched.scaled(1000), "ms", "< 2 ms", 2.0
        ),
    ]
    console.print(perf_table(figures, model, max_new_tokens))
    return figures


@dataclass
class Figure:
    name: str
    timing: Timing
    unit: str
    target: str = ""
    limit: float | None = None  # the value must stay at or under this

    def ok(self, value: float) -> bool:
        return self.limit is None or value <= self.limit


def perf_table(figures: list[Figure], model: LoadedModel, max_new_tokens: int) -> Table:
    dtype = str(model.dtype).removeprefix("torch.")
    table = Table(
        title=f"fints perf: {model.name}, {dtype}, {torch.get_num_threads()} threads, "
        f"{max_new_tokens} new tokens, medians of interleaved runs"
    )
    for column in ("measure", "wall clock", "CPU time", "target"):
        table.add_column(column)
    for f in figures:
        cells = []
        for value in (f.timing.wall, f.timing.cpu):
            mark = "" if f.limit is None else (" [green]ok[/]" if f.ok(value) else " [red]over[/]")
            cells.append(f"{value:.4g} {f.unit}{mark}")
        table.add_row(f.name, *cells, f.target)
    return table
