"""One compressed layer on CPU, one row (a decode step), module forward as a model calls it: what the int4 path,
EoRA's low-rank term and the module's Python overhead cost at SmolLM2's sizes and at Llama-7B's.

    .venv/bin/python benchmarks/layer_cpu.py --threads 2

Per shape (in x out), median of many fp32-input forwards under ``torch.inference_mode``: dense ``nn.Linear`` fp32 and
bf16, `QuantLinear` 3-bit g64 on the CPU int4 kernel without and with EoRA r32 (fp32 factors) and the bare int4 op
(``_weight_int4pack_mm_for_cpu`` on the layer's pack: the module's overhead is the difference), and `LowRankLinear`
at ratio 0.4 of the dense parameters. Random weights: the time does not depend on the values. One process, one table.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import print_table


def median_us(fn, seconds: float = 0.5) -> float:
    for _ in range(20):
        fn()
    times, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 50:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["576x576", "576x1536", "4096x4096", "4096x11008"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hf_compress.kernels.cpu import weights as cpu
    from hf_compress.modules.lowrank import LowRankLinear
    from hf_compress.modules.quant import QuantLinear

    cols = ["shape", "dense fp32", "dense bf16", "int4 op", "3-bit module", "+ EoRA r32", "EoRA cost",
            "low rank 0.4", "x dense fp32 (low rank)"]
    rows = []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        x = torch.randn(1, 1, k)
        row = {"shape": shape}
        with torch.inference_mode():
            dense = torch.nn.Linear(k, n, bias=False)
            row["dense fp32"] = median_us(lambda: dense(x))
            dense_b, xb = torch.nn.Linear(k, n, bias=False).bfloat16(), x.bfloat16()
            row["dense bf16"] = median_us(lambda: dense_b(xb))
            for rank in (0, 32):
                layer = QuantLinear(k, n, 3, 64, rank=rank, bias=False)
                layer.qweight.random_(-2**31, 2**31 - 1)
                layer.scales.uniform_(0.01, 0.02)
                if rank:
                    layer.U.normal_(0, 0.01)
                    layer.V.normal_(0, 0.01)
                layer(x)
                row["+ EoRA r32" if rank else "3-bit module"] = median_us(lambda: layer(x))
            pack = layer._kernel_cache["pack"]
            x2 = x.view(1, k).bfloat16()
            row["int4 op"] = median_us(lambda: cpu._int4_mm()(x2, pack.weight, pack.group, pack.scales_zeros))
            row["EoRA cost"] = f"+{100 * (row['+ EoRA r32'] / row['3-bit module'] - 1):.0f}%"
            r = int(0.4 * k * n / (k + n))
            low = LowRankLinear(k, n, r, bias=False)
            row["low rank 0.4"] = median_us(lambda: low(x))
            row["x dense fp32 (low rank)"] = f"{row['dense fp32'] / row['low rank 0.4']:.2f}"
        rows.append(row)
        print(row, flush=True)
    print_table(rows, cols, formats=dict.fromkeys(cols, ".1f"), title=f"\nus per forward, 1 row, {args.threads} threads")


if __name__ == "__main__":
    main()
