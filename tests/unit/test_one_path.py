"""One steering path: the benchmark's Fints row and the HTTP server produce the same tokens
for the same user, query, dictionary and settings (a tiny random llama, loopback HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fints.benchmark.banks import BenchContext, benchmark_sites
from fints.benchmark.methods import MethodSpec, make_method
from fints.benchmark.tasks import Query, Task
from fints.dictionary import UserDictionary
from fints.engine import Personalizer
from fints.generation import GenerationOptions
from fints.models import LoadedModel
from fints.serving.app import ServerConfig, create_app
from fints.serving.inprocess import RunningServer
from fints.sites import parse_sites
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, fixture_task, tiny_llama

NEW_TOKENS = 6
FINTS = MethodSpec(
    "fints", kind="fints", sites="1.attn+mlp", strength=0.8, relative=True, top_k=2, tau=0.1
)
#: The same settings as the request's ``fints`` field.
REQUEST_STEERING = {
    "sites": "1.attn+mlp",
    "strengths": {"attn": 0.8, "mlp": 0.8},
    "relative": True,
    "top_k": 2,
    "aggregation": "attentive",
    "tau": 0.1,
}


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.model: LoadedModel = tiny_llama()
        self.encoder = HashEncoder()
        self.task: Task = fixture_task(max_history=4, max_new_tokens=NEW_TOKENS, n_test=2)
        sites = benchmark_sites(self.model.num_layers, (1,))
        self.ctx = BenchContext(
            self.model, self.encoder, self.task, sites, tmp / "cache", progress=False
        )
        self.queries: list[Query] = self.task.queries("test")[:4]
        self.store = Store(tmp / "store.sqlite")
        self.personalizer = Personalizer(
            self.model, self.store, encoder=self.encoder, template=self.task.template
        )
        # the server holds exactly the benchmark's dictionaries
        for user in sorted({q.user for q in self.queries}):
            bank = self.ctx.bank(user, "context")
            whole = bank.dictionary(parse_sites(FINTS.sites))
            history = self.task.users[user].history
            self.personalizer.import_dictionary(
                UserDictionary(
                    user, whole.meta, whole.item_ids, whole.keys, whole.vectors, list(history)
                ),
                user=user,
            )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    made = Setup(tmp_path_factory.mktemp("one-path"))
    yield made
    made.store.close()


@pytest.fixture(scope="module")
def server(setup: Setup) -> Iterator[RunningServer]:
    with RunningServer(create_app(setup.personalizer, ServerConfig())) as running:
        yield running


def chat(server: RunningServer, query: Query, steering: dict[str, object]) -> dict:
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": query.input}],
        "user": query.user,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "fints": steering,
    }
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def bench_row(setup: Setup, spec: MethodSpec, query: Query) -> tuple[str, int]:
    completion = make_method(spec).generate(  # type: ignore[attr-defined]
        [query], setup.ctx, GenerationOptions(max_new_tokens=NEW_TOKENS)
    )[0]
    return completion.text, len(completion.token_ids)


def test_the_benchmark_fints_row_and_the_server_produce_the_same_tokens(
    setup: Setup, server: RunningServer
) -> None:
    for query in setup.queries:
        served = chat(server, query, REQUEST_STEERING)
        text, tokens = bench_row(setup, FINTS, query)
        assert served["fints"]["steered"] is True
        assert served["choices"][0]["message"]["content"] == text
        assert served["usage"]["completion_tokens"] == tokens


def test_both_retrieve_the_same_entries(setup: Setup, server: RunningServer) -> None:
    method = make_method(FINTS)
    for query in setup.queries:
        plan = method.plan([query], setup.ctx)  # type: ignore[attr-defined]
        served = chat(server, query, REQUEST_STEERING)
        assert plan is not None
        assert served["fints"]["retrieved"] == list(plan.retrieved[0])


def test_steering_changes_the_tokens_so_the_comparison_can_fail(
    setup: Setup, server: RunningServer
) -> None:
    """Unsteered rows agree too, and differ from the steered ones for some query."""
    plain_spec = MethodSpec("none")
    changed = 0
    for query in setup.queries:
        plain = chat(server, query, {"enabled": False})["choices"][0]["message"]["content"]
        assert plain == bench_row(setup, plain_spec, query)[0]
        changed += plain != bench_row(setup, FINTS, query)[0]
    assert changed > 0
