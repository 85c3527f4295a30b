"""What a slice costs: rows decoded whole, in slices that go on from the kept KV cache
(``fints.decode_state``, what the server does), and in slices that decode their prefix
again (``fints serve --keep-kv-mib 0``); one run, the same rows, and whether each way
gives the whole rows' tokens.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/slice_resume.py --dtype float32
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from fints.decode_state import KvCarry
from fints.generation import Completion, GenerationOptions, generate_batch
from fints.models import LoadedModel, load_model

QUESTIONS = [
    "Tell me everything about the history of the Roman empire. " * 20,
    "Write a poem about the sea.",
    "What is two plus two? Explain.",
    "List three fruits and describe them in detail.",
]


def sliced(
    model: LoadedModel, prompts: list[list[int]], slices: int, size: int, keep: bool
) -> list[list[int]]:
    """Each row's tokens after ``slices`` slices of ``size``, as the batcher decodes them."""
    tokens: list[list[int]] = [[] for _ in prompts]
    carry = KvCarry() if keep else None
    for _ in range(slices):
        rows = [[*p, *t] for p, t in zip(prompts, tokens, strict=True)]
        if carry is not None and carry.state is not None:
            carry.state = carry.state.select(range(len(prompts)))
        out = generate_batch(model, rows, GenerationOptions(max_new_tokens=size), carry=carry)
        for t, completion in zip(tokens, out, strict=True):
            t += completion.token_ids
    return tokens


def same(tokens: list[list[int]], whole: list[Completion]) -> int:
    return sum(t == w.token_ids for t, w in zip(tokens, whole, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--slice-tokens", type=int, default=8)
    args = parser.parse_args()
    model = load_model(dtype=args.dtype)
    tok = model.tokenizer
    prompts: list[list[int]] = []
    for question in QUESTIONS:
        chat = [{"role": "user", "content": question}]
        ids: Any = tok.apply_chat_template(chat, add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    n = args.slices * args.slice_tokens
    began = time.perf_counter()
    whole = generate_batch(model, prompts, GenerationOptions(max_new_tokens=n))
    times = {"whole": time.perf_counter() - began}
    if any(c.finish_reason != "length" for c in whole):  # its slices would end early
        raise SystemExit(f"a row ended before {n} tokens: use fewer --slices")
    results = {}
    for name, keep in (("kept KV cache", True), ("prefix decoded again", False)):
        began = time.perf_counter()
        results[name] = sliced(model, prompts, args.slices, args.slice_tokens, keep)
        times[name] = time.perf_counter() - began
    print(
        f"{model.name}, {args.dtype}, {torch.get_num_threads()} thread(s); {len(prompts)} rows "
        f"(prompts of {[len(p) for p in prompts]} tokens) x {n} tokens, "
        f"{args.slices} slices of {args.slice_tokens}"
    )
    print(f"whole: {times['whole']:.2f} s")
    for name, tokens in results.items():
        print(
            f"{name}: {times[name]:.2f} s = {times[name] / times['whole']:.2f}x whole; "
            f"rows with the whole rows' tokens: {same(tokens, whole)} of {len(prompts)}"
        )


if __name__ == "__main__":
    main()
