"""Kill -9 a store writer at random points of many writes; nothing acknowledged is lost.

Each round starts a writer process on the same SQLite store. It adds batches of history
items to random users, stores a dictionary entry for every item (vectors derived from the
item's id, so their bytes can be checked), and now and then forgets a user. After each
write returns it appends the write to an acknowledgement log and fsyncs it: a line there
means the store had acknowledged the write. The round kills the writer with SIGKILL at a
random moment, reopens the store (recovery) and checks:

* every acknowledged item is there with its texts, and every acknowledged entry with its
  exact vectors (0 acknowledged items lost);
* no batch is torn (all of its items or none), ``integrity_check()`` is empty and every
  user's dictionary loads and matches (0 corrupt users);
* a forgotten user stays forgotten (unless a later write brought it back).

    python benchmarks/chaos.py --rounds 120          # the issue's >= 100 kills

The test suite runs a few rounds (``tests/e2e/test_hardening_chaos.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TENANT = "chaos"
USERS = 6
FINGERPRINT = "chaos-model"
HIDDEN, KEY_DIM = 8, 4


@dataclass
class ChaosReport:
    rounds: int = 0
    kills: int = 0
    acknowledged_items: int = 0
    acknowledged_entries: int = 0
    acknowledged_deletes: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged but missing or changed
    corrupt: list[str] = field(default_factory=list)  # users failing a check

    def render(self) -> str:
        return (
            f"{self.kills} kill -9 in {self.rounds} rounds; acknowledged: "
            f"{self.acknowledged_items} items, {self.acknowledged_entries} entries, "
            f"{self.acknowledged_deletes} user deletions; lost: {len(self.lost)}; "
            f"corrupt users: {len(self.corrupt)}"
            + "".join(f"\n  lost {x}" for x in self.lost[:10])
            + "".join(f"\n  corrupt {x}" for x in self.corrupt[:10])
        )


# -- the writer (a child process) ---------------------------------------------------------


def vectors_for(item_id: str) -> tuple[list[float], list[float]]:
    """The key and the vectors of an item's entry: derived from its id alone."""
    digest = hashlib.sha256(item_id.encode()).digest()
    values = [(b - 128) / 16 for b in digest]
    return values[:KEY_DIM], values[KEY_DIM : KEY_DIM + HIDDEN]


def writer(store_path: str, log_path: str, seed: int) -> None:
    import torch

    from fints.dictionary import DictionaryEntry, DictionaryMeta
    from fints.history import HistoryItem
    from fints.sites import parse_sites
    from fints.steering import SteeringVector
    from fints.store import Store

    sites = parse_sites("1.block")
    meta = DictionaryMeta(FINGERPRINT, "m", sites, HIDDEN, "enc", KEY_DIM, "generic", "float32")
    rng = random.Random(seed)
    store = Store(store_path)
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (open until killed)

    def ack(record: dict[str, Any]) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())

    print("ready", flush=True)
    for n in range(10**9):
        user = f"user-{rng.randrange(USERS)}"
        if rng.random() < 0.04 and store.has_user(TENANT, user):
            ack({"intent": "delete", "user": user})
            store.delete_user(TENANT, user)
            ack({"deleted": user})
            continue
        size = rng.randrange(1, 5)
        ids = [f"{seed}-{n}-{k}of{size}" for k in range(size)]
        items = [
            HistoryItem(f"question {i}", f"answer {i} " + "words " * rng.randrange(60), i)
            for i in ids
        ]
        store.add_items(TENANT, user, items)
        ack({"user": user, "items": {i.item_id: [i.input, i.output] for i in items}})
        entries = []
        for i in ids:
            key, values = vectors_for(i)
            vector = SteeringVector(sites, torch.tensor([values]))
            entries.append(DictionaryEntry(i, torch.tensor(key), vector))
        store.put_entries(TENANT, user, meta, entries)
        ack({"user": user, "entries": ids})


# -- the controller -----------------------------------------------------------------------


@dataclass
class Expected:
    """What the acknowledgement log says each user must hold."""

    items: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    entries: dict[str, set[str]] = field(default_factory=dict)
    pending_delete: str | None = None


def replay(lines: list[str], expected: Expected, report: ChaosReport) -> None:
    for line in lines:
        record = json.loads(line)
        if "intent" in record:
            expected.pending_delete = record["user"]
        elif "deleted" in record:
            expected.items.pop(record["deleted"], None)
            expected.entries.pop(record["deleted"], None)
            expected.pending_delete = None
            report.acknowledged_deletes += 1
        elif "items" in record:
            expected.items.setdefault(record["user"], {}).update(
                {k: (v[0], v[1]) for k, v in record["items"].items()}
            )
            report.acknowledged_items += len(record["items"])
        else:
            expected.entries.setdefault(record["user"], set()).update(record["entries"])
            report.acknowledged_entries += len(record["entries"])


def verify(store_path: Path, expected: Expected, report: ChaosReport, round_: int) -> None:
    import torch

    from fints.store import Store

    with Store(store_path) as store:
        problems = store.integrity_check()
        if problems:
            report.corrupt.append(f"round {round_}: integrity_check: {problems[:3]}")
        users = set(store.users(TENANT))
        pending = expected.pending_delete
        if pending is not None and pending not in users:  # the delete committed, unacknowledged
            expected.items.pop(pending, None)
            expected.entries.pop(pending, None)
        expected.pending_delete = None
        for user, items in expected.items.items():
            if user not in users:
                report.lost += [f"round {round_}: {user}/{i}" for i in items]
                continue
            stored = {i.item_id: (i.input, i.output) for i in store.items(TENANT, user)}
            report.lost += [
                f"round {round_}: {user}/{i}" for i, t in items.items() if stored.get(i) != t
            ]
        for user in sorted(users):
            stored_ids = [i.item_id for i in store.items(TENANT, user)]
            batches: dict[str, set[str]] = {}
            for item_id in stored_ids:
                prefix, _, part = item_id.rpartition("-")
                batches.setdefault(f"{prefix}-{part.partition('of')[2]}", set()).add(part)
            torn = [b for b, parts in batches.items() if len(parts) != int(b.rpartition("-")[2])]
            try:
                dictionary = store.dictionary(TENANT, user, FINGERPRINT)
            except Exception as exc:
                report.corrupt.append(f"round {round_}: {user}: dictionary: {exc}")
                continue
            wrong = []
            if dictionary is not None:
                for n, item_id in enumerate(dictionary.item_ids):
                    _key, values = vectors_for(item_id)
                    if not torch.equal(dictionary.vectors[n, 0], torch.tensor(values)):
                        wrong.append(item_id)
                    if item_id not in stored_ids:
                        wrong.append(f"{item_id} (entry without item)")
            found = set(dictionary.item_ids) if dictionary is not None else set()
            missing = expected.entries.get(user, set()) - found
            report.lost += [f"round {round_}: {user}/{i} (entry)" for i in sorted(missing)]
            if torn or wrong:
                report.corrupt.append(f"round {round_}: {user}: torn {torn} wrong {wrong[:3]}")


def run_chaos(
    rounds: int, workdir: Path, *, seed: int = 0, min_s: float = 0.05, max_s: float = 0.8
) -> ChaosReport:
    """``rounds`` writer processes, each killed with SIGKILL at a random moment."""
    store_path, log_path = workdir / "chaos.sqlite", workdir / "acks.jsonl"
    rng = random.Random(seed)
    report, expected = ChaosReport(), Expected()
    read = 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for round_ in range(rounds):
        command = [sys.executable, __file__, "--writer", str(store_path), str(log_path)]
        command += ["--seed", str(seed * 100_000 + round_)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.kill()
            raise RuntimeError(f"round {round_}: the writer did not start")
        time.sleep(rng.uniform(min_s, max_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        report.kills += proc.returncode == -signal.SIGKILL
        report.rounds += 1
        lines = log_path.read_text(encoding="utf-8").splitlines() if log_path.exists() else []
        complete = [x for x in lines[read:] if x.endswith("}")]  # a torn last line was never acked
        replay(complete, expected, report)
        read = len(lines)
        verify(store_path, expected, report, round_)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="keep the store and the log here")
    parser.add_argument("--writer", nargs=2, metavar=("STORE", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer(args.writer[0], args.writer[1], args.seed)
        return
    began = time.perf_counter()
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        report = run_chaos(args.rounds, args.dir, seed=args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="fints-chaos-") as tmp:
            report = run_chaos(args.rounds, Path(tmp), seed=args.seed)
    print(report.render())
    print(f"{time.perf_counter() - began:.0f} s")
    sys.exit(1 if report.lost or report.corrupt or report.kills < args.rounds else 0)


if __name__ == "__main__":
    main()
