"""The server with per-user LoRA adapters (tiny llama over loopback HTTP): a user with an
adapter is served with it, and the request's ``fints`` field switches adapter and
steering on or off; asking for an adapter a user lacks is a 400 for that request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fints.adapters.storage import AdapterStore
from fints.engine import GenerationRequest, Personalizer
from fints.generation import GenerationOptions
from fints.serving.app import ServerConfig, create_app
from fints.serving.inprocess import RunningServer
from fints.serving.payloads import Limits
from fints.steering import SteeringConfig
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama
from tests.unit.lora_fixtures import store_user_adapter, train_user
from tests.unit.test_modes import imported_user

CONFIG = ServerConfig(
    limits=Limits(max_tokens=8, default_max_tokens=5, max_prompt_tokens=128),
    extract_on_write=False,
    max_wait_ms=0,
)
QUERY = "alice wrote about topic 2"
OPTIONS = GenerationOptions(max_new_tokens=5)


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.model = tiny_llama()
        self.store = Store(tmp / "store.sqlite")
        self.engine = Personalizer(self.model, self.store, encoder=HashEncoder())
        for seed, user in enumerate(("alice", "bob")):
            self.engine.import_dictionary(imported_user(self.model, user, seed))
        store_user_adapter(
            AdapterStore(self.store, self.model), "alice", train_user(self.model, "alice")
        )

    def expected(self, **kwargs: Any) -> str:
        return self.engine.generate([GenerationRequest("alice", QUERY, **kwargs)], OPTIONS)[0].text


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    made = Setup(tmp_path_factory.mktemp("lora-serving"))
    yield made
    made.store.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(setup: Setup) -> Iterator[httpx.Client]:
    with (
        RunningServer(create_app(setup.engine, CONFIG)) as running,
        httpx.Client(base_url=running.url, timeout=120) as http,
    ):
        yield http


def chat(client: httpx.Client, user: str, **fints: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": QUERY}],
        "max_tokens": 5,
        "user": user,
    }
    if fints:
        body["fints"] = fints
    return client.post("/v1/chat/completions", json=body)


def answer(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    data = response.json()
    return data["choices"][0]["message"]["content"], data["fints"]


def test_a_user_with_an_adapter_is_served_with_it(setup: Setup, client: httpx.Client) -> None:
    text, info = answer(chat(client, "alice"))
    assert info["adapter"] == "alice" and info["steered"]
    assert text == setup.expected()


def test_the_request_switches_the_adapter_off(setup: Setup, client: httpx.Client) -> None:
    text, info = answer(chat(client, "alice", adapter=False))
    assert info["adapter"] is None and info["steered"]
    assert text == setup.expected(adapter=False)
    # the adapter changes the answer (seen without steering, whose vectors are strong)
    plain = answer(chat(client, "alice", adapter=False, enabled=False))[0]
    assert plain != answer(chat(client, "alice", enabled=False))[0]


def test_the_request_switches_steering_off_and_keeps_the_adapter(
    setup: Setup, client: httpx.Client
) -> None:
    text, info = answer(chat(client, "alice", enabled=False))
    assert info["adapter"] == "alice" and not info["steered"]
    assert text == setup.expected(steering=SteeringConfig(enabled=False))


def test_requiring_an_adapter_a_user_lacks_is_a_400(client: httpx.Client) -> None:
    response = chat(client, "bob", adapter=True)
    assert response.status_code == 400
    assert "no LoRA adapter" in response.json()["error"]["message"]
    _, info = answer(chat(client, "bob"))  # without asking: served, no adapter
    assert info["adapter"] is None and info["steered"]


def test_the_adapter_switch_must_be_a_boolean(client: httpx.Client) -> None:
    response = chat(client, "alice", adapter="yes")
    assert response.status_code == 400
