"""What SmolLM2-135M's tied lm_head (49152 x 576, dense in every compressed checkpoint) costs per decoded token on
CPU, next to the 210 projections it sits beside: median of 200 single-row GEMVs per dtype.

    .venv/bin/python benchmarks/lm_head.py --threads 1
"""

import argparse

import torch
import torch.nn.functional as F

from common import median_ms, print_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        w, x = torch.randn(49152, 576, dtype=dtype), torch.randn(1, 576, dtype=dtype)
        rows.append({"layer": "lm_head 49152x576", "dtype": str(dtype).removeprefix("torch."),
                     "ms/token": median_ms(lambda: F.linear(x, w))})
    print_table(rows, formats={"ms/token": ".2f"}, title=f"{args.threads} threads, median of 200 single-row GEMVs")


if __name__ == "__main__":
    main()
