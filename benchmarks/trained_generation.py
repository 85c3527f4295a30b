"""Generation for ``trained_probe.py --generate``: do the rows' answers read like the user?

Greedy answers (``--max-new-tokens``, the product's ``generate_batch`` with the row's
vectors added at the sites) to every test query under the rows in :data:`GENERATED`,
scored per query by ROUGE-1/L against the gold output and by an author-attribution
judge: the benchmark's TF-IDF classifier fitted on the evaluated authors' history
outputs (never on a test output), 1 where it names the query's author. Answers are
cached per row under ``--cache``.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from fints.benchmark.metrics import TextClassifier, rouge
from fints.generation import Decoration, GenerationOptions, generate_batch
from fints.injection import steer
from fints.models import LoadedModel
from fints.sites import Site

if TYPE_CHECKING:
    from trained_probe import Author, Row

#: The rows answered (generation is the slow part): the pre-registered comparisons.
GENERATED = ("none", "shared", "own", "wrong-user delta", "icl k=3 (own)")
METRICS = ("rouge1", "rougeL", "judge")


def answers(
    model: LoadedModel,
    authors: list[Author],
    sites: tuple[Site, ...],
    row: dict[str, Row],
    max_new_tokens: int,
    path: Path,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to every author's test queries (authors in order), cached."""
    if path.is_file():
        cached: list[str] = json.loads(path.read_text())
        return cached
    prompts = [p for a in authors for p in row[a.name][0]]
    vecs = [v for a in authors for v in row[a.name][1]]
    zero = torch.zeros(len(sites), model.hidden_size)
    stacked = torch.stack([zero if v is None else v for v in vecs])
    steered = any(v is not None for v in vecs)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    texts: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=path.stem, unit="batch"):
        chunk = stacked[start : start + batch_size]
        hooks = (
            steer(model.layout, {s: chunk[:, i] for i, s in enumerate(sites)})
            if steered
            else nullcontext()
        )
        done = generate_batch(
            model, prompts[start : start + batch_size], options, decorations=[Decoration(hooks)]
        )
        texts += [c.text for c in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts))
    return texts


def generation_scores(
    model: LoadedModel,
    authors: list[Author],
    sites: tuple[Site, ...],
    rows: dict[str, dict[str, Row]],
    max_new_tokens: int,
    cache: Path,
    tag: str,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[str]]]:
    """Per metric and row, ``[authors, queries]`` scores; and the answers per row."""
    references = [r for a in authors for r in a.references]
    truth = [a.name for a in authors for _ in a.references]
    judge = TextClassifier().fit(
        [i.output for a in authors for i in a.history], [a.name for a in authors for _ in a.history]
    )
    scores: dict[str, dict[str, np.ndarray]] = {m: {} for m in METRICS}
    texts = {}
    shape = (len(authors), -1)
    for label in GENERATED:
        name = hashlib.sha256(f"{tag}|{label}|{max_new_tokens}".encode()).hexdigest()[:16]
        texts[label] = answers(
            model, authors, sites, rows[label], max_new_tokens, cache / f"gen-{name}.json"
        )
        r = rouge(texts[label], references)
        scores["rouge1"][label] = r.rouge1.reshape(shape)
        scores["rougeL"][label] = r.rougeL.reshape(shape)
        scores["judge"][label] = judge.hit_rate(texts[label], truth).reshape(shape)
        print(
            f"{label}: " + ", ".join(f"{m} {scores[m][label].mean():.4f}" for m in METRICS),
            flush=True,
        )
    return scores, texts
