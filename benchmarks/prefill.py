"""Where the CPU prefill path switches from the int4 kernel to dequantize-once
(``kernels.cpu.weights.DEQUANTIZE_ROWS``).

    .venv/bin/python benchmarks/decode.py --rows "rtn 4-bit g128"     # builds the checkpoints first (reused)
    .venv/bin/python benchmarks/prefill.py --threads 1 --tokens 32 64 128 256 512

One forward of a random prompt of each length (``logits_to_keep=1``, as ``generate``'s prefill), best of three, for
the dense model and each compressed checkpoint of ``benchmarks/decode.py`` (``--workdir``), once with every call on
the int4 kernel and once with every call dequantizing (the two paths ``quant_linear`` chooses between); ratios to
the dense model in the same dtype (``--dtype``, default bf16: the stricter comparison). One process, one table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

CHECKPOINTS = {"4-bit g128": "methodrtn-bits4-group_size128", "3-bit g64": "methodhqq-bits3-group_size64",
               "2-bit g32": "methodhqq-bits2-group_size32", "8-bit g128": "methodrtn-bits8-group_size128"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/hf-compress-decode", help="benchmarks/decode.py's checkpoints")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--rows", nargs="+", choices=list(CHECKPOINTS), default=list(CHECKPOINTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import hf_compress  # noqa: F401  (registers the checkpoint format)
    from hf_compress.kernels.cpu import weights as cpu

    torch.set_num_threads(args.threads)
    work, dtype = Path(args.workdir), getattr(torch, args.dtype)
    missing = [d for d in ["dense", *(CHECKPOINTS[r] for r in args.rows)] if not (work / d / "config.json").exists()]
    if missing:
        raise SystemExit(f"no checkpoint {missing} under {work}: build them with benchmarks/decode.py first")

    def best_ms(model, ids) -> float:
        with torch.inference_mode():
            model(ids, logits_to_keep=1)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(ids, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
        return 1000 * min(times)

    prompts = {n: torch.randint(0, 40000, (1, n), generator=torch.Generator().manual_seed(n)) for n in args.tokens}
    dense = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=dtype).eval()
    base = {n: best_ms(dense, ids) for n, ids in prompts.items()}
    del dense
    print(f"\nSmolLM2-135M prefill, {args.dtype} model, {args.threads} threads, ms (x dense {args.dtype}); "
          f"DEQUANTIZE_ROWS = {cpu.DEQUANTIZE_ROWS}")
    print("\n| row | path | " + " | ".join(f"{n} tokens" for n in args.tokens) + " |\n|" + "---|" * (2 + len(prompts)))
    print("| dense | | " + " | ".join(f"{base[n]:.0f}" for n in args.tokens) + " |")
    chosen = dict(cpu.DEQUANTIZE_ROWS)
    for row in args.rows:
        model = AutoModelForCausalLM.from_pretrained(work / CHECKPOINTS[row], dtype=dtype).eval()
        for path, rows in (("int4 kernel", 10**9), ("dequantize", 1)):
            cpu.DEQUANTIZE_ROWS.update({1: rows, 2: rows})
            ms = {n: best_ms(model, ids) for n, ids in prompts.items()}
            print(f"| {row} | {path} | " + " | ".join(f"{ms[n]:.0f} ({ms[n] / base[n]:.2f})" for n in args.tokens)
                  + " |", flush=True)
        cpu.DEQUANTIZE_ROWS.update(chosen)
        del model


if __name__ == "__main__":
    main()
