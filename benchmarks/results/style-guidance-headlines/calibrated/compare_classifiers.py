"""One-off check (2026-12-03): the uncalibrated classifiers (first run's cache) and the
balanced, calibrated ones on each author's held-out fifth: balanced accuracy, class NLL,
log p(own | prefix, token). Run from the repo root: .venv/bin/python <this file>."""

import json
import random
import sys

sys.path.insert(0, "benchmarks")
from pathlib import Path

import numpy as np
import torch
from style_guidance_headlines import tag

from fints.benchmark.tasks import load_headlines
from fints.guidance.classifier import Backbone, load_classifier
from fints.guidance.recipes import style_texts
from fints.guidance.training import (
    class_nll,
    class_weights,
    compute_features,
    encode_texts,
    evaluate,
    token_logits,
)
from fints.guidance.user_style import OWN, StyleSettings, style_layers
from fints.models import load_model

torch.set_num_threads(1)
cache = Path("benchmarks/results/style-guidance-headlines/cache")
task = load_headlines(Path("../shared/data/news_headlines.jsonl"))
model = load_model()
s = StyleSettings()
backbone = Backbone(model, style_layers(model, s))
old_repr = "StyleSettings(layers=10, epochs=8, max_tokens=48, max_others=256, seed=0)"
old_base = tag(model.fingerprint, task.sha256, old_repr, "all authors' history as others")
new_base = tag(
    model.fingerprint, task.sha256, s, s.train_config().to_dict(), "all authors' history as others"
)
names = json.loads(Path("benchmarks/results/style-guidance-headlines/results.json").read_text())[
    "authors"
]
rows = {}
for name in names:
    own = [i.output for i in task.users[name].history]
    pool = sorted(i.output for n, u in task.users.items() if n != name for i in u.history)
    others = random.Random(f"{s.seed}-{name}").sample(pool, min(s.max_others, len(pool)))
    _, test = style_texts(own, others, OWN, seed=s.seed)
    out = {}
    for kind, base in (("old", old_base), ("new", new_base)):
        clf = load_classifier(cache / f"clf-{tag(base, name)}", backbone)
        index = {c: n for n, c in enumerate(clf.classes)}
        held = compute_features(
            backbone,
            encode_texts(backbone.tokenizer, test.texts, 48),
            [index[c] for c in test.labels],
        )
        logits = token_logits(clf.head, clf.embeddings, held)
        w = class_weights(held.labels, 2, True)
        lp = (logits / clf.temperature).log_softmax(-1)
        o = index[OWN]
        out[kind] = {
            **evaluate(clf.head, clf.embeddings, held, clf.temperature),
            "T": clf.temperature,
            "nll_balanced": class_nll(logits, held.labels, w, clf.temperature),
            "nll_plain": class_nll(logits, held.labels, None, clf.temperature),
            "logp_own_on_own": float(lp[held.labels == o, o].mean()),
            "logp_own_on_own_median": float(lp[held.labels == o, o].median()),
            "logp_own_on_other": float(lp[held.labels != o, o].mean()),
        }
    rows[name] = out
    print(name, json.dumps(out), flush=True)
summary = {
    k: {m: float(np.mean([r[k][m] for r in rows.values()])) for m in rows[names[0]][k]}
    for k in ("old", "new")
}
print(json.dumps(summary, indent=1))
OUT = Path("benchmarks/results/style-guidance-headlines/calibrated/classifiers_old_vs_new.json")
OUT.write_text(json.dumps({"per_author": rows, "mean": summary}, indent=1))
