"""bf16 vs fp32 generation speed of the embedded model on this CPU, alternated in one run.

Usage: ``.venv/bin/python benchmarks/dtype_speed.py [--batch 16] [--prompt 60] [--tokens 24]``.
Prints the median seconds of each dtype and their ratio.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from transformers import AutoModelForCausalLM

from fints.models import cpu_has_native_bf16, resolve_source
from fints.perf import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=60, help="prompt tokens per row")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_source(None)
    models = {
        dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        for dtype in (torch.bfloat16, torch.float32)
    }
    ids = torch.randint(
        100, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)
    )

    def run(model: torch.nn.Module) -> object:
        with torch.inference_mode():
            return model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=0,
            )

    # one warm-up each, then ABBA order and medians (the same helper as `fints perf`)
    calls = [partial(run, model) for model in models.values()]
    bf16, fp32 = interleaved(calls, args.repeats)
    print(f"bf16: {bf16.wall:.2f} s wall, {bf16.cpu:.2f} s CPU")
    print(f"fp32: {fp32.wall:.2f} s wall, {fp32.cpu:.2f} s CPU")
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}")
    shape = f"batch {args.batch}, prompt {args.prompt}, {args.tokens} new tokens"
    print(f"bf16 / fp32 wall time: {bf16.wall / fp32.wall:.2f}x ({shape})")


if __name__ == "__main__":
    main()
