"""Where the CPU prefill path switches from the int4 kernel to dequantize-once
(``kernels.cpu.weights.DEQUANTIZE_ROWS``).

    .venv/bin/python benchmarks/prefill.py --threads 1 --tokens 32 64 128 256 512
    .venv/bin/python benchmarks/prefill.py --rows "4-bit g128" --tokens 32 64        # a quick look

One forward of a random prompt of each length (``logits_to_keep=1``, as ``generate``'s prefill), best of three, for
the dense model and each compressed checkpoint (built first in ``--workdir`` when missing, by
``common.build_checkpoint``, the same checkpoints as ``benchmarks/decode.py``'s, which shares the folder), once
with every call on the int4 kernel and once with every call dequantizing (the two paths ``quant_linear`` chooses
between); ratios to the dense model in the same dtype (``--dtype``, default bf16: the stricter comparison). One
process, one table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import checkpoint_slug, ensure_checkpoints, print_table

#: row -> the hf-compress config of its checkpoint (data-free: no calibration)
CHECKPOINTS = {"4-bit g128": {"method": "rtn", "bits": 4, "group_size": 128},
               "3-bit g64": {"method": "hqq", "bits": 3, "group_size": 64},
               "2-bit g32": {"method": "hqq", "bits": 2, "group_size": 32},
               "8-bit g128": {"method": "rtn", "bits": 8, "group_size": 128}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/hf-compress-decode",
                    help="where the checkpoints are built (reused; benchmarks/decode.py's default folder)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--rows", nargs="+", choices=list(CHECKPOINTS), default=list(CHECKPOINTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    work = Path(args.workdir)
    ensure_checkpoints(["dense", *(CHECKPOINTS[r] for r in args.rows)], work)

    import torch
    from transformers import AutoModelForCausalLM

    import hf_compress  # noqa: F401  (registers the checkpoint format)
    from hf_compress.kernels.cpu import weights as cpu

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

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
    cols = [f"{n} tokens" for n in args.tokens]
    rows = [{"row": "dense", "path": "", **{f"{n} tokens": f"{base[n]:.0f}" for n in args.tokens}}]
    chosen = dict(cpu.DEQUANTIZE_ROWS)
    for row in args.rows:
        model = AutoModelForCausalLM.from_pretrained(work / checkpoint_slug(CHECKPOINTS[row]), dtype=dtype).eval()
        for path, n_rows in (("int4 kernel", 10**9), ("dequantize", 1)):
            cpu.DEQUANTIZE_ROWS.update({1: n_rows, 2: n_rows})
            ms = {n: best_ms(model, ids) for n, ids in prompts.items()}
            rows.append({"row": row, "path": path,
                         **{f"{n} tokens": f"{ms[n]:.0f} ({ms[n] / base[n]:.2f})" for n in args.tokens}})
            print(rows[-1], flush=True)
        cpu.DEQUANTIZE_ROWS.update(chosen)
        del model
    print_table(rows, ["row", "path", *cols],
                title=f"\nSmolLM2-135M prefill, {args.dtype} model, {args.threads} threads, ms (x dense {args.dtype}); "
                      f"DEQUANTIZE_ROWS = {cpu.DEQUANTIZE_ROWS}")


if __name__ == "__main__":
    main()
