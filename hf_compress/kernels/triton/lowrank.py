"""Triton kernels for the low-rank product y = (x·Vᵀ)·Uᵀ + b (spec: `reference.weights.lowrank_linear`).

Two regimes, picked by the number of rows M of the flattened input:

* **decode** (M <= ``DECODE_MAX_M``): one fused kernel, split over the rank. Program (j, s) owns the rank
  slice j (``BLOCK_R`` rows of V, columns of U): it streams its V rows once (over K), keeps the partial
  intermediate t_j = x·V_jᵀ [M, BLOCK_R] in registers, then streams the matching U columns (over the output
  chunks s, s + SPLIT_N, ...) and adds t_j·U_jᵀ into an fp32 accumulator with atomics. V and U are each read
  exactly once, t never goes to global memory, and the grid (R / BLOCK_R × SPLIT_N programs) stays wide even
  for batch 1. The bias is added by the j = 0 programs. For fp16/bf16 outputs a per-chunk arrival counter
  lets the last program to finish an output chunk cast it into the output tensor (no extra launch).
  M = 1 uses CUDA-core multiply-reduce (a GEMV); 2..16 rows use ``tl.dot`` on a 16-row tile.
* **prefill** (M > ``DECODE_MAX_M``): two tiled tensor-core GEMMs (``_mm_nt_kernel``, grouped tile order for
  L2 reuse, bias fused into the second's epilogue). Here the intermediate t [M, R] is tiny next to the
  factors and L2-resident, and recomputing x·V_jᵀ per output tile (full fusion) would multiply the FLOPs of
  the first product by N / BLOCK_N; the two-GEMM split is the right tiling.

All accumulation is fp32; the output has x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, as_2d, autotuned, cfg, device_ctx, dot_precision, grouped_tile, launch, m_bucket,
                     upcast_dots)

DECODE_MAX_M = 16


# ------------------------------------------------------------------------------------------- dense A·Bᵀ GEMM
@triton.jit
def _mm_nt_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, MB, stride_am, stride_bn, stride_cm,
                  HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c [M, N] = a [M, K] · b [N, K]ᵀ (+ bias [N]); unit stride along K and N. BLOCK_M == 1: GEMV."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :],
                    other=0.0)
        if BLOCK_M == 1:
            b = tl.load(b_ptr + rn[:, None] * stride_bn + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :],
                        other=0.0)
            acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)[None, :]
        else:
            b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None], mask=(rn < N)[None, :] & (kk < K)[:, None],
                        other=0.0)
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
            else:
                acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


_MM_GEMV = [cfg(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((16, 256, 4, 2), (8, 512, 4, 2), (32, 256, 4, 2), (16, 512, 8, 2), (64, 128, 4, 2),
                                 (4, 1024, 4, 2))]
_MM_SMALL = [cfg(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=w, num_stages=s)
             for bn, bk, w, s in ((32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 4), (32, 256, 4, 3),
                                  (16, 256, 4, 3))]
_MM_LARGE = [cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                                      (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (32, 64, 64, 4, 4),
                                      (64, 32, 128, 4, 4))]
_MM_KEY = ["MB", "N", "K"]
_mm_gemv = autotuned(_mm_nt_kernel, _MM_GEMV, _MM_KEY, interp=cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, GROUP_M=1))
_mm_small = autotuned(_mm_nt_kernel, _MM_SMALL, _MM_KEY, interp=cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1))
_mm_large = autotuned(_mm_nt_kernel, _MM_LARGE, _MM_KEY, interp=cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=2))


def mm_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
          config: dict | None = None) -> torch.Tensor:
    """a [M, K] · b [N, K]ᵀ (+ bias) -> [M, N] in ``out_dtype`` (default a's), fp32 accumulation."""
    a, b = a.contiguous(), b.contiguous()
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty(M, N, device=a.device, dtype=out_dtype or a.dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(c))
    tuner = _mm_gemv if M == 1 else _mm_small if M <= DECODE_MAX_M else _mm_large
    if config is not None and "BLOCK_M" not in config:
        config = {"BLOCK_M": 1 if M == 1 else 16, **config}
    bias_arg = bias.contiguous() if bias is not None else c

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, b, bias_arg, c, M, N, K, m_bucket(M), a.stride(0), b.stride(0), c.stride(0))
    kwargs = dict(HAS_BIAS=bias is not None, PREC=dot_precision(a.dtype), UPCAST=upcast_dots(a.dtype, b.dtype))
    with device_ctx(a):
        launch(tuner, _mm_nt_kernel, grid, args, kwargs, config)
    return c


# ------------------------------------------------------------------------------- fused low-rank, decode
@triton.jit
def rank_slice_t(x_ptr, v_ptr, rm, rr, M, K, R, stride_xm, stride_vr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """t_j = x · V_jᵀ [BLOCK_M, BLOCK_R] for the rank slice ``rr``, streaming V_j once over K. fp32 for one row
    (CUDA-core multiply-reduce); for 2..16 rows rounded to x's dtype as the reference does (``tl.dot`` input)."""
    m_ok = rm < M
    r_ok = rr < R
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        if BLOCK_M == 1:
            v = tl.load(v_ptr + rr[:, None] * stride_vr + kk[None, :], mask=r_ok[:, None] & (kk < K)[None, :],
                        other=0.0)
            t += tl.sum(x.to(tl.float32) * v.to(tl.float32), axis=1)[None, :]
        else:
            v = tl.load(v_ptr + rr[None, :] * stride_vr + kk[:, None], mask=r_ok[None, :] & (kk < K)[:, None],
                        other=0.0)
            if UPCAST:
                t = tl.dot(x.to(tl.float32), v.to(tl.float32), t, input_precision=PREC)
            else:
                t = tl.dot(x, v.to(x.dtype), t, input_precision=PREC)
    if BLOCK_M == 1 or UPCAST:
        return t
    else:
        return t.to(x_ptr.dtype.element_ty)


@triton.jit
def rank_slice_out(t, u_ptr, rn, rr, N, R, stride_un, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = t_j · U[rn, rr]ᵀ (t from `rank_slice_t`)."""
    n_ok = rn < N
    r_ok = rr < R
    if BLOCK_M == 1:
        u = tl.load(u_ptr + rn[:, None] * stride_un + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        return tl.sum(t * u.to(tl.float32), axis=1)[None, :]
    else:
        u = tl.load(u_ptr + rn[None, :] * stride_un + rr[:, None], mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        return tl.dot(t, u.to(t.dtype), input_precision=PREC)


@triton.jit
def add_chunk(ws_ptr, cnt_ptr, y_ptr, part, rm, rn, M, N, c, last, FIXUP: tl.constexpr):
    """Add ``part`` into the fp32 accumulator of output chunk ``c`` (atomics); with FIXUP the program that brings
    the chunk's last contribution (arrival number ``last``) casts the chunk into ``y`` (no second launch)."""
    o_off = rm[:, None] * N + rn[None, :]
    o_ok = (rm < M)[:, None] & (rn < N)[None, :]
    tl.atomic_add(ws_ptr + o_off, part, mask=o_ok)
    if FIXUP:
        tl.debug_barrier()  # every thread's atomics issued before the arrival is counted
        arrived = tl.atomic_add(cnt_ptr + c, 1)
        if arrived == last:
            y = tl.load(ws_ptr + o_off, mask=o_ok, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + o_off, y.to(y_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _lowrank_decode_kernel(x_ptr, v_ptr, u_ptr, bias_ptr, ws_ptr, cnt_ptr, out_ptr, M, N, K, R, MB,
                           stride_xm, stride_vr, stride_un,
                           HAS_BIAS: tl.constexpr, FIXUP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rblocks = tl.num_programs(0)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = tl.arange(0, BLOCK_M)

    tc = rank_slice_t(x_ptr, v_ptr, rm, rr, M, K, R, stride_xm, stride_vr, PREC, UPCAST, BLOCK_M, BLOCK_R, BLOCK_K)

    # y[:, chunk] += t_j · U_jᵀ, chunk = pid_s, pid_s + SPLIT_N, ...
    n_chunks = tl.cdiv(N, BLOCK_N)
    for c in range(pid_s, n_chunks, SPLIT_N):
        rn = c * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        part = rank_slice_out(tc, u_ptr, rn, rr, N, R, stride_un, PREC, BLOCK_M)
        if HAS_BIAS:
            if pid_r == 0:
                part += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        add_chunk(ws_ptr, cnt_ptr, out_ptr, part, rm, rn, M, N, c, n_rblocks - 1, FIXUP)  # last: final rank slice


_LR_GEMV = [cfg(BLOCK_M=1, BLOCK_R=br, BLOCK_K=bk, BLOCK_N=bn, SPLIT_N=s, num_warps=w, num_stages=2)
            for br, bk, bn, s, w in ((16, 256, 256, 1, 4), (8, 256, 256, 1, 4), (8, 512, 512, 2, 4),
                                     (16, 512, 512, 1, 8), (32, 128, 256, 1, 4), (16, 256, 256, 2, 4),
                                     (4, 1024, 1024, 2, 4))]
_LR_SMALL = [cfg(BLOCK_M=16, BLOCK_R=br, BLOCK_K=bk, BLOCK_N=bn, SPLIT_N=s, num_warps=w, num_stages=3)
             for br, bk, bn, s, w in ((16, 128, 128, 1, 4), (32, 128, 128, 1, 4), (16, 256, 128, 2, 4),
                                      (32, 64, 256, 1, 8), (64, 64, 128, 1, 4), (16, 128, 64, 4, 4))]
_LR_KEY = ["MB", "N", "K", "R"]
_lr_gemv = autotuned(_lowrank_decode_kernel, _LR_GEMV, _LR_KEY, reset_to_zero=["ws_ptr", "cnt_ptr"],
                     interp=cfg(BLOCK_M=1, BLOCK_R=16, BLOCK_K=32, BLOCK_N=32, SPLIT_N=1))
_lr_small = autotuned(_lowrank_decode_kernel, _LR_SMALL, _LR_KEY, reset_to_zero=["ws_ptr", "cnt_ptr"],
                      interp=cfg(BLOCK_M=16, BLOCK_R=16, BLOCK_K=32, BLOCK_N=32, SPLIT_N=2))
_MIN_BLOCK_N = 16  # counters are allocated for the smallest output chunk any config uses


def decode_workspace(x2: torch.Tensor, n: int, fixup: bool, config: dict | None):
    """(ws, cnt, out) for the split decode kernels: a zeroed fp32 accumulator [M, N]; with ``fixup`` one int32
    arrival counter per output chunk (one memset for both) and an empty output in x2's dtype, else the accumulator
    is the output and ``cnt`` a placeholder."""
    m = x2.shape[0]
    if not fixup:
        ws = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
        return ws, ws, ws
    n_cnt = triton.cdiv(n, min(_MIN_BLOCK_N, (config or {}).get("BLOCK_N", _MIN_BLOCK_N)))
    ws_all = torch.zeros(m * n + n_cnt, device=x2.device, dtype=torch.float32)
    return ws_all[:m * n], ws_all[m * n:].view(torch.int32), torch.empty(m, n, device=x2.device, dtype=x2.dtype)


def lowrank_decode(x2: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   config: dict | None = None, fixup: bool = True) -> torch.Tensor:
    """Fused split-rank kernel for x2 [M <= 16, K] -> [M, N] in x2's dtype."""
    M, K = x2.shape
    N, R = u.shape
    out_dtype = x2.dtype
    fixup = fixup and out_dtype != torch.float32
    ws, cnt, out = decode_workspace(x2, N, fixup, config)
    tuner = _lr_gemv if M == 1 else _lr_small
    if config is not None and "BLOCK_M" not in config:
        config = {"BLOCK_M": 1 if M == 1 else 16, **config}

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]), meta["SPLIT_N"])

    args = (x2, v, u, bias if bias is not None else ws, ws, cnt, out, M, N, K, R, m_bucket(M),
            x2.stride(0), v.stride(0), u.stride(0))
    kwargs = dict(HAS_BIAS=bias is not None, FIXUP=fixup, PREC=dot_precision(x2.dtype),
                  UPCAST=upcast_dots(x2.dtype, u.dtype, v.dtype))
    with device_ctx(x2):
        launch(tuner, _lowrank_decode_kernel, grid, args, kwargs, config)
    return out if fixup or out_dtype == torch.float32 else ws.to(out_dtype)


def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   config: dict | None = None, path: str = "auto") -> torch.Tensor:
    """y = (x·Vᵀ)·Uᵀ + b for x [..., K], V [R, K], U [N, R] (any leading dims, any strides) -> x.dtype.

    ``path``: ``auto`` (decode kernel for <= 16 rows, two GEMMs above), ``decode``, ``prefill``, or
    ``decode-nofixup`` (decode kernel with a separate cast instead of the in-kernel one); ``config`` pins one
    kernel configuration (tests and benchmarks)."""
    if x.shape[-1] != v.shape[1] or u.shape[1] != v.shape[0]:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, V {tuple(v.shape)}, U {tuple(u.shape)}")
    lead = x.shape[:-1]
    x2 = as_2d(x)
    u, v = u.contiguous(), v.contiguous()
    bias = bias.contiguous() if bias is not None else None
    M, N = x2.shape[0], u.shape[0]
    if M == 0 or x2.shape[1] == 0:
        y = torch.zeros(M, N, device=x.device, dtype=x.dtype)
        return (y + bias.to(x.dtype) if bias is not None else y).reshape(*lead, N)
    if path == "auto":
        path = "decode" if M <= DECODE_MAX_M else "prefill"
    if path in ("decode", "decode-nofixup"):
        if M > DECODE_MAX_M:
            raise ValueError(f"the decode kernel takes at most {DECODE_MAX_M} rows, got {M}")
        y = lowrank_decode(x2, u, v, bias, config, fixup=path == "decode")
    elif path == "prefill":
        t = mm_nt(x2, v, None, x.dtype, config)
        y = mm_nt(t, u, bias, x.dtype, config)
    else:
        raise ValueError(f"unknown path {path!r}")
    return y.reshape(*lead, N)


__all__ = ["DECODE_MAX_M", "INTERPRET", "lowrank_decode", "lowrank_linear", "mm_nt"]
