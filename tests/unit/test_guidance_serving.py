"""Preferences over HTTP (the request's ``fints`` field), tiny random llama on loopback:
guided rows answer, bad preferences are 400s naming the problem before anything runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fints.engine import Personalizer
from fints.guidance.classifier import Backbone
from fints.guidance.library import ClassifierLibrary
from fints.guidance.mode import GuidanceMode
from fints.serving.app import ServerConfig, create_app
from fints.serving.inprocess import RunningServer
from fints.serving.payloads import Limits
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama
from tests.unit.guidance_fixtures import random_classifier

KEY = "guidance-key"
MODEL = "tiny-llama"
CONFIG = ServerConfig(
    limits=Limits(max_tokens=8, default_max_tokens=4, max_prompt_tokens=128),
    api_keys={KEY: "A"},
    extract_on_write=False,
    max_wait_ms=0,
)


STORES: dict[str, Store] = {}  # the module's server's store, by name


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_llama()
    tmp = tmp_path_factory.mktemp("guidance-serving")
    library = ClassifierLibrary(tmp / "classifiers")
    backbone = Backbone(model, layers=2)
    library.save(random_classifier(backbone, "mood", ("happy", "sad"), seed=1))
    foreign = random_classifier(backbone, "foreign", ("a", "b"), seed=2)
    folder = library.save(foreign)
    config = json.loads((folder / "classifier.json").read_text())
    (folder / "classifier.json").write_text(
        json.dumps({**config, "tokenizer_fingerprint": "f" * 32})
    )
    store = STORES["served"] = Store(Path(tmp) / "store.sqlite")
    engine = Personalizer(
        model, store, encoder=HashEncoder(), modes=("steering", GuidanceMode(library))
    )
    with RunningServer(create_app(engine, CONFIG)) as running:
        yield running
    store.close()
    torch.set_num_threads(threads)


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        yield http


def complete(client: httpx.Client, fints: dict[str, Any] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"model": MODEL, "prompt": "Tell me about cats", "max_tokens": 6}
    if fints is not None:
        body["fints"] = fints
    # "INF" stands for a number JSON can write (1e999) but that overflows to inf
    raw = json.dumps(body).replace('"INF"', "1e999")
    return client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_a_guided_request_answers_with_other_text(client: httpx.Client) -> None:
    plain = text(complete(client))
    happy = text(complete(client, {"preferences": {"mood": {"happy": 5.0}}}))
    sad = text(complete(client, {"preferences": {"mood": {"sad": 5.0}}}))
    topk = text(
        complete(
            client,
            {"preferences": {"mood": {"sad": 5.0}}, "guidance": {"method": "topk", "top_k": 1}},
        )
    )
    zero = text(complete(client, {"preferences": {"mood": {"happy": 0}}}))
    assert len({plain, happy, sad}) == 3
    assert topk == plain and zero == plain  # one candidate, or no weight: plain decoding


@pytest.mark.parametrize(
    ("fints", "words"),
    [
        ({"preferences": {"colour": {"red": 1}}}, ["unknown preference 'colour'", "mood"]),
        ({"preferences": {"mood": {"angry": 1}}}, ["unknown class 'angry'", "happy"]),
        ({"preferences": {"mood": {"happy": -0.5}}}, ["preferences.mood.happy", "finite"]),
        ({"preferences": {"mood": {"happy": "INF"}}}, ["preferences.mood.happy", "finite"]),
        ({"preferences": {"foreign": {"a": 1}}}, ["another tokenizer", "same vocabulary"]),
        ({"preferences": {"../etc": {"a": 1}}}, ["classifier name"]),
    ],
)
def test_bad_preferences_are_400s_naming_the_problem(
    client: httpx.Client, fints: dict[str, Any], words: list[str]
) -> None:
    response = complete(client, fints)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "fints.preferences", error
    assert all(w in error["message"] for w in words), error["message"]


def test_bad_guidance_settings_are_400s(client: httpx.Client) -> None:
    for how in ({"method": "beam"}, {"top_k": 0}, {"k": 3}):
        response = complete(client, {"preferences": {"mood": {"happy": 1}}, "guidance": how})
        assert response.status_code == 400, response.text
        assert "guidance" in response.json()["error"]["param"]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "INF", "x", True])
def test_a_bad_plausibility_constraint_is_a_400_naming_it(client: httpx.Client, bad: Any) -> None:
    how = {"method": "topk", "plausible": bad}
    response = complete(client, {"preferences": {"mood": {"happy": 1}}, "guidance": how})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "fints.guidance.plausible", response.text


def test_the_plausibility_constraint_over_http(client: httpx.Client) -> None:
    plain = text(complete(client))
    guided = {"preferences": {"mood": {"sad": 5.0}}}
    for how in ({"plausible": 1}, {"method": "topk", "top_k": 30, "plausible": 1.0}):
        assert text(complete(client, {**guided, "guidance": how})) == plain  # only the argmax
    assert text(complete(client, {**guided, "guidance": {"plausible": 0}})) == text(
        complete(client, guided)
    )


def test_own_style_without_enough_history_is_a_400(client: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 2,
        "fints": {"preferences": {"own-style": {"own": 0.5}}},
    }
    response = client.post("/v1/completions", json={**body, "user": "nobody"})
    assert response.status_code == 404 and "unknown user 'nobody'" in response.text
    one = {"items": [{"input": "q", "output": "a single answer"}]}
    assert client.post("/v1/users/lonely/interactions", json=one).status_code == 200
    response = client.post("/v1/completions", json={**body, "user": "lonely"})
    assert response.status_code == 400, response.text
    assert "'own-style' for user 'lonely' needs >= 2" in response.json()["error"]["message"]
    anonymous = client.post("/v1/completions", json=body)
    assert anonymous.status_code == 400 and "needs a user" in anonymous.text
    wrong = {**body, "fints": {"preferences": {"own-style": {"mine": 1}}}}
    response = client.post("/v1/completions", json={**wrong, "user": "nobody"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "fints.preferences"


def test_a_user_added_over_http_gets_own_style_without_a_training_step(
    client: httpx.Client,
) -> None:
    """The first request asking for 'own-style' trains the user's classifier."""
    for user, words in (("pirate", "arr matey"), ("prof", "indeed one notes")):
        items = [{"input": f"q{i}", "output": f"{words} {i} {words}"} for i in range(5)]
        added = client.post(f"/v1/users/{user}/interactions", json={"items": items})
        assert added.status_code == 200, added.text
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "user": "pirate"}
    guided = client.post(
        "/v1/completions", json={**body, "fints": {"preferences": {"own-style": {"own": 2}}}}
    )
    assert guided.status_code == 200, guided.text
    store = STORES["served"]
    assert (store.files_dir("A", "pirate") / "style" / "classifier.json").is_file()
    deleted = client.delete("/v1/users/pirate")
    assert deleted.status_code == 200 and not store.files_dir("A", "pirate").exists()
