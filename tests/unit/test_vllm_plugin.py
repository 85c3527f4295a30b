"""The vLLM plugin's parts that need no vLLM: packing, the vector bank, request rows."""

from __future__ import annotations

import base64

import pytest
import torch
from torch import nn

from fints.errors import InvalidInputError
from fints.generation import GenerationOptions
from fints.modes import SteeringAddition
from fints.sites import Site
from fints.vllm_engine.requests import completion_of, row_extras, vllm_rows
from fints.vllm_plugin.bank import SteeringBank, decoder_layers
from fints.vllm_plugin.packing import STEERING_KEY, pack_steering, steering_salt, unpack_steering

HIDDEN = 8
A, M, B = Site(0, "attn"), Site(1, "mlp"), Site(1, "block")


class Layer(nn.Module):
    """vLLM's shape of a decoder layer: tokens flattened, ``(hidden, residual)`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Linear(HIDDEN, HIDDEN)
        self.mlp = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.self_attn(x)
        return self.mlp(h), h


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            out, residual = layer(x)
            x = out + residual
        return x


def vectors(seed: int) -> dict[Site, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(HIDDEN, generator=g) for s in (A, M, B)}


def test_packing_round_trips_and_salts_by_content() -> None:
    v = vectors(0)
    packed = pack_steering(v)
    assert all(isinstance(x, str | int | list) for x in packed.values())  # JSON-safe
    back = unpack_steering(packed)
    assert set(back) == set(v) and all(torch.equal(back[s], v[s]) for s in v)
    assert steering_salt(packed) == steering_salt(pack_steering(vectors(0)))
    assert steering_salt(packed) != steering_salt(pack_steering(vectors(1)))
    assert steering_salt(None) is None


@pytest.mark.parametrize(
    "change",
    [
        {"version": 9},
        {"sites": ["0.nowhere"]},
        {"hidden": 7},
        {"data": "not base64!"},
        {"data": base64.b64encode(b"\0" * 12).decode()},
    ],
)
def test_malformed_packing_is_refused_with_a_clear_error(change: dict) -> None:
    with pytest.raises(InvalidInputError):
        unpack_steering({**pack_steering(vectors(0)), **change})


def test_nonfinite_vectors_are_not_packed() -> None:
    with pytest.raises(InvalidInputError, match=r"1\.mlp"):
        pack_steering({A: torch.zeros(HIDDEN), M: torch.full((HIDDEN,), float("nan"))})


def run(model: Model, bank: SteeringBank, batch: list[tuple[str, torch.Tensor, dict | None]]):
    """One forward of a flattened batch; per request its output rows."""
    bank.update([(r, len(x), extra) for r, x, extra in batch], {r for r, _, _ in batch})
    out = model(torch.cat([x for _, x, _ in batch]))
    return dict(
        zip([r for r, _, _ in batch], out.split([len(x) for _, x, _ in batch]), strict=True)
    )


def steered_alone(model: Model, v: dict[Site, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The reference: hooks that add ``v`` to every token, one request alone."""
    parts = {A: model.model.layers[0].self_attn, M: model.model.layers[1].mlp}
    handles = [parts[s].register_forward_hook(lambda _m, _i, o, s=s: o + v[s]) for s in (A, M)]
    handles.append(
        model.model.layers[1].register_forward_hook(lambda _m, _i, o: (o[0] + v[B], o[1]))
    )
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def test_each_request_of_a_mixed_batch_gets_its_own_vectors() -> None:
    torch.manual_seed(0)
    model = Model().eval()
    xs = {r: torch.randn(n, HIDDEN) for r, n in (("u1", 3), ("plain", 2), ("u2", 1))}
    with torch.no_grad():
        alone = {
            "u1": steered_alone(model, vectors(1), xs["u1"]),
            "u2": steered_alone(model, vectors(2), xs["u2"]),
            "plain": model(xs["plain"]),
        }
        assert not torch.allclose(alone["u1"], model(xs["u1"]))  # steering does something
        bank = SteeringBank(decoder_layers(model), 4, HIDDEN, torch.float32, torch.device("cpu"))
        extras = {"u1": {STEERING_KEY: pack_steering(vectors(1))}, "plain": None,
                  "u2": {STEERING_KEY: pack_steering(vectors(2))}}  # fmt: skip
        out = run(model, bank, [(r, xs[r], extras[r]) for r in xs])
    for r in xs:
        assert torch.allclose(out[r], alone[r], atol=1e-6), r


def test_slots_are_freed_when_requests_end_and_unsteered_batches_pass_through() -> None:
    model = Model().eval()
    bank = SteeringBank(decoder_layers(model), 3, HIDDEN, torch.float32, torch.device("cpu"))
    x = torch.randn(2, HIDDEN)
    for round_ in range(5):  # 2 usable slots, 10 steered requests over time
        a, b = f"a{round_}", f"b{round_}"
        extra = {STEERING_KEY: pack_steering(vectors(round_))}
        bank.update([(a, 2, extra), (b, 2, extra)], {a, b})
        assert sorted(bank.slot_of.values()) == [1, 2]
    bank.update([("plain", 2, None)], {"plain"})
    assert bank.slot_of == {} and bank.index is None
    assert all(not t.any() for t in bank.tables.values())  # freed slots are zeroed
    with torch.no_grad():
        assert torch.equal(model(x), Model.forward(model, x))
    bank.close()
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_bad_steering_in_the_worker_falls_back_to_unsteered_instead_of_failing() -> None:
    model = Model().eval()
    bank = SteeringBank(decoder_layers(model), 3, HIDDEN, torch.float32, torch.device("cpu"))
    wrong = {STEERING_KEY: pack_steering({A: torch.ones(HIDDEN + 1)})}
    bank.update([("r", 2, wrong), ("s", 1, {STEERING_KEY: {"version": 0}})], {"r", "s"})
    assert bank.index is None and bank.slot_of == {}


def addition(rows: list[dict[Site, torch.Tensor] | None]) -> SteeringAddition:
    stacked = {
        s: torch.stack([r[s] if r else torch.zeros(HIDDEN) for r in rows]) for s in (A, M, B)
    }
    return SteeringAddition(stacked, tuple(() for _ in rows), tuple(() for _ in rows))


def test_rows_carry_packed_steering_and_an_unsteered_row_carries_nothing() -> None:
    options = GenerationOptions(max_new_tokens=5, repetition_penalty=1.2)
    rows = vllm_rows([[1, 2], [3]], [addition([vectors(0), None])], options, [["\n"], []], {2})
    assert rows[0].sampling["extra_args"][STEERING_KEY]["sites"] == ["0.attn", "1.block", "1.mlp"]
    assert rows[0].prompt["cache_salt"].startswith("fints-")
    assert rows[1].sampling["extra_args"] is None and "cache_salt" not in rows[1].prompt
    assert rows[0].sampling["stop"] == ["\n"] and rows[0].sampling["repetition_penalty"] == 1.2
    assert rows[0].sampling["stop_token_ids"] == [2] and rows[0].sampling["temperature"] == 0


def test_an_addition_vllm_cannot_carry_is_refused_by_name() -> None:
    class Other:
        pass

    with pytest.raises(InvalidInputError, match="Other is not available on the vLLM engine"):
        row_extras([Other()], 1)  # type: ignore[list-item]


class Tok:
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return " " + "".join(chr(96 + i) for i in ids)


def test_completions_are_cut_like_the_transformers_backend() -> None:
    done = completion_of(Tok(), 3, [1, 2, 9], "stop", (), {9})
    assert (done.text, done.token_ids, done.finish_reason) == ("ab", [1, 2], "stop")
    cut = completion_of(Tok(), 3, [1, 2, 3, 4], "stop", ("c",), {9})
    assert cut.text == "ab"
    assert completion_of(Tok(), 3, [1], "length", (), {9}).finish_reason == "length"
