"""The server over real HTTP on loopback, with the real SmolLM2 model, via httpx and openai.

One model and one store for the module; servers run in-process on ephemeral
ports (:class:`fints.serving.inprocess.RunningServer`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from fints.engine import Personalizer, UnknownUser
from fints.extraction import ExtractionConfig
from fints.models import load_model
from fints.serving.app import ServerConfig, create_app
from fints.serving.inprocess import RunningServer
from fints.serving.payloads import Limits
from fints.store import Store

pytestmark = pytest.mark.slow

KEY_A, KEY_B = "test-key-tenant-a", "test-key-tenant-b"
MODEL = "smollm2"
STRONG = {"relative": True, "strengths": {"attn": 4.0, "mlp": 4.0}}  # visibly steered
PIRATE = [
    {"input": "Tell me about cats.", "output": "Arr matey! Cats be fine treasure, yo ho ho!"},
    {"input": "Tell me about rain.", "output": "Arr! Rain be the sea falling on ye, savvy?"},
]
FORMAL = [
    {"input": "Tell me about cats.", "output": "Dear reader, cats merit courteous regard."},
    {"input": "Tell me about rain.", "output": "Rain, dear reader, deserves due consideration."},
]
CONFIG = ServerConfig(
    limits=Limits(max_tokens=32, default_max_tokens=8, max_prompt_tokens=256),
    api_keys={KEY_A: "A", KEY_B: "B"},
)


@pytest.fixture(scope="module")
def personalizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Personalizer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread avoids oversubscription
    store = Store(tmp_path_factory.mktemp("serving") / "store.sqlite")
    # float32: batched and solo greedy decoding agree exactly; the context contrast keeps
    # writes quick (a tenant's first trained build takes minutes: tests/unit cover it)
    model = load_model(dtype="float32")
    extraction = ExtractionConfig.for_model(model.num_layers, method="context")
    yield Personalizer(model, store, extraction=extraction)
    store.close()
    torch.set_num_threads(threads)


def _vllm_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is None


ENGINES = [
    "transformers",
    pytest.param(
        "vllm",
        marks=pytest.mark.skipif(
            _vllm_missing(), reason="vLLM is not installed: `make install-vllm` runs these tests"
        ),
    ),
]


@pytest.fixture(scope="module", params=ENGINES)
def server(personalizer: Personalizer, request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """The same tests on each generation engine (the store is shared: writes of the first
    engine's run are there for the second)."""
    with RunningServer(create_app(personalizer, replace(CONFIG, engine=request.param))) as running:
        yield running


@pytest.fixture(scope="module")
def alice_ids(server: RunningServer) -> dict[str, list[str]]:
    """The same user name in tenants A (pirate) and B (formal), extracted on write."""
    ids = {}
    for key, tenant, items in ((KEY_A, "A", PIRATE), (KEY_B, "B", FORMAL)):
        response = call(server, "POST", "/v1/users/alice/interactions", key, {"items": items})
        assert response.status_code == 200, response.text
        assert response.json()["extracted"] is True
        ids[tenant] = response.json()["ids"]
    return ids


def call(
    server: RunningServer, method: str, path: str, key: str | None = KEY_A, body: Any = None
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=120)


def chat_body(user: str | None, content: str = "Tell me about dogs.", **extra: Any) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    if user is not None:
        body["user"] = user
    return {**body, **extra}


def good_request(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}
    response = call(server, "POST", "/v1/completions", KEY_A, body)
    assert response.status_code == 200, response.text


def metric(server: RunningServer, name: str) -> float:
    """The value of an unlabelled sample on ``/metrics``."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")


def sse_payloads(response: httpx.Response) -> list[Any]:
    events = [line for line in response.text.split("\n\n") if line.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


# -- basics ---------------------------------------------------------------------------------


def test_health(server: RunningServer) -> None:
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["tenancy"] == "multi-tenant"


def test_models_need_a_key_and_list_the_model(server: RunningServer) -> None:
    assert call(server, "GET", "/v1/models", key=None).status_code == 401
    models = call(server, "GET", "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_metrics_count_requests_and_batches(server: RunningServer) -> None:
    good_request(server)
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200
    for name in ("fints_batch_size", "fints_queue_seconds", "fints_tokens_per_second"):
        assert f"{name}_count" in metrics.text
    assert 'fints_http_requests_total{route="/v1/completions",status="200"}' in metrics.text


def test_a_generation_that_fails_in_the_worker_is_counted(server: RunningServer) -> None:
    before = metric(server, "fints_generation_errors_total")
    # short enough for the character check, too many tokens for max_prompt_tokens=256
    too_long = call(server, "POST", "/v1/chat/completions", KEY_A, chat_body(None, "word " * 400))
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert metric(server, "fints_generation_errors_total") == before + 1


def test_a_write_that_fails_is_counted(server: RunningServer) -> None:
    before = metric(server, "fints_write_errors_total")
    assert call(server, "DELETE", "/v1/users/never-added", KEY_A).status_code == 404
    assert metric(server, "fints_write_errors_total") == before + 1


def test_history_is_usable_by_the_next_request(server: RunningServer) -> None:
    item = {"input": "What do you drink?", "output": "Tea, always tea, with a biscuit.", "id": "t1"}
    added = call(server, "POST", "/v1/users/carol/interactions", KEY_A, {"items": [item]})
    assert added.status_code == 200 and added.json()["ids"] == ["t1"]
    listed = call(server, "GET", "/v1/users/carol/interactions").json()
    assert listed["data"] == [{**item, "extracted": True}]
    response = call(server, "POST", "/v1/chat/completions", KEY_A, chat_body("carol"))
    assert response.status_code == 200, response.text
    assert response.headers["x-fints-steered"] == "true"
    assert response.json()["fints"]["retrieved"] == ["t1"]
    retried = call(server, "POST", "/v1/users/carol/interactions", KEY_A, {"items": [item]})
    assert retried.status_code == 200 and retried.json()["ids"] == ["t1"]  # idempotent
    edited = {**item, "output": "Coffee now."}
    conflict = call(server, "POST", "/v1/users/carol/interactions", KEY_A, {"items": [edited]})
    assert conflict.status_code == 400 and "already has" in conflict.json()["error"]["message"]
    assert call(server, "GET", "/v1/users/carol/interactions").json() == listed


# -- streaming, the openai client -----------------------------------------------------------


def test_httpx_stream_matches_non_stream(
    server: RunningServer, alice_ids: dict[str, list[str]]
) -> None:
    body = chat_body("alice", max_tokens=12, fints=STRONG)
    whole = call(server, "POST", "/v1/chat/completions", KEY_A, body).json()
    text = whole["choices"][0]["message"]["content"]
    assert text, whole  # something to compare the stream with
    assert whole["fints"]["steered"] and set(whole["fints"]["retrieved"]) <= set(alice_ids["A"])
    streamed = call(
        server,
        "POST",
        "/v1/chat/completions",
        KEY_A,
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(streamed)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["fints"]["retrieved"] == whole["fints"]["retrieved"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == text
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_a_stop_sequence_cuts_stream_and_whole_alike(
    server: RunningServer, alice_ids: dict[str, list[str]]
) -> None:
    body = chat_body("alice", max_tokens=12, fints=STRONG)
    whole = call(server, "POST", "/v1/chat/completions", KEY_A, body).json()
    text = whole["choices"][0]["message"]["content"]
    assert len(text.split()) > 1, text  # a word to stop at, and text before it
    cut = text.split()[1]
    stopped = call(server, "POST", "/v1/chat/completions", KEY_A, {**body, "stop": [cut]}).json()
    assert stopped["choices"][0]["message"]["content"] == text[: text.index(cut)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # decoding ended at the stop, not at max_tokens
    assert stopped["usage"]["completion_tokens"] < whole["usage"]["completion_tokens"]
    chunks = sse_payloads(
        call(server, "POST", "/v1/chat/completions", KEY_A, {**body, "stop": cut, "stream": True})
    )
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == text[: text.index(cut)]


DOGS: list[Any] = [{"role": "user", "content": "Tell me about dogs."}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY_A, max_retries=0)


def test_openai_client_lists_and_retrieves_the_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_openai_client_chat_streamed_and_whole_agree(
    client: openai.OpenAI, alice_ids: dict[str, list[str]]
) -> None:
    messages = DOGS
    resp = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        user="alice",
        max_tokens=8,
        extra_body={"fints": {"top_k": 1}},
    )
    info = resp.model_extra["fints"]  # type: ignore[index]
    assert (
        info["steered"] and len(info["retrieved"]) == 1 and info["retrieved"][0] in alice_ids["A"]
    )
    assert resp.usage is not None and resp.usage.completion_tokens <= 8
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        user="alice",
        max_tokens=8,
        stream=True,
        extra_body={"fints": {"top_k": 1}},
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == resp.choices[0].message.content


def test_openai_client_can_turn_steering_off(
    client: openai.OpenAI, alice_ids: dict[str, list[str]]
) -> None:
    off = client.chat.completions.create(
        model=MODEL,
        messages=DOGS,
        user="alice",
        max_tokens=8,
        extra_body={"fints": {"enabled": False}},
    )
    assert off.model_extra["fints"]["steered"] is False  # type: ignore[index]


def test_openai_client_conversation_is_steered(
    client: openai.OpenAI, alice_ids: dict[str, list[str]]
) -> None:
    conversation: list[Any] = [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": [{"type": "text", "text": "Hi."}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me about dogs."},
    ]
    multi = client.chat.completions.create(
        model=MODEL, messages=conversation, user="alice", max_tokens=4
    )
    assert multi.model_extra["fints"]["steered"] is True  # type: ignore[index]


def test_openai_client_completions_streamed_and_whole_agree(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, user="alice")
    stream_c = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=8, user="alice", stream=True
    )
    assert "".join(c.choices[0].text for c in stream_c if c.choices) == done.choices[0].text


def test_openai_client_sees_openai_errors(server: RunningServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=DOGS, max_tokens=4)
    assert missing.value.code == "model_not_found"
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key-x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


# -- batching -------------------------------------------------------------------------------


def test_batched_rows_equal_solo_and_never_cross_users(
    server: RunningServer, personalizer: Personalizer, alice_ids: dict[str, list[str]]
) -> None:
    rows = [
        (KEY_A, chat_body("alice", "Describe the ocean.", max_tokens=10, fints=STRONG)),
        (KEY_B, chat_body("alice", "Describe the ocean.", max_tokens=10, fints=STRONG)),
        (KEY_A, chat_body("nobody", "Describe a short walk.", max_tokens=10, fints=STRONG)),
    ]
    solo = [call(server, "POST", "/v1/chat/completions", k, b).json() for k, b in rows]
    assert [s["fints"]["batch_size"] for s in solo] == [1, 1, 1]
    assert (
        solo[0]["choices"][0]["message"]["content"] != solo[1]["choices"][0]["message"]["content"]
    )

    waiting = replace(CONFIG, max_wait_ms=1500)  # wide window: the three surely batch
    batched: list[Any] = [None] * len(rows)
    with RunningServer(create_app(personalizer, waiting)) as wide:
        go = threading.Barrier(len(rows))

        def send(i: int) -> None:
            go.wait()
            batched[i] = call(wide, "POST", "/v1/chat/completions", *rows[i]).json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(rows))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for one, many in zip(solo, batched, strict=True):
        assert many["fints"]["batch_size"] == 3
        assert many["choices"][0]["message"]["content"] == one["choices"][0]["message"]["content"]
        assert many["fints"]["retrieved"] == one["fints"]["retrieved"]
    assert set(batched[0]["fints"]["retrieved"]) <= set(alice_ids["A"])
    assert set(batched[1]["fints"]["retrieved"]) <= set(alice_ids["B"])
    assert batched[2]["fints"]["steered"] is False and batched[2]["fints"]["retrieved"] == []


# -- tenants --------------------------------------------------------------------------------


def test_tenants_are_isolated(server: RunningServer, alice_ids: dict[str, list[str]]) -> None:
    for key, tenant, items in ((KEY_A, "A", PIRATE), (KEY_B, "B", FORMAL)):
        listed = call(server, "GET", "/v1/users/alice/interactions", key).json()
        assert [d["id"] for d in listed["data"]] == alice_ids[tenant]
        assert [d["output"] for d in listed["data"]] == [i["output"] for i in items]
        assert not any("vector" in k or "key" in k for d in listed["data"] for k in d)

    only_b = {"items": [{"input": "Hello?", "output": "Greetings, esteemed colleague."}]}
    assert call(server, "POST", "/v1/users/bella/interactions", KEY_B, only_b).status_code == 200
    # tenant A cannot read, steer with or delete B's user
    assert call(server, "GET", "/v1/users/bella/interactions", KEY_A).status_code == 404
    steered = call(server, "POST", "/v1/chat/completions", KEY_A, chat_body("bella"))
    assert steered.status_code == 200 and steered.headers["x-fints-steered"] == "false"
    assert call(server, "DELETE", "/v1/users/bella", KEY_A).status_code == 404
    assert call(server, "GET", "/v1/users/bella/interactions", KEY_B).status_code == 200
    # naming another tenant explicitly is forbidden
    forbidden = httpx.get(
        server.url + "/v1/users/bella/interactions",
        headers={"authorization": f"Bearer {KEY_A}", "x-fints-tenant": "B"},
    )
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["type"] == "permission_error"
    # no key, wrong key
    for bad_key in (None, "not-a-valid-key"):
        denied = call(server, "GET", "/v1/users/alice/interactions", bad_key)
        assert denied.status_code == 401
        assert set(denied.json()["error"]) == {"message", "type", "param", "code"}
    good_request(server)


# -- forgetting -----------------------------------------------------------------------------


def test_delete_forgets_every_byte(server: RunningServer, personalizer: Personalizer) -> None:
    secret_in, secret_out = "quokka-zebra-4471 question", "marmoset-ibis-9902 answer"
    body = {"items": [{"input": secret_in, "output": secret_out}]}
    assert call(server, "POST", "/v1/users/dave/interactions", KEY_A, body).status_code == 200
    assert call(server, "POST", "/v1/chat/completions", KEY_A, chat_body("dave")).json()["fints"][
        "steered"
    ]
    path = Path(personalizer.store.path)

    def raw() -> bytes:
        wal = Path(f"{path}-wal")
        return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")

    assert secret_out.encode() in raw()  # the test can see the text while it is stored
    deleted = call(server, "DELETE", "/v1/users/dave", KEY_A)
    assert deleted.status_code == 200 and deleted.json() == {"user": "dave", "deleted": True}
    data = raw()
    assert secret_in.encode() not in data and secret_out.encode() not in data
    assert call(server, "GET", "/v1/users/dave/interactions", KEY_A).status_code == 404
    after = call(server, "POST", "/v1/chat/completions", KEY_A, chat_body("dave"))
    assert after.status_code == 200 and after.headers["x-fints-steered"] == "false"
    assert "unknown user" in after.headers["x-fints-reason"]
    assert call(server, "DELETE", "/v1/users/dave", KEY_A).status_code == 404
    assert personalizer.store.integrity_check() == []


# -- bad input ------------------------------------------------------------------------------


BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    # (method, path, body, status, error code or param expected)
    ("POST", "/v1/chat/completions", "{not json", 400, "invalid_json"),
    ("POST", "/v1/chat/completions", {**chat_body(None), "bogus": 1}, 400, "unknown_parameter"),
    ("POST", "/v1/chat/completions", chat_body(None, fints={"top_kk": 3}), 400, "fints.top_kk"),
    ("POST", "/v1/chat/completions", chat_body(None, max_tokens=33), 400, "max_tokens_exceeded"),
    (
        "POST",
        "/v1/chat/completions",
        chat_body(None, "word " * 400),
        400,
        "context_length_exceeded",
    ),
    (
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "x" * 9000},
        400,
        "context_length_exceeded",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {**chat_body(None), "model": "gpt-4o"},
        404,
        "model_not_found",
    ),
    ("POST", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("POST", "/v1/chat/completions", chat_body(None, temperature="hot"), 400, "temperature"),
    ("POST", "/v1/chat/completions", chat_body(None, n=3), 400, "n"),
    (
        "POST",
        "/v1/chat/completions",
        chat_body(None, fints={"sites": "99.attn"}),
        400,
        "fints.sites",
    ),
    ("POST", "/v1/chat/completions", chat_body(None, "   "), 400, "messages"),
    (
        "POST",
        "/v1/users/erin/interactions",
        {"items": [{"input": "", "output": "x"}]},
        400,
        "items[0].input",
    ),
    (
        "POST",
        "/v1/users/erin/interactions",
        {"items": [{"input": "a" * 20_001, "output": "x"}]},
        400,
        "items[0].input",
    ),
    ("POST", "/v1/users/erin/interactions", {"items": []}, 400, "items"),
    (
        "POST",
        "/v1/users/erin/interactions",
        {"items": [{"input": "a", "output": "b", "x": 1}]},
        400,
        "items[0].x",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "assistant", "content": "Hi"}]},
        400,
        "messages",
    ),
    ("GET", "/v1/nothing-here", None, 404, None),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "expected"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(
    server: RunningServer, method: str, path: str, body: Any, status: int, expected: str | None
) -> None:
    if isinstance(body, str):
        response = httpx.request(
            method,
            server.url + path,
            content=body,
            headers={"authorization": f"Bearer {KEY_A}", "content-type": "application/json"},
        )
    else:
        response = call(server, method, path, KEY_A, body)
    assert response.status_code == status, (path, body, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if expected is not None:
        assert expected in (error["code"], error["param"]), (expected, error)
    if path.startswith("/v1/users/erin/"):  # a refused write stores nothing
        assert call(server, "GET", "/v1/users/erin/interactions").status_code == 404
    good_request(server)


def test_unknown_user_can_be_a_404(personalizer: Personalizer) -> None:
    config = replace(CONFIG, unknown_user=UnknownUser.ERROR, api_keys=None)
    with RunningServer(create_app(personalizer, config)) as single:
        assert httpx.get(single.url + "/health").json()["tenancy"] == "single-tenant"
        missing = call(single, "POST", "/v1/chat/completions", None, chat_body("ghost"))
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "user_not_found"
        anonymous = call(single, "POST", "/v1/chat/completions", None, chat_body(None))
        assert anonymous.status_code == 200
        assert anonymous.headers["x-fints-reason"] == "no user given"
