"""Serving pieces that need no model: payload conversion, stop sequences, tenants, keys,
the command-line factory, the batcher (with a stand-in personalizer) and the load report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fints.engine import GenerationRequest, GenerationResult, PreparedBatch, UnknownUser
from fints.errors import FintsError, InvalidInputError
from fints.generation import Completion, GenerationOptions
from fints.serving.api_errors import ApiError
from fints.serving.api_spec import (
    ChatCompletionRequest,
    CompletionRequest,
    FintsOptions,
    InteractionItem,
)
from fints.serving.app import ServerConfig
from fints.serving.batcher import Batcher
from fints.serving.factory import default_steering, parse_strengths, parse_unknown_user
from fints.serving.loadreport import LoadReport, Phase, PhaseResult, merge_phases
from fints.serving.metrics import ServingMetrics
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


DEFAULT = SteeringConfig(strengths={Component.ATTN: 2.0, Component.MLP: 3.0}, top_k=5)


def test_steering_overrides_merge_with_server_defaults() -> None:
    merged = steering_config(
        DEFAULT, FintsOptions(top_k=3, strengths={"attn": 0.5}, sites="15.attn"), 30
    )
    assert merged.top_k == 3
    assert merged.strengths[Component.ATTN] == 0.5
    assert merged.strengths[Component.MLP] == 3.0  # the server's, not the engine's 1.0
    assert merged.sites == (Site(15, Component.ATTN),)


def test_a_request_can_turn_steering_off() -> None:
    assert steering_config(DEFAULT, FintsOptions(enabled=False), 30).enabled is False


def test_no_fints_field_keeps_the_server_default() -> None:
    assert steering_config(DEFAULT, None, 30) is DEFAULT


@pytest.mark.parametrize(
    ("options", "param"),
    [
        (FintsOptions(strengths={"bogus": 1.0}), "fints.strengths"),
        (FintsOptions(sites="99.attn"), "fints.sites"),
        (FintsOptions(sites="nonsense"), "fints.sites"),
        (FintsOptions(strengths={"attn": float("inf")}), "fints.strengths"),
        (FintsOptions(tau=float("inf")), "fints.tau"),
    ],
)
def test_bad_steering_options_name_their_parameter(options: FintsOptions, param: str) -> None:
    with pytest.raises(ApiError) as err:
        steering_config(SteeringConfig(), options, 30)
    assert err.value.status == 400 and err.value.param == param


def test_generation_options_take_the_request_or_the_default() -> None:
    limits = Limits(max_tokens=32, default_max_tokens=8)
    assert generation_options(chat(), limits).max_new_tokens == 8
    assert generation_options(chat(max_completion_tokens=20), limits).max_new_tokens == 20
    assert generation_options(chat(temperature=0.7, seed=3), limits).temperature == 0.7
    assert generation_options(chat(), limits).repetition_penalty == 1.0
    assert generation_options(chat(repetition_penalty=1.2), limits).repetition_penalty == 1.2
    with pytest.raises(ValueError, match="repetition_penalty"):  # below 1 rewards repeats
        chat(repetition_penalty=0.5)


def test_generation_options_refuse_too_many_or_no_tokens() -> None:
    limits = Limits(max_tokens=32, default_max_tokens=8)
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


def test_cut_at_stop_cuts_before_the_first_stop() -> None:
    text = "Hello world. Goodbye world."
    assert cut_at_stop(text, ["Good", "xyz"]) == ("Hello world. ", True)
    assert cut_at_stop(text, ["xyz"]) == (text, False)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_stop_filter_streams_what_cut_at_stop_keeps(size: int) -> None:
    text = "Hello world. Goodbye world."
    stop = StopFilter(["Goodbye"])
    out = "".join(stop.feed(text[i : i + size]) for i in range(0, len(text), size))
    out += stop.flush()
    assert out == "Hello world. " and stop.stopped


def test_stop_filter_releases_a_prefix_that_did_not_become_a_stop() -> None:
    stop = StopFilter(["Goo"])
    assert stop.feed("Go") == ""
    assert stop.feed("ne") == "Gone"
    assert stop.flush() == "" and not stop.stopped


@pytest.mark.parametrize(
    ("stops", "match"),
    [(["a", "b", "c", "d", "e"], "at most 4"), ([""], "empty"), (["x" * 65], "at most 64")],
)
def test_bad_stop_sequences_are_refused(stops: list[str], match: str) -> None:
    with pytest.raises(ApiError, match=match) as err:
        stop_sequences(stops)
    assert err.value.param == "stop"


def test_one_stop_string_is_one_sequence() -> None:
    assert stop_sequences("END") == ("END",)
    assert check_stops("END") == ("END",)  # not three letters


def test_history_items_validation() -> None:
    limits = Limits(max_items_per_request=2)
    items = history_items([InteractionItem(input="a", output="b", id="x")], limits)
    assert items[0].item_id == "x"
    # the schema refuses these first; the conversion checks them again
    with pytest.raises(ApiError) as err:
        history_items([InteractionItem.model_construct(input="a", output=" ", id=None)], limits)
    assert err.value.param == "items[0]"
    with pytest.raises(ApiError) as err:
        history_items(
            [InteractionItem.model_construct(input="a" * 20_001, output="b", id=None)], limits
        )
    assert "limit" in err.value.message
    with pytest.raises(ApiError):
        history_items([InteractionItem(input="a", output="b")] * 3, limits)


TENANTS = TenantResolver({"key-aaaaaaaa": "A", "key-bbbbbbbb": "B"})


def test_a_key_resolves_to_its_tenant() -> None:
    assert TENANTS.resolve("Bearer key-aaaaaaaa") == "A"
    assert TENANTS.resolve("bearer key-bbbbbbbb", "B") == "B"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic key-aaaaaaaa", "Bearer wrong-key"])
def test_a_missing_or_wrong_key_is_a_401(header: str | None) -> None:
    with pytest.raises(ApiError) as err:
        TENANTS.resolve(header)
    assert err.value.status == 401 and err.value.type == "authentication_error"


def test_naming_another_tenant_is_a_403() -> None:
    with pytest.raises(ApiError) as err:
        TENANTS.resolve("Bearer key-aaaaaaaa", "B")
    assert err.value.status == 403 and err.value.type == "permission_error"


def test_without_keys_everyone_is_the_default_tenant() -> None:
    single = TenantResolver(None)
    assert single.single_tenant and single.resolve(None) == "default"


def test_api_keys_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"secret-key-1": "tenantA"}))
    assert load_api_keys(path) == {"secret-key-1": "tenantA"}
    assert load_api_keys(None, {"FINTS_API_KEYS": '{"secret-key-2": "B"}'}) == {"secret-key-2": "B"}
    assert load_api_keys(None, {}) is None


@pytest.mark.parametrize("bad", ["[1]", "{}", '{"short": "A"}', '{"long-enough": 3}', "not json"])
def test_malformed_api_keys_are_refused(bad: str) -> None:
    with pytest.raises(FintsError):
        parse_api_keys(bad, "test")


def test_a_missing_keys_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FintsError, match="does not exist"):
        load_api_keys(tmp_path / "missing.json")


def test_no_keys_means_loopback_only() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", {"secret-key-1": "A"})
    with pytest.raises(FintsError, match="without API keys"):
        check_bind("0.0.0.0", None)


# -- the command-line factory ----------------------------------------------------------------


def test_parse_strengths() -> None:
    assert parse_strengths("attn=0.5, mlp=1,") == {"attn": 0.5, "mlp": 1.0}


@pytest.mark.parametrize(
    ("spec", "match"), [("attn", "missing '='"), ("attn=x", "COMPONENT=NUMBER")]
)
def test_malformed_strengths_are_refused(spec: str, match: str) -> None:
    with pytest.raises(FintsError, match=match):
        parse_strengths(spec)


@pytest.mark.parametrize(
    ("flag", "request_strengths"),
    [("bogus=1", {"bogus": 1.0}), ("attn=1e9", {"attn": 1e9})],
)
def test_a_strength_mistake_reads_the_same_on_the_command_line_and_over_http(
    flag: str, request_strengths: dict[str, float]
) -> None:
    with pytest.raises(InvalidInputError) as cli:
        default_steering(strengths=flag)
    with pytest.raises(ApiError) as http:
        steering_config(SteeringConfig(), FintsOptions(strengths=request_strengths), 30)
    assert str(cli.value) == http.value.message
    assert cli.value.param == "strengths" and http.value.param == "fints.strengths"


def test_default_steering_takes_the_options() -> None:
    config = default_steering(strengths="attn=4", relative=True, top_k=2, aggregation="mean")
    assert config.strengths[Component.ATTN] == 4.0 and config.strengths[Component.MLP] == 1.0
    assert config.relative and config.top_k == 2 and config.aggregation == "mean"


def test_a_bad_aggregation_names_its_setting() -> None:
    with pytest.raises(InvalidInputError, match="aggregation must be") as err:
        default_steering(aggregation="median")
    assert err.value.param == "aggregation"


@pytest.mark.parametrize(
    ("flag", "policy"),
    [
        ("unsteered", UnknownUser.UNSTEERED),
        ("404", UnknownUser.ERROR),
        ("error", UnknownUser.ERROR),
    ],
)
def test_unknown_user_flag(flag: str, policy: UnknownUser) -> None:
    assert parse_unknown_user(flag) is policy


def test_a_bad_unknown_user_flag_is_refused() -> None:
    with pytest.raises(FintsError, match="--unknown-user"):
        parse_unknown_user("maybe")


def test_server_config_takes_the_engine_policy() -> None:
    assert ServerConfig(unknown_user=UnknownUser("error")).unknown_user is UnknownUser.ERROR
    with pytest.raises(InvalidInputError, match="unknown_user"):
        ServerConfig(unknown_user=cast(UnknownUser, "404"))


# -- the batcher, with a stand-in personalizer ---------------------------------------------


class StandInPersonalizer:
    """Prepares 3-token prompts; decodes every row to "ok" (2 tokens), or raises ``fail``."""

    def __init__(self, fail: Exception | None = None) -> None:
        generation_config = SimpleNamespace(eos_token_id=None)
        self.model = SimpleNamespace(
            tokenizer=SimpleNamespace(eos_token_id=2),
            model=SimpleNamespace(generation_config=generation_config),
        )
        self.fail = fail
        self.decoded: list[int] = []  # rows per decode call
        self.backend = SimpleNamespace(decode=self._decode)

    def prepare(self, requests: list[GenerationRequest]) -> PreparedBatch:
        results = [GenerationResult(r.user, "", False, prompt_tokens=3) for r in requests]
        prompts = [[5, 6, 7] for _ in requests]
        return PreparedBatch(prompts=prompts, results=results, stops=[r.stop for r in requests])

    def _decode(
        self, prompts: list[list[int]], additions: Any, options: GenerationOptions, **_: Any
    ) -> list[Completion]:
        if self.fail is not None:
            raise self.fail
        self.decoded.append(len(prompts))
        return [Completion("ok", [8, 9], len(p), "length") for p in prompts]


def run_batcher(personalizer: StandInPersonalizer, work: Any, **settings: Any) -> ServingMetrics:
    """Run ``await work(batcher)`` against a started batcher; return its metrics."""
    metrics = ServingMetrics()
    settings.setdefault("slice_tokens", None)  # the stand-in answers a whole request at once

    async def main() -> None:
        batcher = Batcher(cast(Any, personalizer), metrics, max_wait_ms=0, **settings)
        await batcher.start()
        try:
            await work(batcher)
        finally:
            await batcher.stop()

    asyncio.run(main())
    return metrics


def sample(metrics: ServingMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def generate_one(batcher: Batcher) -> GenerationResult:
    job = batcher.submit(GenerationRequest("u", "hello"), GenerationOptions(), stream=False)
    result, _size = await job.result()
    return result


def test_the_batcher_decodes_through_the_personalizer() -> None:
    personalizer = StandInPersonalizer()
    results: list[GenerationResult] = []

    async def work(batcher: Batcher) -> None:
        results.append(await generate_one(batcher))

    metrics = run_batcher(personalizer, work)
    assert personalizer.decoded == [1]
    assert results[0].text == "ok" and results[0].finish_reason == "length"
    assert sample(metrics, "fints_completion_tokens_total") == 2
    assert sample(metrics, "fints_prompt_tokens_total") == 3
    assert sample(metrics, "fints_generation_errors_total") == 0


def test_a_failing_batch_fails_its_request_and_is_counted() -> None:
    async def work(batcher: Batcher) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await generate_one(batcher)

    metrics = run_batcher(StandInPersonalizer(fail=RuntimeError("boom")), work)
    assert sample(metrics, "fints_generation_errors_total") == 1


def test_a_prompt_over_the_limit_fails_alone_and_is_counted() -> None:
    personalizer = StandInPersonalizer()

    async def work(batcher: Batcher) -> None:
        with pytest.raises(ApiError) as err:
            await generate_one(batcher)
        assert err.value.code == "context_length_exceeded"

    metrics = run_batcher(personalizer, work, max_prompt_tokens=2)
    assert personalizer.decoded == []
    assert sample(metrics, "fints_generation_errors_total") == 1


def test_a_failing_write_is_counted() -> None:
    def write() -> None:
        raise OSError("disk full")

    async def work(batcher: Batcher) -> None:
        with pytest.raises(OSError, match="disk full"):
            await batcher.run_exclusive(write)
        assert await batcher.run_exclusive(lambda: 7) == 7

    metrics = run_batcher(StandInPersonalizer(), work)
    assert sample(metrics, "fints_write_errors_total") == 1


# -- the load report -------------------------------------------------------------------------


def phase(which: Phase, latencies: list[float], errors: list[str] | None = None) -> PhaseResult:
    return PhaseResult(which, wall_s=1.0, latencies=latencies, errors=errors or [])


def test_rounds_pool_per_phase_in_phase_order() -> None:
    merged = merge_phases(
        [
            phase(Phase.BATCHED_UNSTEERED, [1.0]),
            phase(Phase.SOLO_STEERED, [4.0]),
            phase(Phase.BATCHED_STEERED, [2.0]),
            phase(Phase.BATCHED_STEERED, [3.0], ["HTTP 500"]),
        ]
    )
    assert [p.phase for p in merged] == [
        Phase.BATCHED_STEERED,
        Phase.BATCHED_UNSTEERED,
        Phase.SOLO_STEERED,
    ]
    assert merged[0].latencies == [2.0, 3.0] and merged[0].wall_s == 2.0
    assert merged[0].errors == ["HTTP 500"]


def test_the_report_lists_every_phase_and_its_errors() -> None:
    phases = [phase(Phase.BATCHED_STEERED, [1.0], ["HTTP 500 boom"]), phase(Phase.SOLO_STEERED, [])]
    report = LoadReport("title line", 0.5, phases)
    text = report.render()
    assert text.splitlines()[0] == "title line"
    assert "batched, steered" in text and "one-at-a-time, steered" in text
    assert report.errors == 1 and "  batched, steered: HTTP 500 boom" in text


def test_an_unknown_extraction_method_fails_before_the_model_loads(tmp_path) -> None:
    from fints.errors import InvalidInputError
    from fints.serving.factory import build_personalizer

    with pytest.raises(InvalidInputError, match="unknown extraction method 'nope'"):
        build_personalizer(model=str(tmp_path / "no-such-model"), method="nope")
