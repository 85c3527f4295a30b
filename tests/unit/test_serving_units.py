"""Serving pieces that need no model: payload conversion, stop sequences, tenants, keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fints.errors import FintsError
from fints.serving.api_spec import ApiError, ChatCompletionRequest, CompletionRequest, FintsOptions
from fints.serving.payloads import (
    Limits,
    StopFilter,
    check_common,
    generation_options,
    history_items,
    steering_config,
    stop_sequences,
)
from fints.serving.tenants import TenantResolver, check_bind, load_api_keys, parse_api_keys
from fints.sites import Component, Site
from fints.steering import SteeringConfig
from fints.stopping import check_stops, cut_at_stop


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_steering_overrides_merge_with_server_defaults() -> None:
    default = SteeringConfig(strengths={Component.ATTN: 2.0, Component.MLP: 3.0}, top_k=5)
    merged = steering_config(
        default, FintsOptions(top_k=3, strengths={"attn": 0.5}, sites="15.attn"), 30
    )
    assert merged.top_k == 3
    assert merged.strengths[Component.ATTN] == 0.5
    assert merged.strengths[Component.MLP] == 3.0
    assert merged.sites == (Site(15, Component.ATTN),)
    assert steering_config(default, FintsOptions(enabled=False), 30).enabled is False
    assert steering_config(default, None, 30) is default


@pytest.mark.parametrize(
    ("options", "param"),
    [
        (FintsOptions(strengths={"bogus": 1.0}), "fints.strengths"),
        (FintsOptions(sites="99.attn"), "fints.sites"),
        (FintsOptions(sites="nonsense"), "fints.sites"),
        (FintsOptions(strengths={"attn": float("inf")}), "fints"),
    ],
)
def test_bad_steering_options_name_their_parameter(options: FintsOptions, param: str) -> None:
    with pytest.raises(ApiError) as err:
        steering_config(SteeringConfig(), options, 30)
    assert err.value.status == 400 and err.value.param == param


def test_generation_options_and_limits() -> None:
    limits = Limits(max_tokens=32, default_max_tokens=8)
    assert generation_options(chat(), limits).max_new_tokens == 8
    assert generation_options(chat(max_completion_tokens=20), limits).max_new_tokens == 20
    assert generation_options(chat(temperature=0.7, seed=3), limits).temperature == 0.7
    with pytest.raises(ApiError) as err:
        generation_options(chat(max_tokens=33), limits)
    assert err.value.code == "max_tokens_exceeded" and err.value.param == "max_tokens"
    with pytest.raises(ApiError):
        generation_options(chat(max_tokens=0), limits)


@pytest.mark.parametrize(
    "fields",
    [{"n": 2}, {"logit_bias": {"1": 2.0}}, {"presence_penalty": 1.0}, {"logprobs": True}],
)
def test_unsupported_openai_parameters_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ApiError) as err:
        check_common(chat(**fields))
    assert err.value.status == 400


def test_unsupported_completion_parameters_are_refused() -> None:
    with pytest.raises(ApiError):
        check_common(CompletionRequest(model="m", prompt="x", echo=True))


def test_stop_sequences_truncate_and_stream_identically() -> None:
    text = "Hello world. Goodbye world."
    assert cut_at_stop(text, ["Good", "xyz"]) == ("Hello world. ", True)
    assert cut_at_stop(text, ["xyz"]) == (text, False)
    for size in (1, 2, 3, 5):
        stop = StopFilter(["Goodbye"])
        out = "".join(stop.feed(text[i : i + size]) for i in range(0, len(text), size))
        out += stop.flush()
        assert out == "Hello world. " and stop.stopped
    stop = StopFilter(["Goo"])
    assert stop.feed("Go") == "" and stop.feed("ne") == "Gone" and stop.flush() == ""
    with pytest.raises(ApiError):
        stop_sequences(["a", "b", "c", "d", "e"])
    with pytest.raises(ApiError):
        stop_sequences([""])
    with pytest.raises(ApiError, match="at most 64"):
        stop_sequences(["x" * 65])
    assert stop_sequences("END") == ("END",)
    assert check_stops("END") == ("END",)  # one sequence, not three letters


def test_history_items_validation() -> None:
    from fints.serving.api_spec import InteractionItem

    limits = Limits(max_items_per_request=2)
    items = history_items([InteractionItem(input="a", output="b", id="x")], limits)
    assert items[0].item_id == "x"
    with pytest.raises(ApiError) as err:
        history_items([InteractionItem(input="a", output=" ")], limits)
    assert err.value.param == "items[0]"
    with pytest.raises(ApiError) as err:
        history_items([InteractionItem(input="a" * 20_001, output="b")], limits)
    assert "limit" in err.value.message
    with pytest.raises(ApiError):
        history_items([InteractionItem(input="a", output="b")] * 3, limits)


def test_tenant_resolution() -> None:
    tenants = TenantResolver({"key-aaaaaaaa": "A", "key-bbbbbbbb": "B"})
    assert tenants.resolve("Bearer key-aaaaaaaa") == "A"
    assert tenants.resolve("bearer key-bbbbbbbb", "B") == "B"
    for header in (None, "", "Bearer", "Basic key-aaaaaaaa", "Bearer wrong-key"):
        with pytest.raises(ApiError) as err:
            tenants.resolve(header)
        assert err.value.status == 401 and err.value.type == "authentication_error"
    with pytest.raises(ApiError) as err:
        tenants.resolve("Bearer key-aaaaaaaa", "B")
    assert err.value.status == 403 and err.value.type == "permission_error"
    single = TenantResolver(None)
    assert single.single_tenant and single.resolve(None) == "default"


def test_api_keys_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"secret-key-1": "tenantA"}))
    assert load_api_keys(path) == {"secret-key-1": "tenantA"}
    assert load_api_keys(None, {"FINTS_API_KEYS": '{"secret-key-2": "B"}'}) == {"secret-key-2": "B"}
    assert load_api_keys(None, {}) is None
    for bad in ("[1]", "{}", '{"short": "A"}', '{"long-enough": 3}', "not json"):
        with pytest.raises(FintsError):
            parse_api_keys(bad, "test")
    with pytest.raises(FintsError):
        load_api_keys(tmp_path / "missing.json")


def test_no_keys_means_loopback_only() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", {"secret-key-1": "A"})
    with pytest.raises(FintsError, match="without API keys"):
        check_bind("0.0.0.0", None)
