"""A bounded, seeded schemathesis run of the HTTP API (issue 25) over loopback: every
operation of the server's own OpenAPI document, inputs that match the schema and inputs
that do not. No 5xx, every status and body as the document says (status codes, content
types, response schemas). The tiny random llama keeps it fast; the server code is the
same. ``FINTS_FUZZ_EXAMPLES`` raises the count (``benchmarks/api_fuzz.py`` runs it big)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from benchmarks.api_fuzz import fuzz_api
from fints.engine import Personalizer
from fints.serving.app import ServerConfig, create_app
from fints.serving.inprocess import RunningServer
from fints.serving.payloads import Limits
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("FINTS_FUZZ_EXAMPLES", "12"))  # per operation and mode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = Store(tmp_path_factory.mktemp("fuzz") / "store.sqlite")
    personalizer = Personalizer(tiny_llama(), store, encoder=HashEncoder())
    config = ServerConfig(
        limits=Limits(max_tokens=4, default_max_tokens=2, max_prompt_tokens=256),
        extract_on_write=False,
        max_wait_ms=0,
    )
    with RunningServer(create_app(personalizer, config)) as running:
        yield running
    store.close()
    torch.set_num_threads(threads)


def test_the_api_answers_every_generated_input_as_documented(server: RunningServer) -> None:
    report = fuzz_api(server.url, examples=EXAMPLES, seed=25)
    assert report.failures == [], "\n".join(report.failures[:10])
    assert report.server_errors == 0
    assert report.total >= EXAMPLES * 8  # every operation ran, in both modes
    assert {"400", "200"} <= set(report.by_status)
