"""Triton dequant-matmul for the packed ``QuantLinear`` layout, with the optional fused low-rank term.

Spec: `reference.weights.quant_linear` (layout in `reference.weights`'s docstring): y = x·dequant(Q)ᵀ + (x·Vᵀ)·Uᵀ + b
with W[o, k] = (q[o, k] - zeros[o, k // g]) · scales[o, k // g] in fp32, codes a little-endian bit stream per row.

One kernel, ``_quant_mm_kernel``; each program owns a [BLOCK_M, BLOCK_N] output tile and walks K in
BLOCK_K steps, dequantizing a [BLOCK_N, BLOCK_K] weight tile in registers (never in global memory):

* 2/4/8-bit: one vector load of the BLOCK_K·bits/32 words of each row, expanded with shifts
  (``words[:, :, None] >> (bits·p)``) and reshaped to [BLOCK_N, BLOCK_K] - every packed word is read once;
* 3-bit: 32 codes fill exactly 3 words, so each row's tile is loaded as [BLOCK_K / 32] chunks of 3 words
  (every word read once) and each code takes its bits from its word, or from two words for the codes that
  straddle (codes 10 and 21 of a chunk: ``lo >> shift | hi << (32 - shift)``), selected in registers (tiles
  under 32 codes fall back to a per-code gather);
* scales/zeros: one [BLOCK_N] load per tile when the tile lies in one group (g a multiple of BLOCK_K), a
  [BLOCK_N, BLOCK_K / g] load broadcast over the group when BLOCK_K is a multiple of g, a gather otherwise.

Regimes (config lists, autotuned per (M-bucket, N, K, R)): **GEMV** (M = 1: BLOCK_M = 1, CUDA-core
multiply-reduce, narrow BLOCK_N so that N / BLOCK_N programs fill the GPU), **small** (2..16 rows: a 16-row
``tl.dot`` tile), **GEMM** (prefill: 32..128-row tensor-core tiles, grouped tile order for L2 reuse). The
dequantized tile is rounded to x's dtype before ``tl.dot``, exactly as the reference dequantizes to x's dtype.

Fused Q + LR, two regimes like `triton.lowrank`:

* **decode** (M <= 16): one launch, ``_quant_lr_decode_kernel``. Its first N / BLOCK_N programs are
  dequant-matmul tiles; the others are split-rank programs (rank slice j: stream V_j once, keep t_j = x·V_jᵀ in
  registers, add t_j·U_jᵀ over their output chunks). Every packed word, V and U are read once, t never
  touches global memory, and the contributions meet in an fp32 accumulator (atomics); the last contribution
  to arrive at a chunk casts it into y (no second launch, no cast kernel).
* **prefill**: t = x·Vᵀ [M, R] is computed first by the dense kernel of `triton.lowrank` (R ≪ K: a few per
  cent of the FLOPs); the quant GEMM then adds t·U_tileᵀ into the same fp32 accumulator after its K loop and
  adds the bias, so the low-rank output path costs no extra pass over y. Recomputing x·V_jᵀ inside every
  output tile instead would multiply that product's FLOPs by N / BLOCK_N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.weights import SUPPORTED_BITS, packed_words
from .common import (as_2d, autotuned, cfg, device_ctx, dot_precision, grouped_tile, launch, m_bucket,
                     upcast_dots)
from .lowrank import DECODE_MAX_M, add_chunk, decode_workspace, mm_nt, rank_slice_out, rank_slice_t


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, rn, k0, N, K, NW, NG, stride_qn, stride_sn,
                  BITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K] tile of dequant(Q): rows rn, columns k0 .. k0 + BLOCK_K (k0 % BLOCK_K == 0)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    row = qw_ptr + rn[:, None] * stride_qn
    if BITS == 3 and BLOCK_K % 32 == 0:
        # 32 codes = 96 bits = 3 words: load each chunk's 3 words once, pick each code's word(s) in registers
        NC: tl.constexpr = BLOCK_K // 32
        wj = (k0 // 32 + tl.arange(0, NC)) * 3
        ok = n_ok[:, None] & (wj < NW)[None, :]
        w0 = tl.load(row + wj[None, :], mask=ok, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        w1 = tl.load(row + wj[None, :] + 1, mask=ok & (wj + 1 < NW)[None, :], other=0).to(tl.uint32,
                                                                                          bitcast=True)[:, :, None]
        w2 = tl.load(row + wj[None, :] + 2, mask=ok & (wj + 2 < NW)[None, :], other=0).to(tl.uint32,
                                                                                          bitcast=True)[:, :, None]
        bit = tl.arange(0, 32) * 3
        sel = (bit >> 5)[None, None, :]
        sh = (bit & 31).to(tl.uint32)[None, None, :]
        lo = tl.where(sel == 0, w0, tl.where(sel == 1, w1, w2))
        hi = tl.where(sel == 0, w1, w2)  # the next word, used by codes 10 (bits 30-32) and 21 (bits 63-65)
        hi = tl.where(sh > 29, hi << ((32 - sh) & 31), tl.zeros_like(hi))
        code = tl.reshape(((lo >> sh) | hi) & 7, (BLOCK_N, BLOCK_K))
    elif BITS == 3:  # tiles narrower than 32 codes: gather each code's word (and the next where it straddles)
        bitpos = kk * 3
        wi = bitpos >> 5
        sh = (bitpos & 31).to(tl.uint32)
        ok = n_ok[:, None] & (kk < K)[None, :]
        lo = tl.load(row + wi[None, :], mask=ok, other=0).to(tl.uint32, bitcast=True)
        straddle = (sh > 29) & (wi + 1 < NW)
        hi = tl.load(row + wi[None, :] + 1, mask=ok & straddle[None, :], other=0).to(tl.uint32, bitcast=True)
        code = ((lo >> sh[None, :]) | (hi << ((32 - sh) & 31)[None, :])) & 7  # hi is 0 unless straddling
    else:
        CPW: tl.constexpr = 32 // BITS
        WPT: tl.constexpr = BLOCK_K // CPW
        wi = k0 // CPW + tl.arange(0, WPT)
        words = tl.load(row + wi[None, :], mask=n_ok[:, None] & (wi < NW)[None, :], other=0).to(tl.uint32,
                                                                                                  bitcast=True)
        shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
        code = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        code = tl.reshape(code, (BLOCK_N, BLOCK_K))
    srow = rn * stride_sn
    if G % BLOCK_K == 0:  # the tile lies inside one group
        g = k0 // G
        s = tl.load(s_ptr + srow + g, mask=n_ok, other=1.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + srow + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    elif BLOCK_K % G == 0:  # BLOCK_K / G whole groups
        GPT: tl.constexpr = BLOCK_K // G
        g = k0 // G + tl.arange(0, GPT)
        ok = n_ok[:, None] & (g < NG)[None, :]
        s = tl.load(s_ptr + srow[:, None] + g[None, :], mask=ok, other=1.0).to(tl.float32)
        z = tl.load(z_ptr + srow[:, None] + g[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, GPT, G)), (BLOCK_N, BLOCK_K))
        z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GPT, G)), (BLOCK_N, BLOCK_K))
    else:  # group size unrelated to the tile: per-column gather
        g = kk // G
        ok = n_ok[:, None] & (g < NG)[None, :]
        s = tl.load(s_ptr + srow[:, None] + g[None, :], mask=ok, other=1.0).to(tl.float32)
        z = tl.load(z_ptr + srow[:, None] + g[None, :], mask=ok, other=0.0).to(tl.float32)
    return (code.to(tl.float32) - z) * s


@triton.jit
def _quant_acc(x_ptr, qw_ptr, s_ptr, z_ptr, rm, rn, M, N, K, NW, NG, stride_xm, stride_qn, stride_sn,
               BITS: tl.constexpr, G: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = x[rm] · dequant(Q)[rn]ᵀ, walking K in BLOCK_K steps."""
    m_ok = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rn, k0, N, K, NW, NG, stride_qn, stride_sn, BITS, G, BLOCK_N,
                          BLOCK_K)
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        else:
            if UPCAST:
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=PREC)
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PREC)
    return acc


@triton.jit
def _quant_mm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, t_ptr, u_ptr, bias_ptr, y_ptr,
                     M, N, K, R, NW, NG, MB,
                     stride_xm, stride_qn, stride_sn, stride_tm, stride_un, stride_ym,
                     BITS: tl.constexpr, G: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = _quant_acc(x_ptr, qw_ptr, s_ptr, z_ptr, rm, rn, M, N, K, NW, NG, stride_xm, stride_qn, stride_sn,
                     BITS, G, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_LR:  # + t · U_tileᵀ, t = x·Vᵀ [M, R] (x's dtype)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :], mask=m_ok[:, None] & (rr < R)[None, :],
                        other=0.0)
            if BLOCK_M == 1:
                u = tl.load(u_ptr + rn[:, None] * stride_un + rr[None, :], mask=n_ok[:, None] & (rr < R)[None, :],
                            other=0.0)
                acc += tl.sum(t.to(tl.float32) * u.to(tl.float32), axis=1)[None, :]
            else:
                u = tl.load(u_ptr + rn[None, :] * stride_un + rr[:, None], mask=n_ok[None, :] & (rr < R)[:, None],
                            other=0.0)
                if UPCAST:
                    acc = tl.dot(t.to(tl.float32), u.to(tl.float32), acc, input_precision=PREC)
                else:
                    acc = tl.dot(t, u.to(t.dtype), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


_Q_GEMV = [cfg(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=32, GROUP_M=1, num_warps=w, num_stages=s)
           for bn, bk, w, s in ((16, 256, 4, 2), (32, 256, 4, 2), (32, 128, 4, 3), (8, 512, 4, 2), (16, 512, 8, 2),
                                (64, 128, 4, 2), (8, 1024, 8, 2))]
_Q_SMALL = [cfg(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=32, GROUP_M=1, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 4), (32, 256, 4, 3),
                                 (16, 256, 4, 3))]
_Q_LARGE = [cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=32, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
                                     (128, 64, 64, 4, 4), (32, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                                     (64, 256, 64, 8, 3), (64, 128, 128, 8, 3))]
_Q_KEY = ["MB", "N", "K", "R"]
_q_gemv = autotuned(_quant_mm_kernel, _Q_GEMV, _Q_KEY,
                    interp=cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, BLOCK_R=16, GROUP_M=1))
_q_small = autotuned(_quant_mm_kernel, _Q_SMALL, _Q_KEY,
                     interp=cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, BLOCK_R=16, GROUP_M=1))
_q_large = autotuned(_quant_mm_kernel, _Q_LARGE, _Q_KEY,
                     interp=cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, BLOCK_R=16, GROUP_M=2))


# --------------------------------------------------------------------- fused Q + LR, decode: one launch
@triton.jit
def _quant_lr_decode_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, v_ptr, u_ptr, bias_ptr, ws_ptr, cnt_ptr, y_ptr,
                            M, N, K, R, NW, NG, MB, stride_xm, stride_qn, stride_sn, stride_vr, stride_un,
                            BITS: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, FIXUP: tl.constexpr,
                            PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_N: tl.constexpr):
    """y = x·dequant(Q)ᵀ + (x·Vᵀ)·Uᵀ + b for M <= 16 rows in one launch. Programs 0 .. n_tiles-1 each own an
    output chunk of BLOCK_N columns of the dequant-matmul (+ bias); the next R/BLOCK_R × SPLIT_N programs each own
    a rank slice j: they stream V_j once (t_j = x·V_jᵀ stays in registers) and add t_j·U_jᵀ into the chunks
    s, s + SPLIT_N, ... — the split-rank scheme of `triton.lowrank`. Each chunk thus gets 1 + R/BLOCK_R
    contributions, summed with fp32 atomics; the last one to arrive casts the chunk into y."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    n_rblocks = tl.cdiv(R, BLOCK_R)
    rm = tl.arange(0, BLOCK_M)
    if pid < n_tiles:
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _quant_acc(x_ptr, qw_ptr, s_ptr, z_ptr, rm, rn, M, N, K, NW, NG, stride_xm, stride_qn, stride_sn,
                         BITS, G, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        add_chunk(ws_ptr, cnt_ptr, y_ptr, acc, rm, rn, M, N, pid, n_rblocks, FIXUP)
    else:
        pid_r = (pid - n_tiles) // SPLIT_N
        pid_s = (pid - n_tiles) % SPLIT_N
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        t = rank_slice_t(x_ptr, v_ptr, rm, rr, M, K, R, stride_xm, stride_vr, PREC, UPCAST, BLOCK_M, BLOCK_R, BLOCK_K)
        for c in range(pid_s, n_tiles, SPLIT_N):
            rn = c * BLOCK_N + tl.arange(0, BLOCK_N)
            part = rank_slice_out(t, u_ptr, rn, rr, N, R, stride_un, PREC, BLOCK_M)
            add_chunk(ws_ptr, cnt_ptr, y_ptr, part, rm, rn, M, N, c, n_rblocks, FIXUP)


_QLR_GEMV = [cfg(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, SPLIT_N=sp, num_warps=w, num_stages=2)
             for bn, bk, br, sp, w in ((16, 256, 16, 8, 4), (32, 256, 16, 8, 4), (32, 128, 32, 4, 4),
                                       (64, 128, 16, 8, 4), (16, 512, 32, 16, 8), (32, 256, 32, 16, 4))]
_QLR_SMALL = [cfg(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, SPLIT_N=sp, num_warps=w, num_stages=3)
              for bn, bk, br, sp, w in ((32, 128, 16, 4, 4), (64, 128, 16, 4, 4), (64, 64, 32, 4, 4),
                                        (32, 256, 16, 8, 4), (128, 64, 16, 2, 4))]
_QLR_KEY = ["MB", "N", "K", "R"]
_qlr_gemv = autotuned(_quant_lr_decode_kernel, _QLR_GEMV, _QLR_KEY, reset_to_zero=["ws_ptr", "cnt_ptr"],
                      interp=cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, BLOCK_R=16, SPLIT_N=2))
_qlr_small = autotuned(_quant_lr_decode_kernel, _QLR_SMALL, _QLR_KEY, reset_to_zero=["ws_ptr", "cnt_ptr"],
                       interp=cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, BLOCK_R=16, SPLIT_N=2))


def _quant_lr_decode(x2, qweight, scales, zeros, bits, group_size, bias, u, v, config):
    M, K = x2.shape
    N, R = u.shape
    fixup = x2.dtype != torch.float32
    ws, cnt, y = decode_workspace(x2, N, fixup, config)
    tuner = _qlr_gemv if M == 1 else _qlr_small
    if config is not None:
        config = {"BLOCK_M": 1 if M == 1 else 16, "BLOCK_R": 16, "SPLIT_N": 2,
                  **{k: val for k, val in config.items() if k != "GROUP_M"}}

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) + triton.cdiv(R, meta["BLOCK_R"]) * meta["SPLIT_N"],)

    args = (x2, qweight, scales, zeros, v, u, bias if bias is not None else ws, ws, cnt, y,
            M, N, K, R, qweight.shape[1], scales.shape[1], m_bucket(M),
            x2.stride(0), qweight.stride(0), scales.stride(0), v.stride(0), u.stride(0))
    kwargs = dict(BITS=bits, G=group_size, HAS_BIAS=bias is not None, FIXUP=fixup, PREC=dot_precision(x2.dtype),
                  UPCAST=upcast_dots(x2.dtype, u.dtype, v.dtype))
    with device_ctx(x2):
        launch(tuner, _quant_lr_decode_kernel, grid, args, kwargs, config)
    return y


def check_layout(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, in_features: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    n_groups = -(-in_features // group_size)
    out = qweight.shape[0]
    if (tuple(scales.shape) != (out, n_groups) or tuple(zeros.shape) != (out, n_groups)
            or qweight.shape[1] != packed_words(in_features, bits)):
        raise ValueError(f"packed layout does not match bits={bits}, group_size={group_size}, "
                         f"in_features={in_features}: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
                         f"zeros {tuple(zeros.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the layer {in_features}")


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, in_features: int, bias: torch.Tensor | None = None, u: torch.Tensor | None = None,
                 v: torch.Tensor | None = None, config: dict | None = None, path: str = "auto") -> torch.Tensor:
    """y = x·dequant(Q)ᵀ [+ (x·Vᵀ)·Uᵀ] [+ b] for x [..., in_features] -> [..., out] in x.dtype.

    ``path`` (with a low-rank term): ``auto`` (one fused launch for <= 16 rows, the two-launch form above),
    ``fused`` or ``two-launch``; ``config`` pins one kernel configuration (tests and benchmarks)."""
    if path not in ("auto", "fused", "two-launch"):
        raise ValueError(f"unknown path {path!r}")
    check_layout(x, qweight, scales, zeros, bits, group_size, in_features)
    if (u is None) != (v is None):
        raise ValueError("give both low-rank factors U and V or neither")
    lead = x.shape[:-1]
    x2 = as_2d(x)
    M, K = x2.shape
    N = qweight.shape[0]
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    has_lr = u is not None and u.shape[1] > 0
    if path == "auto":
        path = "fused" if M <= DECODE_MAX_M else "two-launch"
    if has_lr and path == "fused":
        if M > DECODE_MAX_M:
            raise ValueError(f"the fused decode kernel takes at most {DECODE_MAX_M} rows, got {M}")
        y = _quant_lr_decode(x2, qweight, scales, zeros, bits, group_size, bias, u.contiguous(), v.contiguous(),
                             config)
        return y.reshape(*lead, N)
    if has_lr:
        u = u.contiguous()
        t = mm_nt(x2, v, None, x.dtype)  # [M, R]
        R = u.shape[1]
    else:
        t, u, R = x2, x2, 0
    tuner = _q_gemv if M == 1 else _q_small if M <= DECODE_MAX_M else _q_large
    if config is not None and "BLOCK_M" not in config:
        config = {"BLOCK_M": 1 if M == 1 else 16, "GROUP_M": 1, **config}

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (x2, qweight, scales, zeros, t, u, bias if bias is not None else y, y,
            M, N, K, R, qweight.shape[1], scales.shape[1], m_bucket(M),
            x2.stride(0), qweight.stride(0), scales.stride(0), t.stride(0), u.stride(0), y.stride(0))
    kwargs = dict(BITS=bits, G=group_size, HAS_LR=has_lr, HAS_BIAS=bias is not None, PREC=dot_precision(x.dtype),
                  UPCAST=upcast_dots(x.dtype, u.dtype))
    with device_ctx(x2):
        launch(tuner, _quant_mm_kernel, grid, args, kwargs, config)
    return y.reshape(*lead, N)


__all__ = ["check_layout", "quant_linear"]
