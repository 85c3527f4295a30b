"""What a tenant's first builds cost with the default extraction method (trained vectors):
four users added one after the other to a fresh store through ``Personalizer.add_history``
with every default, then one new item; wall and process CPU time of each call.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/first_build.py --users headlines
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fints import HistoryItem, Personalizer, Store, load_model
from fints.demo import DEMO_USERS, demo_data_dir
from fints.history import read_history

DATA = Path("/work/shared/data/news_headlines.jsonl")


def headline_users(path: Path, users: int, items: int) -> dict[str, list[HistoryItem]]:
    """The first ``users`` authors (by name) with >= 20 articles: their first ``items``."""
    by_author: dict[str, list[dict[str, str]]] = {}
    for line in path.open():
        record = json.loads(line)
        if record.get("authors"):
            by_author.setdefault(record["authors"], []).append(record)
    names = sorted(a for a, rs in by_author.items() if len(rs) >= 20)[:users]
    return {
        f"u{k}": [
            HistoryItem(r["short_description"], r["headline"], f"i{n}")
            for n, r in enumerate(by_author[name][:items])
        ]
        for k, name in enumerate(names)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", choices=["headlines", "demo"], default="headlines")
    parser.add_argument("--data", type=Path, default=DATA, help="the news headlines JSONL")
    parser.add_argument("--items", type=int, default=16, help="items per headline author")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model()
    if args.users == "demo":
        users = {u: read_history(demo_data_dir() / f"{u}.jsonl") for u in DEMO_USERS}
    else:
        users = headline_users(args.data, 4, args.items)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "s.sqlite") as store:
        engine = Personalizer(model, store)
        sites = [str(s) for s in engine.extraction.sites]
        print(f"{model.name} {model.dtype}: {engine.extraction.method} at {sites}", flush=True)
        steps = [(f"user {n + 1} ({len(items)} items)", u, items) for n, (u, items) in
                 enumerate(users.items())]  # fmt: skip
        first = next(iter(users))
        steps.append(("one new item", first, [HistoryItem("A new question?", "A new answer.")]))
        for label, user, items in steps:
            wall, cpu = time.perf_counter(), time.process_time()
            engine.add_history(user, items)
            print(
                f"{label}: {time.perf_counter() - wall:.1f} s wall, "
                f"{time.process_time() - cpu:.1f} s CPU",
                flush=True,
            )


if __name__ == "__main__":
    main()
