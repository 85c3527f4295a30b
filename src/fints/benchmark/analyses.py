"""The analyses a run adds beside its main table: vector diagnostics, user clusters and
the data-sparsity sweep."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fints.benchmark.banks import BenchContext
from fints.benchmark.labels import (
    REFERENCE_ICL_K,
    Kind,
    Label,
    Metric,
    Role,
    Source,
    Split,
)
from fints.benchmark.methods import MethodSpec
from fints.benchmark.metrics import TextClassifier
from fints.benchmark.runner import Row, Runner, compare, evaluate
from fints.benchmark.tasks import Task
from fints.sites import parse_sites


def diagnostics(ctx: BenchContext, spec: MethodSpec) -> dict[str, Any]:
    """Vector norms against the site's activation norm; within- vs across-user agreement."""
    sites = parse_sites(spec.sites)
    per_user = {u: ctx.bank(u, spec.contrast) for u in ctx.task.users}
    out: dict[str, Any] = {"contrast": spec.contrast}
    for site in sites:
        vecs, owners, ratios, mean_ratios = [], [], [], []
        for user, bank in per_user.items():
            idx = bank.index([site])[0]
            diffs = bank.differences[:, idx]
            norm = float(bank.site_norms[idx])
            ratios.append(float(diffs.norm(dim=-1).mean()) / norm)
            mean_ratios.append(float(diffs.mean(dim=0).norm()) / norm)
            vecs.append(diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            owners += [user] * len(diffs)
        unit = torch.cat(vecs)
        cos = unit @ unit.T
        same = torch.tensor([[a == b for b in owners] for a in owners])
        eye = torch.eye(len(owners), dtype=torch.bool)
        user_means = torch.stack([v.mean(dim=0) for v in vecs])
        user_means = user_means / user_means.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        between = user_means @ user_means.T
        off = ~torch.eye(len(vecs), dtype=torch.bool)
        out[str(site)] = {
            "item_vector_norm / site_norm": round(float(np.mean(ratios)), 4),
            "user_mean_vector_norm / site_norm": round(float(np.mean(mean_ratios)), 4),
            "cosine items same user": round(float(cos[same & ~eye].mean()), 4),
            "cosine items different users": round(float(cos[~same].mean()), 4),
            "cosine user-mean vectors across users": round(float(between[off].mean()), 4),
        }
    return out


def clusters(ctx: BenchContext, rows: Sequence[Row], k: int, seed: int) -> list[dict[str, Any]]:
    """Users grouped by KMeans on their mean history-output embedding; scores per group.

    Only none, the reference ICL row, the best Fints row and the controls are broken down.
    """
    from sklearn.cluster import KMeans

    users = sorted(ctx.task.users)
    if k < 2 or len(users) < 2 * k:
        return []
    emb = torch.stack(
        [ctx.encoder.encode([i.output for i in ctx.task.users[u].history]).mean(0) for u in users]
    ).numpy()
    assigned = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)
    group = dict(zip(users, assigned.tolist(), strict=True))
    queries = ctx.task.queries(Split.TEST)
    keep = {Label.NONE, Label.icl(REFERENCE_ICL_K), Label.BEST}
    keep |= {r.label for r in rows if r.role == Role.CONTROL}
    out = []
    for c in range(k):
        mask = np.array([group[q.user] == c for q in queries])
        for row in rows:
            if row.label not in keep:
                continue
            out.append(
                {
                    "cluster": c,
                    "users": sum(1 for g in group.values() if g == c),
                    "queries": int(mask.sum()),
                    "label": row.label,
                    Metric.ROUGE1: float(row.scores.rouge1[mask].mean()),
                    Metric.ROUGEL: float(row.scores.rougeL[mask].mean()),
                    Metric.JUDGE: float(row.judge_hits[mask].mean()),
                }
            )
    return out


def sparsity(
    base: Task,
    best: MethodSpec,
    judge: TextClassifier,
    runner_for: Callable[[Task], Runner],
    *,
    fractions: Sequence[float],
    sizes: Sequence[int],
) -> list[dict[str, Any]]:
    """Best Fints, its random control and ICL with less history per user (and with all).

    ``runner_for`` gives a runner over a task (each point's task has less history).
    """
    points: list[tuple[float | int, Task]] = [(f, base.with_history_fraction(f)) for f in fractions]
    points += [(n, base.with_history_size(n)) for n in sizes]
    if points:  # the whole history: the main run's rows, from the cache
        longest = max(len(u.history) for u in base.users.values())
        points.append((1.0 if fractions else longest, base))
    specs = [
        best,
        best.with_(label=Label.RANDOM_DIRECTION, vector_source=Source.RANDOM, role=Role.CONTROL),
        MethodSpec(
            Label.icl(REFERENCE_ICL_K), kind=Kind.ICL, icl_k=REFERENCE_ICL_K, role=Role.BASELINE
        ),
    ]
    none = MethodSpec(Label.NONE, role=Role.BASELINE)
    out = []
    for x, task in points:
        rows = evaluate(runner_for(task), [none, *specs], judge, nll=False)
        for row in rows[1:]:
            shown = f"{x:.0%}" if isinstance(x, float) else f"{x} items"
            delta = compare(row, rows[0], Metric.ROUGEL).interval()
            out.append(
                {
                    "history": shown,
                    "x": x,
                    "label": row.label,
                    **row.summary(),
                    "delta_rougeL": str(delta),
                }
            )
    return out
