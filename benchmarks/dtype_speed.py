"""bf16 vs fp32 generation speed of the embedded model on this CPU, alternated in one run.

Usage: ``.venv/bin/python benchmarks/dtype_speed.py [--batch 16] [--prompt 60] [--tokens 24]``.
Prints the seconds of each run and the bf16 / fp32 ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from fints.models import cpu_has_native_bf16, resolve_source


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
    seconds: dict[torch.dtype, list[float]] = {dtype: [] for dtype in models}
    for _ in range(args.repeats):
        for dtype, model in models.items():
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            seconds[dtype].append(time.perf_counter() - start)
            print(f"{dtype}: {seconds[dtype][-1]:.2f} s", flush=True)
    bf16, fp32 = (statistics.median(seconds[d]) for d in models)
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}")
    print(f"bf16 / fp32 time: {bf16 / fp32:.2f}x (batch {args.batch}, prompt {args.prompt})")


if __name__ == "__main__":
    main()
