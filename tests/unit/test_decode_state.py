"""Decoding that stops and goes on (fints.decode_state): a prompt read in chunks, decoded
in slices that go on from the kept KV cache, with rows dropped between slices, gives the
tokens of one whole decoding, on every supported architecture (tiny random models,
float32, greedy)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from fints.decode_state import KvCarry
from fints.generation import GenerationOptions, generate_batch, prefill_batch
from fints.layers import resolve_layout
from fints.models import LoadedModel
from tests.conftest import ARCHITECTURES, VOCAB, tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one thread (two threads wait on each other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loaded(arch: str) -> LoadedModel:
    tokenizer = SimpleNamespace(
        pad_token_id=0,
        eos_token_id=2,
        decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)),
    )
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None  # random weights: decode every token
    tokenizer.eos_token_id = None
    return LoadedModel(model, tokenizer, arch, "fp", resolve_layout(model))  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunks_and_slices_from_the_kept_cache_give_the_whole_tokens(arch: str) -> None:
    torch.manual_seed(1)
    model = loaded(arch)
    prompts = [torch.randint(3, VOCAB, (n,)).tolist() for n in (17, 5, 11)]
    whole = generate_batch(model, prompts, GenerationOptions(max_new_tokens=10))
    carry = KvCarry()
    while prefill_batch(model, prompts, carry, 3):  # 16 of the widest row's 17 ids
        pass
    assert carry.state is not None and carry.state.unread == 1
    first = generate_batch(model, prompts, GenerationOptions(max_new_tokens=4), carry=carry)
    rows = [2, 0]  # row 1 is done; the others go on in another order
    assert carry.state is not None
    carry.state = carry.state.select(rows)
    more = [[*prompts[r], *first[r].token_ids] for r in rows]
    rest = generate_batch(model, more, GenerationOptions(max_new_tokens=6), carry=carry)
    assert [c.token_ids for c in first] == [c.token_ids[:4] for c in whole]
    for r, completion in zip(rows, rest, strict=True):
        assert first[r].token_ids + completion.token_ids == whole[r].token_ids, r


def test_nothing_left_to_read_is_said_and_leaves_the_state_as_it_was() -> None:
    model = loaded("llama")
    carry = KvCarry()
    assert not prefill_batch(model, [[5]], carry, 8)  # one id: it is generate's to read
    assert carry.state is not None and carry.state.read == 0 and carry.state.unread == 1
