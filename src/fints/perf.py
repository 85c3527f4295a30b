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
from collections.abc import Callable
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
class Figure:
    name: str
    value: float
    unit: str
    target: str
    ok: bool


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
) -> tuple[float, float]:
    """Median seconds (plain, steered) for one batch of 8 requests from 8 users."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True)
    steered = [GenerationRequest(f"user{i}", q) for i, q in enumerate(QUERIES)]
    plain = [
        GenerationRequest(f"user{i}", q, steering=engine.steering.with_(enabled=False))
        for i, q in enumerate(QUERIES)
    ]
    engine.generate(steered, options)  # warm-up (caches dictionaries, allocator)
    engine.generate(plain, options)
    plain_times, steered_times = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        plain_times.append(_median_time(lambda: engine.generate(plain, options), 1))
        steered_times.append(_median_time(lambda: engine.generate(steered, options), 1))
    assert all(r.steered for r in engine.generate(steered[:1], options))
    return statistics.median(plain_times), statistics.median(steered_times)


def extraction_cost(
    model: LoadedModel,
    encoder: SentenceTransformerEncoder,
    items: list[HistoryItem],
    pool: list[HistoryItem],
    repeats: int,
) -> tuple[float, float]:
    """Seconds per item: (full extraction, one plain forward over prompt + target)."""
    config = ExtractionConfig(sites=default_sites(model.num_layers), batch_size=8)
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

    extract()
    plain_forward()
    t_extract = _median_time(extract, repeats) / len(items)
    t_forward = _median_time(plain_forward, repeats) / len(items)
    return t_extract, t_forward


def retrieval_time(model: LoadedModel, meta: DictionaryMeta, repeats: int) -> tuple[float, float]:
    """Milliseconds per query: (one query alone, a batch of 8 users' queries)."""
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

    one()
    batch()
    single = _median_time(one, repeats * 20) * 1000
    batched = _median_time(batch, repeats * 20) * 1000 / 8
    return single, batched


def run_perf(
    model_name: str | None = None,
    *,
    dtype: str = "auto",
    repeats: int = 5,
    max_new_tokens: int = 32,
    console: Console | None = None,
) -> list[Figure]:
    console = console or Console()
    model = load_model(model_name, dtype=dtype)
    encoder = SentenceTransformerEncoder()
    torch.set_num_threads(torch.get_num_threads())
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
        for u in range(8):
            store.add_items(
                "default",
                f"user{u}",
                [HistoryItem(f"q{u}-{i}", f"a{u}-{i}", f"e{i}") for i in range(50)],
            )
            store.put_entries("default", f"user{u}", meta, _random_entries(model, meta, 50, u))

        with console.status("timing steered vs plain generation (batch of 8 users)"):
            plain, steered = generation_overhead(engine, repeats, max_new_tokens)
        overhead = steered / plain - 1
        figures.append(Figure("generation, plain (batch 8)", plain, "s", "", True))
        figures.append(Figure("generation, steered (batch 8, 8 users)", steered, "s", "", True))
        figures.append(Figure("steering overhead", overhead * 100, "%", "<= 5 %", overhead <= 0.05))

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
    figures.append(Figure("extraction per item", t_extract * 1000, "ms", "", True))
    figures.append(Figure("plain forward per item", t_forward * 1000, "ms", "", True))
    figures.append(
        Figure(
            "extraction / forward",
            t_extract / t_forward,
            "x",
            "<= 2.5 x",
            t_extract / t_forward <= 2.5,
        )
    )

    with console.status("timing retrieval + aggregation over 1,000 entries"):
        single, batched = retrieval_time(model, meta, repeats)
    figures.append(Figure("retrieval + aggregation, 1 query", single, "ms", "< 2 ms", single < 2))
    figures.append(
        Figure(
            "retrieval + aggregation, per query in a batch of 8",
            batched,
            "ms",
            "< 2 ms",
            batched < 2,
        )
    )

    table = Table(
        title=f"fints perf on {model.name} ({str(model.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, {max_new_tokens} new tokens)"
    )
    for column in ("measure", "value", "target", ""):
        table.add_column(column)
    for f in figures:
        mark = "" if not f.target else ("[green]ok[/]" if f.ok else "[red]missed[/]")
        table.add_row(f.name, f"{f.value:.3f} {f.unit}", f.target, mark)
    console.print(table)
    return figures
