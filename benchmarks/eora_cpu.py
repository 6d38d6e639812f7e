"""EoRA's low-rank term on CPU at one row (a decode step), summed over a whole model's layers: what the term costs
beside the int4 product, and whether fewer bytes per factor would make it cheaper.

    .venv/bin/python benchmarks/eora_cpu.py --threads 2

SmolLM2-135M's 30 blocks x 7 projections (q/o 576x576, k/v 576->192, gate/up 576->1536, down 1536->576), one
distinct set of weights per layer, so that a pass streams them as a decode step does (not one layer hot in cache,
as `layer_cpu.py` times). Per pass, the median of ``--passes`` passes, in ms:

* ``int4 3-bit g64``: the bare int4 CPU op over every layer's pack (`kernels.cpu.weights.repack` of random 3-bit codes);
* the EoRA term ``y + (x Vᵀ) Uᵀ`` alone, rank ``--rank``, with the factors held as: fp32 (what the CPU path runs,
  `kernels.cpu.weights.quant_linear`), fp32 with U by columns, bf16 (activations cast to bf16), int8 with one scale per
  row (``torch.ops.aten._weight_int8pack_mm``, bf16 activations; the relative error of its output against fp32 is
  printed with it).

Random weights: the time does not depend on the values. One process, one table.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import median_ms, print_table

BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.bfloat16()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--passes", type=int, default=41)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hf_compress.kernels import pack
    from hf_compress.kernels.cpu import weights as cpu

    gen = torch.Generator().manual_seed(0)
    shapes = BLOCK * args.blocks
    r, bits, group = args.rank, 3, 64
    xs = {k: torch.randn(1, k, generator=gen) for k in {k for _, k in shapes}}
    packs, fp32, cols, bf16, int8 = [], [], [], [], []
    for n, k in shapes:
        codes = torch.randint(0, 2 ** bits, (n, k), generator=gen)
        scales = torch.rand(n, k // group, generator=gen) * 0.01 + 0.001
        zeros = torch.full((n, k // group), 3.5)
        packs.append(cpu.repack(pack(codes, bits), scales, zeros, bits, group, k))
        u, v = torch.randn(n, r, generator=gen) * 0.02, torch.randn(r, k, generator=gen) * 0.02
        fp32.append((u, v))
        cols.append((u.t().contiguous().t(), v))
        bf16.append((u.bfloat16(), v.bfloat16()))
        int8.append((int8_rows(u), int8_rows(v)))
    ys = [torch.zeros(1, n) for n, _ in shapes]
    mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    mm8 = torch.ops.aten._weight_int8pack_mm.default

    def int4():
        for (n, k), p in zip(shapes, packs):
            mm4(xs[k].bfloat16(), p.weight, p.group, p.scales_zeros)

    def float_term(factors):
        def run():
            for (n, k), y, (u, v) in zip(shapes, ys, factors):
                torch.addmm(y, F.linear(xs[k], v), u.t())
        return run

    def bf16_term():
        for (n, k), y, (u, v) in zip(shapes, ys, bf16):
            y + F.linear(F.linear(xs[k].bfloat16(), v), u).float()

    def int8_term():
        for (n, k), y, ((uq, us), (vq, vs)) in zip(shapes, ys, int8):
            y + mm8(mm8(xs[k].bfloat16(), vq, vs), uq, us).float()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    (n0, k0), (u0, v0), ((uq, us), (vq, vs)) = shapes[4], fp32[4], int8[4]
    want = F.linear(F.linear(xs[k0], v0), u0)
    err8 = float((mm8(mm8(xs[k0].bfloat16(), vq, vs), uq, us).float() - want).norm() / want.norm())
    errb = float((F.linear(F.linear(xs[k0].bfloat16(), bf16[4][1]), bf16[4][0]).float() - want).norm() / want.norm())
    rows = [("int4 3-bit g64 (bare op, the product EoRA is added to)", int4, sum(p.nbytes for p in packs), ""),
            (f"EoRA r{r} fp32 factors (the CPU path)", float_term(fp32), nbytes(t for f in fp32 for t in f), "0"),
            (f"EoRA r{r} fp32, U by columns", float_term(cols), nbytes(t for f in cols for t in f), "0"),
            (f"EoRA r{r} bf16 factors", bf16_term, nbytes(t for f in bf16 for t in f), f"{errb:.1e}"),
            (f"EoRA r{r} int8 factors (_weight_int8pack_mm)", int8_term,
             nbytes(t for a, b in int8 for t in (*a, *b)), f"{err8:.1e}")]
    table = []
    with torch.inference_mode():
        for name, fn, size, err in rows:
            table.append({"what": name, "ms per pass": median_ms(fn, args.passes, warmup=1), "MB read": size / 1e6,
                          "rel. error vs fp32": err})
    print_table(table, formats={"ms per pass": ".2f", "MB read": ".1f"},
                title=f"{len(shapes)} layers, {args.threads} threads, median of {args.passes} passes")


if __name__ == "__main__":
    main()
