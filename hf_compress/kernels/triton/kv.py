"""Triton kernels for the KV cache's codes (layout and rounding rules: `hf_compress.kernels.reference.kv`, the torch
reference, is the specification). Imported lazily by `kernels.dispatch`; on CPU they run under
``TRITON_INTERPRET=1``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.kv import dequantize_reference, quantize_reference

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _round_to(x, SDT: tl.constexpr):
    """fp32 -> SDT rounding to nearest even. bf16 is rounded by hand on the fp32 bits (the CPU interpreter's
    fp32 -> bf16 cast truncates), so that the result is exact and the final cast is too."""
    if SDT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(SDT)


@triton.jit
def _quant_token_kernel(x_ptr, codes_ptr, scale_ptr, mn_ptr, R, C, W, NG,
                        BITS: tl.constexpr, QMAX: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr,
                        SDT: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = g * G + tl.arange(0, G)
    rmask = rows < R
    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    mn = tl.min(x, axis=1)
    mx = tl.max(x, axis=1)
    scale_s = _round_to(((mx - mn) / QMAX), SDT)
    mn_s = _round_to(mn, SDT)
    scale = scale_s.to(tl.float32)
    safe = tl.where(scale == 0.0, 1.0, scale)
    q = tl.floor((x - mn_s.to(tl.float32)[:, None]) / safe[:, None] + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0).to(tl.int32)
    if PER == 1:
        packed = q
    else:
        q3 = tl.reshape(q, (BLOCK_R, G // PER, PER))
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(q3 << shifts[None, None, :], axis=2)
    pcols = g * (G // PER) + tl.arange(0, G // PER)
    tl.store(codes_ptr + rows[:, None] * W + pcols[None, :], packed.to(tl.uint8), mask=rmask[:, None])
    tl.store(scale_ptr + rows * NG + g, scale_s, mask=rmask)
    tl.store(mn_ptr + rows * NG + g, mn_s, mask=rmask)


@triton.jit
def _quant_channel_kernel(x_ptr, codes_ptr, scale_ptr, mn_ptr, C, W,
                          BITS: tl.constexpr, QMAX: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr,
                          SDT: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    gid = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = gid * G + tl.arange(0, G)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
    mn = tl.min(x, axis=0)
    mx = tl.max(x, axis=0)
    scale_s = _round_to(((mx - mn) / QMAX), SDT)
    mn_s = _round_to(mn, SDT)
    scale = scale_s.to(tl.float32)
    safe = tl.where(scale == 0.0, 1.0, scale)
    q = tl.floor((x - mn_s.to(tl.float32)[None, :]) / safe[None, :] + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0).to(tl.int32)
    q = tl.where(cmask[None, :], q, 0)
    if PER == 1:
        packed = q
    else:
        q3 = tl.reshape(q, (G, BLOCK_C // PER, PER))
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(q3 << shifts[None, None, :], axis=2)
    pcols = pid_c * (BLOCK_C // PER) + tl.arange(0, BLOCK_C // PER)
    tl.store(codes_ptr + rows[:, None] * W + pcols[None, :], packed.to(tl.uint8), mask=(pcols < W)[None, :])
    tl.store(scale_ptr + gid * C + cols, scale_s, mask=cmask)
    tl.store(mn_ptr + gid * C + cols, mn_s, mask=cmask)


@triton.jit
def _dequant_token_kernel(codes_ptr, scale_ptr, mn_ptr, out_ptr, R, C, W, NG,
                          BITS: tl.constexpr, QMAX: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    pcols = g * (G // PER) + tl.arange(0, G // PER)
    p = tl.load(codes_ptr + rows[:, None] * W + pcols[None, :], mask=rmask[:, None], other=0).to(tl.int32)
    if PER == 1:
        q = p
    else:
        shifts = tl.arange(0, PER) * BITS
        q = tl.reshape((p[:, :, None] >> shifts[None, None, :]) & QMAX, (BLOCK_R, G))
    scale = tl.load(scale_ptr + rows * NG + g, mask=rmask, other=0.0).to(tl.float32)
    mn = tl.load(mn_ptr + rows * NG + g, mask=rmask, other=0.0).to(tl.float32)
    x = q.to(tl.float32) * scale[:, None] + mn[:, None]
    cols = g * G + tl.arange(0, G)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _dequant_channel_kernel(codes_ptr, scale_ptr, mn_ptr, out_ptr, C, W,
                            BITS: tl.constexpr, QMAX: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    gid = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = gid * G + tl.arange(0, G)
    pcols = pid_c * (BLOCK_C // PER) + tl.arange(0, BLOCK_C // PER)
    p = tl.load(codes_ptr + rows[:, None] * W + pcols[None, :], mask=(pcols < W)[None, :], other=0).to(tl.int32)
    if PER == 1:
        q = p
    else:
        shifts = tl.arange(0, PER) * BITS
        q = tl.reshape((p[:, :, None] >> shifts[None, None, :]) & QMAX, (G, BLOCK_C))
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    scale = tl.load(scale_ptr + gid * C + cols, mask=cmask, other=0.0).to(tl.float32)
    mn = tl.load(mn_ptr + gid * C + cols, mask=cmask, other=0.0).to(tl.float32)
    x = q.to(tl.float32) * scale[None, :] + mn[None, :]
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=cmask[None, :])


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _block_c(c: int, per: int) -> int:
    return max(triton.next_power_of_2(c), per)


def quantize(x: torch.Tensor, bits: int, group: int, axis: str, scale_dtype=torch.float16):
    if not _pow2(group):  # the kernels tile groups with tl.arange: powers of two only
        return quantize_reference(x, bits, group, axis, scale_dtype)
    *lead, t, c = x.shape
    per, qmax = 8 // bits, 2**bits - 1
    x2 = x.contiguous().reshape(-1, c)
    r = x2.shape[0]
    w = c // per
    codes = torch.empty(r, w, dtype=torch.uint8, device=x.device)
    sdt = _TL_DTYPES[scale_dtype]
    if axis == "token":
        ng = c // group
        scale = torch.empty(r, ng, dtype=scale_dtype, device=x.device)
        mn = torch.empty_like(scale)
        block_r = 16
        grid = (triton.cdiv(r, block_r), ng)
        _quant_token_kernel[grid](x2, codes, scale, mn, r, c, w, ng, BITS=bits, QMAX=qmax, G=group,
                                  BLOCK_R=block_r, SDT=sdt)
        return codes.reshape(*lead, t, w), scale.reshape(*lead, t, ng), mn.reshape(*lead, t, ng)
    n_groups = r // group
    scale = torch.empty(n_groups, c, dtype=scale_dtype, device=x.device)
    mn = torch.empty_like(scale)
    block_c = min(_block_c(c, per), 128)
    grid = (n_groups, triton.cdiv(c, block_c))
    _quant_channel_kernel[grid](x2, codes, scale, mn, c, w, BITS=bits, QMAX=qmax, G=group, BLOCK_C=block_c, SDT=sdt)
    return codes.reshape(*lead, t, w), scale.reshape(*lead, t // group, c), mn.reshape(*lead, t // group, c)


def dequantize(codes, scale, mn, bits, group, axis, dtype=torch.float32):
    if not _pow2(group):
        return dequantize_reference(codes, scale, mn, bits, group, axis, dtype)
    *lead, t, w = codes.shape
    per, qmax = 8 // bits, 2**bits - 1
    c = w * per
    codes2 = codes.contiguous().reshape(-1, w)
    r = codes2.shape[0]
    out = torch.empty(r, c, dtype=dtype, device=codes.device)
    if axis == "token":
        ng = c // group
        block_r = 16
        grid = (triton.cdiv(r, block_r), ng)
        _dequant_token_kernel[grid](codes2, scale.contiguous(), mn.contiguous(), out, r, c, w, ng, BITS=bits,
                                    QMAX=qmax, G=group, BLOCK_R=block_r)
    else:
        block_c = min(_block_c(c, per), 128)
        grid = (r // group, triton.cdiv(c, block_c))
        _dequant_channel_kernel[grid](codes2, scale.contiguous(), mn.contiguous(), out, c, w, BITS=bits, QMAX=qmax,
                                      G=group, BLOCK_C=block_c)
    return out.reshape(*lead, t, c)
