"""Kernel roofline benchmark: one command, one table, everything measured in one run.

    .venv/bin/python benchmarks/kernels_roofline.py                 # GPU: Triton vs cuBLAS dense vs torch (eager, compiled)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kernels_roofline.py  # CPU: the torch fallbacks vs dense (about 1-2 min)
    .venv/bin/python benchmarks/kernels_roofline.py --shapes 4096x4096 --batches 1 --ratios 0.4 --bits 4 --no-compile

Llama-7B-like layers (in x out: 4096x4096 q/k/v/o, 4096x11008 gate/up, 11008x4096 down); low-rank at parameter
ratios 0.2 0.4 0.6 (rank floor((1-ratio)·in·out/(in+out))), 4- and 3-bit group-128 quantization, optionally
4-bit + a rank-64 low-rank term (--eora 64; the ``triton`` column is then the one-launch fused kernel up to 16
tokens, ``triton two-launch`` the x·Vᵀ launch followed by the quant GEMM with the low-rank epilogue); batches of 1, 16 and 256 tokens. The CPU defaults are smaller
(batches 1 and 16, 4-bit only: the quant fallback takes seconds per call there).

Columns: ``weight MB`` the bytes of the layer's tensors (codes, scales, zeros, factors); ``time`` the median;
``GB/s`` (weight + input + output bytes) / time; ``%BW`` that against the GPU's memory bandwidth (the
roofline for batch 1, where the layer is a pure weight stream); ``x dense`` the dense F.linear time over this
row's; ``target`` = 0.8 · dense bytes / compressed bytes, the speed-up the issue asks of the batch-1 low-rank
and 4-bit kernels (together with %BW >= 80), ``ok`` whether this row meets both.

GPU timing: ``triton.testing.do_bench`` (median, L2 flushed before every call, so weights come from HBM; the
flush also hides Python launch overhead). CPU: median wall time of repeated calls (dtype fp32), the caches
flushed (a 256 MB write) before each.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common import print_table
from hf_compress.kernels.reference import weights as reference

#: memory bandwidth (GB/s) by device-name fragment: vendor specs
SPEC_BW = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350,
           "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L40": 864, "A10G": 600,
           "A10": 600, "L4": 300, "RTX 4090": 1008, "RTX 3090": 936, "V100": 900, "T4": 320}


def spec_bandwidth(name: str) -> float | None:
    for key, bw in SPEC_BW.items():
        if key in name:
            return float(bw)
    return None


def measured_copy_bandwidth(device) -> float:
    """GB/s of a large device-to-device copy (read + write)."""
    n = 256 * 2**20
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, flush=False)
    return 2 * n * 4 / t / 1e9


def measured_read_bandwidth(device) -> float:
    """GB/s of streaming-reading 256 MB (a sum): a weight stream's roofline where no spec number is known."""
    src = torch.ones(64 * 2**20, dtype=torch.float32, device=device)
    t = bench(lambda: src.sum(), device, flush=False)
    return src.numel() * 4 / t / 1e9


def bench(fn, device, flush=True) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        if flush:
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
    t0 = time.perf_counter()
    fn()  # warm-up
    slow = time.perf_counter() - t0 > 0.5  # calls of seconds (the quant fallback): two timed calls are enough
    times, start = [], time.perf_counter()
    while len(times) < (2 if slow else 3) or (time.perf_counter() - start < 0.5 and len(times) < 50):
        if flush:  # evict the weights from the last-level cache, as do_bench does for L2 on the GPU
            _cpu_flush_buffer().add_(1)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_FLUSH = []


def _cpu_flush_buffer() -> torch.Tensor:
    if not _FLUSH:
        _FLUSH.append(torch.zeros(64 * 2**20, dtype=torch.int32))  # 256 MB, far over any CPU cache
    return _FLUSH[0]


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def layer_cases(in_f, out_f, args, dtype, device):
    """[(label, detail, weight tensors, {impl: fn(x)})] for one layer shape."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    cases = []
    w = rnd(out_f, in_f, scale=in_f**-0.5)
    cases.append(("dense", "", [w], {"cuBLAS" if device.type == "cuda" else "torch": lambda x: F.linear(x, w)}))
    for ratio in args.ratios:
        r = math.floor((1 - ratio) * in_f * out_f / (in_f + out_f))
        u, v = rnd(out_f, r, scale=r**-0.5), rnd(r, in_f, scale=in_f**-0.5)
        cases.append(("lowrank", f"ratio {ratio} r={r}", [u, v], impls(
            lambda x, u=u, v=v: reference.lowrank_linear(x, u, v, None),
            "lowrank", dict(u=u, v=v), device, args)))
    quant = [(b, 0) for b in args.bits] + [(4, r) for r in args.eora if r]
    for bits, rank in quant:
        ng = -(-in_f // args.group)
        words = reference.packed_words(in_f, bits)
        qw = torch.randint(-2**31, 2**31 - 1, (out_f, words), generator=g, dtype=torch.int32).to(device)
        s = (torch.rand(out_f, ng, generator=g) * 0.02).to(device=device, dtype=torch.float16)
        z = torch.full((out_f, ng), 2.0**(bits - 1), dtype=torch.float16, device=device)
        u = rnd(out_f, rank, scale=0.01) if rank else None
        v = rnd(rank, in_f, scale=in_f**-0.5) if rank else None
        qa = (qw, s, z, bits, args.group, in_f)
        detail = f"{bits}-bit g{args.group}" + (f" +r{rank}" if rank else "")
        cases.append(("quant", detail, [qw, s, z, u, v], impls(
            lambda x, qa=qa, u=u, v=v: reference.quant_linear(x, *qa, None, u, v),
            "quant", dict(qa=qa, u=u, v=v), device, args)))
    return cases


def impls(torch_fn, kind, t, device, args):
    out = {"torch": torch_fn}
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return out  # (under TRITON_INTERPRET=1 the triton column runs on CPU: a smoke test of this script)
    if not args.no_compile and device.type == "cuda":
        out["torch.compile"] = torch.compile(torch_fn, dynamic=False)
    from hf_compress.kernels.triton import lowrank as triton_lowrank
    from hf_compress.kernels.triton import weights as triton_quant

    if kind == "lowrank":
        out["triton"] = lambda x: triton_lowrank.lowrank_linear(x, t["u"], t["v"], None)
    else:
        out["triton"] = lambda x: triton_quant.quant_linear(x, *t["qa"], None, t["u"], t["v"])
        if t["u"] is not None:  # Q+LR: the one-launch decode kernel (auto up to 16 rows) against the two launches
            out["triton two-launch"] = lambda x: triton_quant.quant_linear(x, *t["qa"], None, t["u"], t["v"],
                                                                           path="two-launch")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096"], help="IN x OUT")
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="tokens per call (GPU 1 16 256, CPU 1 16)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    ap.add_argument("--bits", nargs="+", type=int, default=None, help="GPU default 4 3, CPU 4")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--eora", nargs="+", type=int, default=[0], help="also 4-bit + this low-rank rank (fused Q+LR)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16 (GPU default) / bfloat16 / float32 (CPU default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (GPU)")
    ap.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in GB/s for the %%BW column")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    batches = args.batches or ([1, 16, 256] if device.type == "cuda" else [1, 16])
    args.bits = args.bits or ([4, 3] if device.type == "cuda" else [4])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        copy_bw = measured_copy_bandwidth(device)
        bw = args.bandwidth or spec_bandwidth(name) or copy_bw
        device_line = (f"device {name}; memory bandwidth {bw:.0f} GB/s for %BW (measured copy {copy_bw:.0f} GB/s); "
                       f"dtype {str(dtype)[6:]}; torch {torch.__version__}")
    else:
        read_bw = measured_read_bandwidth(device)
        bw = args.bandwidth or read_bw
        device_line = (f"device CPU ({torch.get_num_threads()} threads); memory bandwidth {bw:.1f} GB/s for %BW "
                       f"(measured: streaming read of 256 MB); dtype {str(dtype)[6:]}; torch {torch.__version__}; the "
                       "torch fallbacks (the kernels' specification) against dense F.linear")
    print(f"# {device_line}", flush=True)

    rows = []
    t_start = time.time()
    for shape in args.shapes:
        in_f, out_f = (int(s) for s in shape.lower().split("x"))
        cases = layer_cases(in_f, out_f, args, dtype, device)
        dense_bytes = nbytes(*cases[0][2])
        for m in batches:
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            io = x.numel() * x.element_size() + m * out_f * x.element_size()
            dense_t = None
            for kind, detail, tensors, fns in cases:
                wb = nbytes(*tensors)
                target = 0.8 * dense_bytes / wb if kind != "dense" else None
                for impl, fn in fns.items():
                    try:
                        t = bench(lambda: fn(x), device)
                    except Exception as e:  # noqa: BLE001 - one failing column must not lose the table
                        print(f"# {shape} {kind} {detail} {impl} m={m}: {type(e).__name__}: {e}", file=sys.stderr)
                        continue
                    if kind == "dense":
                        dense_t = t
                    gbs = (wb + io) / t / 1e9
                    pct = 100 * gbs / bw if bw else None
                    speed = dense_t / t if dense_t else None
                    ok = ""
                    targeted = kind == "lowrank" or detail == f"4-bit g{args.group}"
                    if device.type == "cuda" and m == 1 and impl == "triton" and targeted:
                        ok = "yes" if (pct or 0) >= 80 and (speed or 0) >= target else "no"
                    rows.append(dict(shape=f"{in_f}x{out_f}", kind=kind, detail=detail, impl=impl, m=m, mb=wb / 1e6,
                                     us=t * 1e6, gbs=gbs, pct=pct, speed=speed, target=target, ok=ok))
                    print(f"# {rows[-1]['shape']} m={m} {kind} {detail} {impl}: {t * 1e6:.1f} us", flush=True)

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    table = [{"layer in x out": r["shape"], "kind": r["kind"], "detail": r["detail"], "impl": r["impl"], "tokens": r["m"],
              "weight MB": f"{r['mb']:.2f}", "time µs": f"{r['us']:.1f}", "GB/s": f"{r['gbs']:.1f}",
              "%BW": f(r["pct"], ".0f"), "x dense": f(r["speed"], ".2f"), "target": f(r["target"], ".2f"), "ok": r["ok"]}
             for r in rows]
    print_table(table, title=f"\n{device_line} (measured in {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
