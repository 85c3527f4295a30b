"""The abusive client of ``fints loadtest --scenario abusive``, a process of its own.

Run by path (``python .../abuser.py CONFIG_JSON``; it imports nothing of fints, so it
starts in a fraction of a second): its HTTP work is not done in the server's process, as
a real client's is not. ``threads`` threads send the same chat request back to back
(after a 429 they wait ``pause_s``: a client that ignores Retry-After, nearly) until the
process's standard input closes; then it prints ``{status: count}`` as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from typing import Any

import httpx


def abuse(config: dict[str, Any], stop: threading.Event) -> Counter[int]:
    """Send ``config["body"]`` to ``config["url"]`` from ``config["threads"]`` threads until
    ``stop`` is set; the statuses answered."""
    counts: Counter[int] = Counter()
    lock = threading.Lock()
    headers = {"authorization": f"Bearer {config['key']}"}

    def client() -> None:
        with httpx.Client(base_url=config["url"], headers=headers, timeout=600) as http:
            while not stop.is_set():
                status = http.post("/v1/chat/completions", json=config["body"]).status_code
                with lock:
                    counts[status] += 1
                if status == 429:
                    time.sleep(config["pause_s"])

    threads = [threading.Thread(target=client) for _ in range(config["threads"])]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()
    return counts


def main(argv: list[str]) -> int:
    stop = threading.Event()
    done: list[Counter[int]] = []
    runner = threading.Thread(target=lambda: done.append(abuse(json.loads(argv[1]), stop)))
    runner.start()
    sys.stdin.read()  # until the parent closes it
    stop.set()
    runner.join()
    print(json.dumps(done[0] if done else {}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
