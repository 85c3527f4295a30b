"""Step-level scheduling (issue 25): fair rounds across tenants, and long rows decoded in
slices under contention, token for token what decoding them whole gives (greedy, float32,
a tiny random llama behind the real batcher)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fints.engine import GenerationRequest, GenerationResult, Personalizer
from fints.generation import GenerationOptions
from fints.serving.batcher import Batcher, Delta, Done
from fints.serving.metrics import ServingMetrics
from fints.serving.slicing import pick_fair, sliceable
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama
from tests.unit.test_hardening_serving import QUERY, user_dictionary
from tests.unit.test_serving_units import sample

# -- picking a round --------------------------------------------------------------------------


def tenant_of(item: str) -> str:
    return item[0]


def test_one_tenant_alone_gets_the_whole_batch_in_arrival_order() -> None:
    picked, contended = pick_fair(["a1", "a2", "a3", "a4"], tenant_of, 3, set())
    assert picked == ["a1", "a2", "a3"] and not contended


def test_tenants_take_turns_and_each_gets_its_share_under_contention() -> None:
    queue = ["a1", "a2", "a3", "a4", "b1", "c1", "c2"]
    picked, contended = pick_fair(queue, tenant_of, 8, set())
    # 3 tenants share 8 rows: at most 2 each, oldest tenant first, one row per turn
    assert contended and picked == ["a1", "b1", "c1", "a2", "c2"]


def test_a_tenant_answered_in_the_last_round_counts_as_contending() -> None:
    """The abusive pattern: the others were just answered and are about to come back; the
    tenant that waits alone still gets only its share and its rows decode a slice."""
    picked, contended = pick_fair(["a1", "a2"], tenant_of, 8, {"b", "c", "d", "e"})
    assert contended and picked == ["a1"]  # 8 rows // 5 tenants


def test_seeded_sampling_is_never_sliced() -> None:
    from fints.engine import PreparedBatch

    prepared = PreparedBatch([[1]], [GenerationResult(None, "", False)], [()])
    assert sliceable(prepared, GenerationOptions())
    assert sliceable(prepared, GenerationOptions(temperature=0.7))
    assert not sliceable(prepared, GenerationOptions(temperature=0.7, seed=3))


# -- the batcher --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def personalizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Personalizer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_llama()
    store = Store(Path(tmp_path_factory.mktemp("slicing")) / "store.sqlite")
    made = Personalizer(model, store, encoder=HashEncoder())
    made.import_dictionary(user_dictionary(model, "alice", 4.0, 0), tenant="A")
    yield made
    store.close()
    torch.set_num_threads(threads)


#: a steered row (tenant A), an unsteered one of another tenant, and a raw prompt
REQUESTS = [
    GenerationRequest("alice", QUERY, tenant="A"),
    GenerationRequest("bob", "bob asks about the weather", tenant="B"),
    GenerationRequest(None, "Once upon a time", tenant="C", raw_prompt=True),
]


def serve(
    personalizer: Personalizer,
    requests: list[GenerationRequest],
    options: GenerationOptions,
    *,
    slice_tokens: int | None,
    stream: bool = False,
) -> tuple[list[GenerationResult], list[str], ServingMetrics]:
    """Submit all requests at once (so their tenants contend); results, the streamed text
    per row, metrics."""
    metrics = ServingMetrics()

    async def main() -> tuple[list[GenerationResult], list[str]]:
        batcher = Batcher(personalizer, metrics, max_wait_ms=0, slice_tokens=slice_tokens)
        await batcher.start()
        try:
            jobs = [batcher.submit(r, options, stream=stream) for r in requests]
            results, streamed = [], []
            for job in jobs:
                text = ""
                while True:
                    event = await job.next_event()
                    if isinstance(event, Delta):
                        text += event.text
                    if isinstance(event, Done):
                        results.append(event.result)
                        break
                streamed.append(text)
            return results, streamed
        finally:
            await batcher.stop()

    results, streamed = asyncio.run(main())
    return results, streamed, metrics


def whole(
    personalizer: Personalizer, requests: list[GenerationRequest], options: GenerationOptions
) -> list[GenerationResult]:
    """Each request decoded alone, in one piece."""
    return [personalizer.generate([r], options)[0] for r in requests]


def essentials(results: list[GenerationResult]) -> list[tuple[Any, ...]]:
    return [(r.text, r.completion_tokens, r.finish_reason, r.steered) for r in results]


def test_a_sliced_row_has_the_tokens_of_a_whole_one(personalizer: Personalizer) -> None:
    options = GenerationOptions(max_new_tokens=13)
    expected = whole(personalizer, REQUESTS, options)
    results, streamed, metrics = serve(personalizer, REQUESTS, options, slice_tokens=4, stream=True)
    assert essentials(results) == essentials(expected)
    assert all(r.completion_tokens == 13 for r in results)  # a random model: no end of turn
    assert streamed == [r.text for r in expected]  # the deltas across slices add up
    assert sample(metrics, "fints_batch_size_count") == 4  # 13 tokens: slices of 4, 4, 4, 1


def test_without_slices_the_rows_decode_in_one_piece(personalizer: Personalizer) -> None:
    options = GenerationOptions(max_new_tokens=13)
    results, _, metrics = serve(personalizer, REQUESTS, options, slice_tokens=None)
    assert essentials(results) == essentials(whole(personalizer, REQUESTS, options))
    assert sample(metrics, "fints_batch_size_count") == 1


def test_a_request_of_two_slices_or_less_decodes_whole(personalizer: Personalizer) -> None:
    options = GenerationOptions(max_new_tokens=8)
    results, _, metrics = serve(personalizer, REQUESTS, options, slice_tokens=4)
    assert essentials(results) == essentials(whole(personalizer, REQUESTS, options))
    assert sample(metrics, "fints_batch_size_count") == 1


@pytest.mark.parametrize("seam", [3, 4, 8])
def test_a_stop_sequence_across_two_slices_ends_the_row_where_whole_decoding_does(
    personalizer: Personalizer, seam: int
) -> None:
    """The stop is the text around the end of the row's ``seam``-th token, and slices of
    ``seam`` tokens put it across two slices."""
    options = GenerationOptions(max_new_tokens=20)
    prepared = personalizer.prepare(REQUESTS[2:])  # the raw prompt: varied text
    tokens = personalizer.backend.decode(prepared.prompts, prepared.additions, options)[0]
    decode = personalizer.model.tokenizer.decode
    text = decode(tokens.token_ids, skip_special_tokens=True).lstrip()
    at = len(decode(tokens.token_ids[:seam], skip_special_tokens=True).lstrip())
    stop = text[at - 2 : at + 2]
    assert text.find(stop) == at - 2, (text, stop)  # its first place
    requests = [
        GenerationRequest(r.user, r.query, tenant=r.tenant, raw_prompt=r.raw_prompt, stop=(stop,))
        for r in REQUESTS
    ]
    expected = whole(personalizer, requests, options)
    assert expected[2].finish_reason == "stop" and expected[2].text == text[: at - 2].rstrip()
    for slice_tokens in (seam, 1, 5):
        results, _, _ = serve(personalizer, requests, options, slice_tokens=slice_tokens)
        assert essentials(results) == essentials(expected)


def test_a_short_request_is_answered_between_the_slices_of_a_long_one(
    personalizer: Personalizer,
) -> None:
    """Tenant A asks for 40 tokens, tenant B for 2 at once and then 2 again when answered:
    with slices B's second request overtakes A; decoded whole, A goes first."""

    def order(slice_tokens: int | None) -> list[str]:
        finished: list[str] = []

        async def main() -> None:
            batcher = Batcher(
                personalizer, ServingMetrics(), max_wait_ms=0, slice_tokens=slice_tokens
            )
            await batcher.start()
            try:
                long = batcher.submit(
                    GenerationRequest("alice", QUERY * 3, tenant="A"),
                    GenerationOptions(max_new_tokens=40),
                    stream=False,
                )

                async def answered(name: str, job: Any) -> None:
                    await job.result()
                    finished.append(name)

                waiting = asyncio.ensure_future(answered("A", long))
                short = GenerationRequest("bob", "hi", tenant="B")
                for n in (1, 2):
                    job = batcher.submit(short, GenerationOptions(max_new_tokens=2), stream=False)
                    await answered(f"B{n}", job)
                await waiting
            finally:
                await batcher.stop()

        asyncio.run(main())
        return finished

    assert order(4) == ["B1", "B2", "A"]
    assert order(None) == ["B1", "A", "B2"]


# -- going on from a slice's decoding state -----------------------------------------------------


def ids_read(personalizer: Personalizer) -> Any:
    """A context that counts the token positions the model's embedding reads."""
    from contextlib import contextmanager

    @contextmanager
    def counting() -> Iterator[list[int]]:
        read = [0]
        embed = personalizer.model.model.get_input_embeddings()
        handle = embed.register_forward_hook(
            lambda m, a, out: read.__setitem__(0, read[0] + a[0].numel())
        )
        try:
            yield read
        finally:
            handle.remove()

    return counting()


def test_decoding_goes_on_from_its_state_reading_only_new_ids(personalizer: Personalizer) -> None:
    """Steered, unsteered and raw rows: 5 tokens, then rows 2 and 0 alone for 7 more from
    the state, are the tokens of 12 decoded at once; the second call reads one id per row
    per step, not the prefix again."""
    from fints.decode_state import KvCarry

    prepared = personalizer.prepare(REQUESTS)
    decode = personalizer.backend.decode
    whole = decode(prepared.prompts, prepared.additions, GenerationOptions(max_new_tokens=12))
    carry = KvCarry()
    first = decode(
        prepared.prompts, prepared.additions, GenerationOptions(max_new_tokens=5), carry=carry
    )
    assert carry.state is not None and carry.state.cache.get_seq_length() == (
        carry.state.sequences.shape[1] - 1
    )
    rows = [2, 0]
    carry.state = carry.state.select(rows)
    again = prepared.select(rows)
    prompts = [[*prepared.prompts[r], *first[r].token_ids] for r in rows]
    with ids_read(personalizer) as read:
        rest = decode(prompts, again.additions, GenerationOptions(max_new_tokens=7), carry=carry)
    assert read[0] == 2 * 7  # the last id of each row, then each new one
    for r, completion in zip(rows, rest, strict=True):
        assert first[r].token_ids + completion.token_ids == whole[r].token_ids


def test_a_decoding_state_is_read_once_and_only_for_its_own_rows(
    personalizer: Personalizer,
) -> None:
    from fints.decode_state import KvCarry

    prepared = personalizer.prepare(REQUESTS[:2])
    carry = KvCarry()
    first = personalizer.backend.decode(
        prepared.prompts, prepared.additions, GenerationOptions(max_new_tokens=3), carry=carry
    )
    state = carry.state
    assert state is not None
    with pytest.raises(ValueError, match="not the ids"):
        state.check([[*p, 5] for p in prepared.prompts])  # not what the rows generated
    state.check([[*p, *c.token_ids] for p, c in zip(prepared.prompts, first, strict=True)])
    state.select([1])
    with pytest.raises(ValueError, match="already gone on from"):
        state.select([0])


@pytest.mark.parametrize("keep_kv_bytes", [0, 1, 1 << 30])
def test_sliced_rows_give_the_same_tokens_with_or_without_kept_states(
    personalizer: Personalizer, keep_kv_bytes: int
) -> None:
    """With states kept, the slices after the first read only their new ids."""
    options = GenerationOptions(max_new_tokens=13)
    expected = whole(personalizer, REQUESTS, options)

    async def main() -> list[GenerationResult]:
        batcher = Batcher(
            personalizer,
            ServingMetrics(),
            max_wait_ms=0,
            slice_tokens=4,
            keep_kv_bytes=keep_kv_bytes,
        )
        await batcher.start()
        try:
            jobs = [batcher.submit(r, options, stream=False) for r in REQUESTS]
            return [(await job.result())[0] for job in jobs]
        finally:
            await batcher.stop()

    with ids_read(personalizer) as read:
        results = asyncio.run(main())
    assert essentials(results) == essentials(expected)
    width = max(len(p) for p in personalizer.prepare(REQUESTS).prompts)
    if keep_kv_bytes > 1:  # the (left-padded) prompts once, then one id per row and token
        assert read[0] == 3 * width + 3 * (13 - 1)
    else:  # none kept (none allowed, or beyond the budget): each slice reads its prefix again
        assert read[0] > 3 * width * 4


def after_a_quiet_spell(
    personalizer: Personalizer,
    first: GenerationRequest,
    options: GenerationOptions,
    **settings: Any,
) -> tuple[list[str], str]:
    """Tenant A sends ``first`` alone (no contention); once its first round runs, tenant B
    sends a 2-token request. The order the two are answered in, and A's text."""
    finished: list[str] = []
    texts: dict[str, str] = {}

    async def main() -> None:
        batcher = Batcher(personalizer, ServingMetrics(), max_wait_ms=0, **settings)
        await batcher.start()
        try:
            long = batcher.submit(first, options, stream=False)
            await long.next_event()  # Started: A's first round runs

            async def answered(name: str, job: Any) -> None:
                result, _ = await job.result()
                finished.append(name)
                texts[name] = result.text

            short = batcher.submit(
                GenerationRequest("bob", "hi", tenant="B"),
                GenerationOptions(max_new_tokens=2),
                stream=False,
            )
            await asyncio.gather(answered("A", long), answered("B", short))
        finally:
            await batcher.stop()

    asyncio.run(main())
    return finished, texts["A"]


@pytest.mark.parametrize("keep_kv_bytes", [0, 1 << 30])
def test_a_request_after_a_quiet_spell_waits_for_one_slice_when_states_are_kept(
    personalizer: Personalizer, keep_kv_bytes: int
) -> None:
    """A's 40-token request is sliced although A is alone when states are kept (B goes
    first), and decodes whole when none are kept (A goes first)."""
    first = GenerationRequest("alice", QUERY, tenant="A")
    order, _ = after_a_quiet_spell(
        personalizer,
        first,
        GenerationOptions(max_new_tokens=40),
        slice_tokens=4,
        keep_kv_bytes=keep_kv_bytes,
    )
    assert order == (["B", "A"] if keep_kv_bytes else ["A", "B"])


def test_a_prompt_read_in_chunks_then_decoded_gives_the_whole_rows_tokens(
    personalizer: Personalizer,
) -> None:
    """Steered, unsteered and raw rows, their prompts read 5 ids at a time (the last left
    for decoding), then 12 tokens: the tokens of 12 decoded at once."""
    from fints.decode_state import KvCarry

    prepared = personalizer.prepare(REQUESTS)
    backend = personalizer.backend
    options = GenerationOptions(max_new_tokens=12)
    whole = backend.decode(prepared.prompts, prepared.additions, options)
    carry = KvCarry()
    width = max(len(p) for p in prepared.prompts)
    chunks = 0
    while backend.prefill(prepared.prompts, prepared.additions, carry, 5):
        chunks += 1
        assert carry.state is not None and carry.state.read == min(5 * chunks, width - 1)
    assert chunks == -(-(width - 1) // 5)
    with ids_read(personalizer) as read:
        rest = backend.decode(prepared.prompts, prepared.additions, options, carry=carry)
    assert read[0] == 3 * 12  # the prompts' last id, then each new one but the last
    assert [c.token_ids for c in rest] == [c.token_ids for c in whole]


@pytest.mark.parametrize("prefill_tokens", [None, 8])
def test_a_long_prompt_is_read_a_chunk_per_round_and_others_go_between(
    personalizer: Personalizer, prefill_tokens: int | None
) -> None:
    """A's long prompt (2 new tokens: never sliced by its tokens) read 8 ids per round lets
    B go first; read at once (None), A goes first. A's answer is the same either way."""
    first = GenerationRequest("alice", QUERY * 3, tenant="A")
    options = GenerationOptions(max_new_tokens=2)
    order, text = after_a_quiet_spell(personalizer, first, options, prefill_tokens=prefill_tokens)
    assert order == (["B", "A"] if prefill_tokens else ["A", "B"])
    assert text == whole(personalizer, [first], options)[0].text
