"""Probe: how well does a per-user style classifier (recipe b of ``fints guidance
train-style``) tell a headline author's own headlines from other authors'?

Headlines, the ``--authors`` authors with the most history (``load_headlines``'s
split). Per author: the author's history headlines (class = the author) against as
many other authors' history headlines (class ``other``), a fifth of each side held
out (:func:`fints.guidance.recipes.style_texts`); a head on SmolLM2's first
``--layers`` layers (frozen), as ``fints guidance train-style`` trains it. Reports the
held-out text accuracy per author (chance about 50%) and the training time, beside a
TF-IDF + logistic regression classifier (the benchmark's judge) on the same split.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_style_probe.py --authors 8
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from fints.benchmark.metrics import TextClassifier
from fints.benchmark.tasks import load_headlines
from fints.guidance.classifier import Backbone
from fints.guidance.recipes import style_texts
from fints.guidance.training import TrainConfig, train_classifier
from fints.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/news_headlines.jsonl")
    parser.add_argument("--authors", type=int, default=8)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = load_headlines(Path(args.data))
    users = sorted(task.users.values(), key=lambda u: (-len(u.history), u.user))
    chosen = users[: args.authors]
    backbone = Backbone(load_model(dtype="float32"), args.layers, owned=True)
    rng = random.Random(args.seed)
    print("| author | own | held-out texts | text accuracy | token accuracy | TF-IDF | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    accuracies, tfidf = [], []
    for split in chosen:
        own = [i.output for i in split.history]
        pool = [i.output for u in users if u.user != split.user for i in u.history]
        others = rng.sample(pool, min(len(own), len(pool)))
        train, test = style_texts(own, others, split.user, seed=args.seed)
        began = time.perf_counter()
        clf = train_classifier(
            "style", backbone, train, test, TrainConfig(max_tokens=32, epochs=args.epochs)
        )
        held = clf.config.metrics["test"]
        accuracies.append(held["text_accuracy"])
        judge = TextClassifier(args.seed).fit(train.texts, train.labels)
        tfidf.append(float(judge.hit_rate(test.texts, test.labels).mean()))
        print(
            f"| {split.user[:40]} | {len(own)} | {held['texts']} | {held['text_accuracy']:.1%} "
            f"| {held['token_accuracy']:.1%} | {tfidf[-1]:.1%} "
            f"| {time.perf_counter() - began:.0f} |",
            flush=True,
        )
    print(
        f"\nmean held-out text accuracy over {len(chosen)} authors: "
        f"{statistics.mean(accuracies):.1%} (TF-IDF: {statistics.mean(tfidf):.1%})"
    )


if __name__ == "__main__":
    main()
