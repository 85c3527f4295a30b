"""Hardening of the server (issue 25), over loopback HTTP with a tiny random llama: a bad
row fails alone, no input reaches a 500, strict types, names the store would refuse are
refused by the schema, and the OpenAPI document lists every status the server answers."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import torch

from fints.dictionary import DictionaryMeta, UserDictionary
from fints.engine import GenerationRequest, GenerationResult, Personalizer
from fints.errors import InvalidInputError
from fints.generation import MAX_SEED, MIN_SEED, GenerationOptions
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.serving.api_errors import ApiError
from fints.serving.api_spec import NAME_PATTERN, NONBLANK_PATTERN
from fints.serving.app import ServerConfig, create_app
from fints.serving.batcher import Batcher, Done, Failed, nonfinite_rows
from fints.serving.inprocess import RunningServer
from fints.serving.metrics import ServingMetrics
from fints.serving.payloads import Limits
from fints.sites import parse_sites
from fints.steering import MAX_STRENGTH, SteeringConfig
from fints.store import Store, check_name
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

KEY, OTHER_KEY = "hardening-key-a", "hardening-key-b"
MODEL = "tiny-llama"
SITES = parse_sites("1.attn+mlp")
QUERY = "alice wrote about topic 2"
#: absolute strengths at the largest value validation accepts: mallory's vectors overflow
HUGE = {"strengths": {"attn": MAX_STRENGTH, "mlp": MAX_STRENGTH}, "relative": False}
CONFIG = ServerConfig(
    limits=Limits(max_tokens=8, default_max_tokens=3, max_prompt_tokens=128),
    api_keys={KEY: "A", OTHER_KEY: "B"},
    extract_on_write=False,  # storing is what these tests are about; extraction is slow
    max_wait_ms=0,
)


def user_dictionary(model: LoadedModel, user: str, scale: float, seed: int) -> UserDictionary:
    encoder = HashEncoder()
    items = [
        HistoryItem(f"{user} wrote about topic {i}", f"answer {i}", f"{user}{i}") for i in (2, 3)
    ]
    meta = DictionaryMeta(
        model.fingerprint,
        model.name,
        SITES,
        model.hidden_size,
        encoder.name,
        encoder.dim,
        "generic",
        "float32",
        site_norms=(1.0, 1.0),
    )
    g = torch.Generator().manual_seed(seed)
    vectors = scale * torch.randn(len(items), len(SITES), model.hidden_size, generator=g)
    keys = encoder.encode([i.input for i in items])
    return UserDictionary(user, meta, [i.item_id for i in items], keys, vectors, items)


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.model = tiny_llama()
        self.store = Store(tmp / "store.sqlite")
        self.personalizer = Personalizer(self.model, self.store, encoder=HashEncoder())
        # alice: ordinary vectors; mallory: finite ones that overflow at a huge strength
        self.personalizer.import_dictionary(
            user_dictionary(self.model, "alice", 4.0, 0), tenant="A"
        )
        self.personalizer.import_dictionary(
            user_dictionary(self.model, "mallory", 1e36, 1), tenant="A"
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    made = Setup(tmp_path_factory.mktemp("hardening"))
    yield made
    made.store.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(setup: Setup) -> Iterator[RunningServer]:
    with RunningServer(create_app(setup.personalizer, CONFIG)) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    """One keep-alive connection: a request that broke it would fail the next one."""
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        yield http


def chat_body(content: str = QUERY, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 3,
        **extra,
    }


def raw_post(client: httpx.Client, path: str, body: str) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return cast(dict[str, Any], error)


def assert_serving(client: httpx.Client) -> None:
    """The same connection still answers a good request."""
    response = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    )
    assert response.status_code == 200, response.text


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")


def stored(setup: Setup) -> dict[str, list[HistoryItem]]:
    """Every user of both tenants with their items: must not change on a refused write."""
    return {
        f"{tenant}/{user}": setup.store.items(tenant, user)
        for tenant in ("A", "B")
        for user in setup.store.users(tenant)
    }


# -- 1. a bad row fails alone ----------------------------------------------------------------


def test_the_poisoned_row_is_real(setup: Setup) -> None:
    """Guards the tests below: mallory's vectors at a huge strength are not finite, and
    steering them fails every row of their batch unless the worker takes them out first."""
    p = setup.personalizer
    rows = [
        GenerationRequest("alice", QUERY, tenant="A"),
        GenerationRequest("mallory", QUERY, tenant="A", steering=SteeringConfig.from_dict(HUGE)),
    ]
    prepared = p.prepare(rows)
    assert set(nonfinite_rows(prepared)) == {1}
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        p.decode(prepared, GenerationOptions(max_new_tokens=3))


def run_jobs(
    setup: Setup,
    rows: list[tuple[GenerationRequest, bool]],
    options: GenerationOptions = GenerationOptions(max_new_tokens=4),
) -> tuple[list[Any], float]:
    """Submit every (request, stream?) at once, so that they share one batch; return each
    row's first answer (a result, or its error) and fints_generation_errors_total."""
    metrics = ServingMetrics()

    async def main() -> list[Any]:
        batcher = Batcher(setup.personalizer, metrics, max_wait_ms=50, max_batch_size=8)
        await batcher.start()
        try:
            jobs = [batcher.submit(r, options, stream=stream) for r, stream in rows]
            answers: list[Any] = []
            for job in jobs:
                if job.stream:  # the last event: Done, or Failed (before or after Started)
                    event = await job.next_event()
                    while not isinstance(event, Done | Failed):
                        event = await job.next_event()
                    failed = isinstance(event, Failed)
                    answers.append(event.error if failed else (event.result, event.batch_size))
                    continue
                try:
                    answers.append(await job.result())
                except Exception as exc:
                    answers.append(exc)
            return answers
        finally:
            await batcher.stop()

    answers = asyncio.run(main())
    return answers, metrics.registry.get_sample_value("fints_generation_errors_total") or 0.0


def test_a_poisoned_row_fails_alone_and_never_changes_another_rows_result(setup: Setup) -> None:
    alice = GenerationRequest("alice", QUERY, tenant="A")
    bob = GenerationRequest(None, "a question from nobody", tenant="A")
    mallory = GenerationRequest(
        "mallory", QUERY, tenant="A", steering=SteeringConfig.from_dict(HUGE)
    )
    (solo_alice, solo_bob), _ = run_jobs(setup, [(alice, False), (bob, False)])
    answers, errors = run_jobs(
        setup, [(alice, False), (mallory, False), (bob, False), (mallory, True)]
    )
    for answer, solo in zip((answers[0], answers[2]), (solo_alice, solo_bob), strict=True):
        result, _size = answer
        assert isinstance(result, GenerationResult), answer
        expected = solo[0]
        assert (result.text, result.completion_tokens, result.retrieved) == (
            expected.text,
            expected.completion_tokens,
            expected.retrieved,
        )
    assert answers[0][0].steered and answers[0][0].text  # alice was steered and answered
    for refused in (answers[1], answers[3]):  # mallory, whole and streamed
        assert isinstance(refused, ApiError) and refused.status == 400, refused
        assert refused.code == "steering_overflow" and refused.param == "fints.strengths"
    assert errors == 2  # counted in fints_generation_errors_total


#: finite vectors (1e38) whose activations overflow inside the model: NaN logits
STRONG = {"strengths": {"attn": 100.0, "mlp": 100.0}, "relative": False}


def test_a_row_whose_logits_overflow_is_real(setup: Setup) -> None:
    """Guards the test below: mallory's finite vectors at strength 100 make NaN logits, and
    sampling then fails the whole batch unless the worker contains the row."""
    rows = [
        GenerationRequest("alice", QUERY, tenant="A"),
        GenerationRequest("mallory", QUERY, tenant="A", steering=SteeringConfig.from_dict(STRONG)),
    ]
    prepared = setup.personalizer.prepare(rows)
    assert nonfinite_rows(prepared) == {}  # the vectors themselves are finite
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        setup.personalizer.decode(
            prepared, GenerationOptions(max_new_tokens=3, temperature=0.7, seed=1)
        )


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_row_whose_logits_overflow_fails_alone(setup: Setup, temperature: float) -> None:
    options = GenerationOptions(max_new_tokens=4, temperature=temperature, seed=1)
    alice = GenerationRequest("alice", QUERY, tenant="A")
    bob = GenerationRequest(None, "a question from nobody", tenant="A")
    calm = GenerationRequest("mallory", QUERY, tenant="A", steering=SteeringConfig(enabled=False))
    wild = GenerationRequest(
        "mallory", QUERY, tenant="A", steering=SteeringConfig.from_dict(STRONG)
    )
    control, _ = run_jobs(setup, [(alice, False), (calm, False), (bob, False)], options)
    answers, errors = run_jobs(setup, [(alice, False), (wild, True), (bob, False)], options)
    for n in (0, 2):  # alice's and bob's rows decode as beside a well-behaved row
        result, expected = answers[n][0], control[n][0]
        assert (result.text, result.completion_tokens) == (
            expected.text,
            expected.completion_tokens,
        )
        assert result.text
    refused = answers[1]  # the streamed row started (its vectors were finite), then failed
    assert isinstance(refused, ApiError) and refused.code == "steering_overflow", refused
    assert "NaN or inf while decoding" in refused.message
    assert errors == 1


def test_a_poisoned_request_over_http_is_a_400_and_is_counted(client: httpx.Client) -> None:
    before = metric(client, "fints_generation_errors_total")
    response = client.post("/v1/chat/completions", json=chat_body(user="mallory", fints=HUGE))
    error = assert_error(response, 400, "fints.strengths")
    assert error["code"] == "steering_overflow"
    assert metric(client, "fints_generation_errors_total") == before + 1
    streamed = client.post(
        "/v1/chat/completions", json=chat_body(user="mallory", fints=HUGE, stream=True)
    )
    assert_error(streamed, 400, "fints.strengths")  # refused before the stream starts
    ok = client.post("/v1/chat/completions", json=chat_body(user="alice", fints=HUGE))
    assert ok.status_code == 200 and ok.json()["fints"]["steered"] is True


def test_a_strength_beyond_the_bound_is_refused_at_validation(client: httpx.Client) -> None:
    body = chat_body(user="mallory", fints={"strengths": {"attn": 3e38}, "relative": False})
    assert_error(client.post("/v1/chat/completions", json=body), 400, "fints.strengths")


# -- 3. no input reaches a 500 ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", ["1e-300", "5e-324", "0.0009", "NaN", "Infinity"])
def test_a_temperature_that_overflows_is_a_400(client: httpx.Client, temperature: str) -> None:
    body = '{"model": "%s", "prompt": "Hi", "max_tokens": 2, "temperature": %s}'
    assert_error(
        raw_post(client, "/v1/completions", body % (MODEL, temperature)), 400, "temperature"
    )
    assert_serving(client)


@pytest.mark.parametrize("temperature", [0, 0.001, 1.5])
def test_temperatures_in_range_are_served(client: httpx.Client, temperature: float) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": temperature}
    assert client.post("/v1/completions", json=body).status_code == 200


@pytest.mark.parametrize("seed", [MAX_SEED + 1, MIN_SEED - 1, 10**40, -(10**40)])
@pytest.mark.parametrize("stream", [False, True])
def test_a_seed_out_of_range_is_a_400_before_any_stream(
    client: httpx.Client, seed: int, stream: bool
) -> None:
    body = chat_body(temperature=0.7, seed=seed, stream=stream)
    assert_error(client.post("/v1/chat/completions", json=body), 400, "seed")
    assert_serving(client)


@pytest.mark.parametrize("seed", [MAX_SEED, MIN_SEED, 0])
def test_seeds_at_the_bounds_are_served(client: httpx.Client, seed: int) -> None:
    body = chat_body(temperature=0.7, seed=seed)
    assert client.post("/v1/chat/completions", json=body).status_code == 200


S = "@SURROGATE@"  # replaced by a lone UTF-16 surrogate as JSON spells it, \ud800


def with_surrogate(body: dict[str, Any]) -> str:
    return json.dumps(body).replace(S, "\\ud800")


BASE = {"model": MODEL, "max_tokens": 2}
USER_TURN = {"role": "user", "content": [{"type": "text", "text": S}]}
BAD_TEXT = [
    (
        "/v1/chat/completions",
        {**BASE, "messages": [{"role": "user", "content": f"a {S} b"}]},
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        {**BASE, "messages": [{"role": "system", "content": "s"}, USER_TURN]},
        "messages[1].content[0].text",
    ),
    ("/v1/completions", {**BASE, "prompt": S}, "prompt"),
    ("/v1/completions", {**BASE, "prompt": ["ok", S]}, "prompt[1]"),
    ("/v1/completions", {**BASE, "prompt": "ok", "user": f"bob{S}"}, "user"),
    ("/v1/completions", {**BASE, "prompt": "ok", "stop": [S]}, "stop[0]"),
    (
        "/v1/completions",
        {**BASE, "prompt": "ok", "fints": {"strengths": {S: 1}}},
        "fints.strengths.\\ud800",
    ),
    (
        "/v1/users/dave/interactions",
        {"items": [{"input": "fine", "output": "fine", "id": S}]},
        "items[0].id",
    ),
    (
        "/v1/users/dave/interactions",
        {"items": [{"input": f"x{S}", "output": "ok"}]},
        "items[0].input",
    ),
    (
        "/v1/users/dave/interactions",
        {"items": [{"input": "ok", "output": "ok"}, {"input": "fine", "output": S}]},
        "items[1].output",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_TEXT)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    setup: Setup, client: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    before = stored(setup)
    assert_error(raw_post(client, path, with_surrogate(body)), 400, param)
    assert stored(setup) == before  # nothing stored
    assert_serving(client)  # and the keep-alive connection still serves


# -- 4. smaller --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": "3"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": "3"}, "seed"),
        ({"fints": {"enabled": "no"}}, "fints.enabled"),
        ({"fints": {"top_k": "2"}}, "fints.top_k"),
        ({"user": 7}, "user"),
    ],
)
def test_types_are_strict_as_in_the_openai_api(
    client: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    assert_error(client.post("/v1/chat/completions", json=chat_body(**extra)), 400, param)


@pytest.mark.parametrize("raw", ["%FF%FE", "%C3%28", "bob%ED%A0%80"])
def test_a_user_path_that_is_not_utf8_is_refused(
    setup: Setup, client: httpx.Client, raw: str
) -> None:
    before = stored(setup)
    items = {"items": [{"input": "in", "output": "out"}]}
    assert_error(client.post(f"/v1/users/{raw}/interactions", json=items), 400, "user")
    assert_error(client.get(f"/v1/users/{raw}/interactions"), 400, "user")
    assert_error(client.delete(f"/v1/users/{raw}"), 400, "user")
    assert stored(setup) == before


def test_a_percent_encoded_utf8_user_is_that_user(setup: Setup, client: httpx.Client) -> None:
    items = {"items": [{"input": "café input", "output": "café output", "id": "c1"}]}
    assert client.post("/v1/users/caf%C3%A9/interactions", json=items).status_code == 200
    assert "café" in setup.store.users("A")
    assert client.delete("/v1/users/caf%C3%A9").status_code == 200


@pytest.mark.parametrize("raw", ["%01bob", "bob%0A", "%20%20", "%E3%80%80", "x" * 257])
def test_a_user_name_the_store_refuses_is_refused_by_the_schema(
    setup: Setup, client: httpx.Client, raw: str
) -> None:
    before = stored(setup)
    items = {"items": [{"input": "in", "output": "out"}]}
    assert_error(client.post(f"/v1/users/{raw}/interactions", json=items), 400, "user")
    assert stored(setup) == before


@pytest.mark.parametrize("user", ["bob\x01", "\t", " ", "\u3000", "x" * 257, ""])
def test_a_body_user_the_store_refuses_is_refused_by_the_schema(
    client: httpx.Client, user: str
) -> None:
    assert_error(client.post("/v1/chat/completions", json=chat_body(user=user)), 400, "user")


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"input": "", "output": "x"}, "items[0].input"),
        ({"input": "x", "output": " \n\t\u3000"}, "items[0].output"),
        ({"input": "x" * 20_001, "output": "x"}, "items[0].input"),
    ],
)
def test_an_item_the_store_refuses_is_refused_by_the_schema(
    setup: Setup, client: httpx.Client, item: dict[str, str], param: str
) -> None:
    before = stored(setup)
    response = client.post("/v1/users/erin/interactions", json={"items": [item]})
    assert_error(response, 400, param)
    assert stored(setup) == before


NAMES = [
    "bob",
    "é",
    "a b",
    " x ",
    "",
    " ",
    "\t",
    "\u3000",
    "\u00a0\u2028",
    "\ufeff",
    "a\x01",
    "\x7f",
]


@pytest.mark.parametrize("name", NAMES)
def test_the_documented_name_pattern_is_what_the_store_accepts(name: str) -> None:
    try:
        check_name("user", name)
        accepted = True
    except InvalidInputError:
        accepted = False
    assert bool(re.search(NAME_PATTERN, name)) == accepted


@pytest.mark.parametrize("text", [*NAMES, "\x1c\x1d", "x\x00"])
def test_the_documented_item_pattern_is_what_an_item_accepts(text: str) -> None:
    try:
        HistoryItem(text, "out")
        accepted = True
    except InvalidInputError:
        accepted = False
    assert bool(re.search(NONBLANK_PATTERN, text)) == accepted


def test_item_writes_are_idempotent_over_http(setup: Setup, client: httpx.Client) -> None:
    items = {
        "items": [{"input": "q1", "output": "a1", "id": "i1"}, {"input": "q2", "output": "a2"}]
    }
    first = client.post("/v1/users/frank/interactions", json=items)
    assert first.status_code == 200, first.text
    before = stored(setup)
    retried = client.post("/v1/users/frank/interactions", json=items)
    assert retried.status_code == 200 and retried.json()["ids"] == first.json()["ids"]
    assert stored(setup) == before
    edited = {"items": [{"input": "q1", "output": "changed", "id": "i1"}]}
    error = assert_error(client.post("/v1/users/frank/interactions", json=edited), 400, None)
    assert "already has" in error["message"] and "i1" in error["message"]
    assert stored(setup) == before


def test_a_huge_model_name_is_not_echoed_whole(client: httpx.Client) -> None:
    for response in (
        client.post("/v1/chat/completions", json={**chat_body(), "model": "m" * 1_000_000}),
        client.get("/v1/models/" + "m" * 10_000),  # as long as a request line may be
    ):
        assert_error(response, 404, "model")
        assert len(response.content) < 2_000


# -- the OpenAPI document --------------------------------------------------------------------


def documented(client: httpx.Client, method: str, path: str) -> set[str]:
    return set(client.get("/openapi.json").json()["paths"][path][method]["responses"])


ANSWERS = [
    # (method, documented path, request path, key, body, status the server answers)
    ("get", "/v1/models", "/v1/models", None, None, 401),
    ("get", "/v1/models/{model}", "/v1/models/nope", KEY, None, 404),
    ("post", "/v1/chat/completions", "/v1/chat/completions", KEY, {"model": MODEL}, 400),
    ("post", "/v1/chat/completions", "/v1/chat/completions", "wrong-key-123", chat_body(), 401),
    ("post", "/v1/completions", "/v1/completions", KEY, {"model": "nope", "prompt": "x"}, 404),
    ("post", "/v1/users/{user}/interactions", "/v1/users/%01/interactions", KEY, {}, 400),
    ("get", "/v1/users/{user}/interactions", "/v1/users/ghost/interactions", KEY, None, 404),
    ("delete", "/v1/users/{user}", "/v1/users/ghost", KEY, None, 404),
    ("delete", "/v1/users/{user}", "/v1/users/ghost", None, None, 401),
]


@pytest.mark.parametrize(("method", "doc", "path", "key", "body", "status"), ANSWERS)
def test_the_openapi_document_lists_the_statuses_the_server_answers(
    client: httpx.Client,
    method: str,
    doc: str,
    path: str,
    key: str | None,
    body: Any,
    status: int,
) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {"authorization": ""}
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == status, response.text
    assert str(status) in documented(client, method, doc)


def test_a_403_is_documented(client: httpx.Client) -> None:
    response = client.get("/v1/models", headers={"x-fints-tenant": "B"})
    assert response.status_code == 403
    assert "403" in documented(client, "get", "/v1/models")


def test_the_openapi_document_has_no_422_and_documents_errors_and_metrics(
    client: httpx.Client,
) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # a bad request is answered 400
            if path.startswith("/v1/"):
                assert {"400", "401", "500"} <= set(responses) or {"401", "500"} <= set(
                    responses
                ), (method, path)
                error = responses["401"]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    content_type = client.get("/metrics").headers["content-type"]
    assert content_type.split(";")[0] in metrics
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(chat)
    seed = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["seed"]
    assert seed["anyOf"][0]["maximum"] == MAX_SEED  # exact, not a float rounded up to 2**64
    assert seed["anyOf"][0]["minimum"] == MIN_SEED
