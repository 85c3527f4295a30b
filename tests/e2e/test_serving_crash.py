"""Durability: ``kill -9`` the server while clients write; no acknowledged write is lost.

The server runs as a real subprocess (``python -m fints.serving``) with
``--no-extract-on-write`` so that writes are fast and many are in flight when
it dies. Every POST adds two items; neither a torn batch nor a corrupt store
may survive the crash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fints.store import Store

pytestmark = pytest.mark.slow

WRITERS = 4
ACKED_BEFORE_KILL = 60  # acknowledged items, so that the kill lands amid writes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(store: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    command = [
        sys.executable, "-m", "fints.serving", "--store", str(store), "--port", str(port),
        "--no-extract-on-write", "--threads", "1", "--log-level", "warning",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "FINTS_API_KEYS"}  # single-tenant
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "server did not become healthy"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def item(writer: int, n: int, part: str) -> dict[str, str]:
    return {
        "id": f"{writer}-{n}-{part}",
        "input": f"question {writer}-{n}-{part}",
        "output": f"answer {writer}-{n}-{part} " + "lorem ipsum " * 20,
    }


def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    store, log = tmp_path / "crash.sqlite", tmp_path / "server.log"
    acked: dict[str, list[str]] = {f"writer-{w}": [] for w in range(WRITERS)}
    refused: list[str] = []  # a write answered with an error (a thread cannot fail the test)
    lock = threading.Lock()

    with server_process(store, log) as (proc, url):

        def write(writer: int) -> None:
            user = f"writer-{writer}"
            with httpx.Client(base_url=url, timeout=30) as client:
                for n in range(100_000):
                    body = {"items": [item(writer, n, "a"), item(writer, n, "b")]}
                    try:
                        response = client.post(f"/v1/users/{user}/interactions", json=body)
                    except httpx.HTTPError:
                        return  # the server is gone
                    with lock:
                        if response.status_code != 200:
                            refused.append(f"{user}: {response.status_code} {response.text}")
                            return
                        acked[user].extend(response.json()["ids"])

        threads = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 600  # a hang guard, not a speed requirement
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            with lock:
                if sum(map(len, acked.values())) >= ACKED_BEFORE_KILL:
                    break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-way: requests are in flight
        proc.wait(timeout=30)
        for thread in threads:
            thread.join(timeout=60)
    assert not refused, refused
    total = sum(map(len, acked.values()))
    assert total >= ACKED_BEFORE_KILL, f"only {total} writes were acknowledged before the kill"

    with server_process(store, log) as (_proc, url):
        for user, ids in acked.items():
            listed = httpx.get(f"{url}/v1/users/{user}/interactions", timeout=30)
            assert listed.status_code == 200, listed.text
            assert set(ids) <= {d["id"] for d in listed.json()["data"]}

    with Store(store) as reopened:
        assert reopened.integrity_check() == []
        for user, ids in acked.items():
            stored = [i.item_id for i in reopened.items("default", user)]
            assert set(ids) <= set(stored)
            halves = {i.rsplit("-", 1)[0] for i in stored}
            assert len(stored) == 2 * len(halves), f"{user} has a torn batch: {stored}"
