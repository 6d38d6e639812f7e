"""CPU fast path for `QuantLinear`: every width (2/3/4/8 bits) runs on PyTorch's int4 CPU kernel.

PyTorch ships a weight-only int4 GEMM for CPU, ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group,
scales_and_zeros)`` (private ops, the ones torchao's int4 CPU layout calls): codes ``c`` in 0..15 with
``w = (c - 8) * scale + zero``, ``scales_and_zeros`` [K / group, N, 2] in the activation dtype, groups of
32/64/128/256 input columns, N a multiple of 16, K a multiple of the group. It is fast with bf16 activations (an
fp32 input runs ~50x slower), so the input is cast to bf16 and the output back. ``packed`` comes from
``_convert_weight_to_int4pack_for_cpu`` and its layout depends on the CPU's instruction set: it is built at run time
from the checkpoint's codes (`repack`), never stored.

Our layout (`kernels.reference`) is ``W[o, k] = (q - z) * s`` per group of ``group_size`` columns. Re-expressed
exactly on the int4 kernel, with ``z' = zero``:

* 2/3/4 bits: ``c = q + 8 - h`` with ``h = 2**(bits - 1)`` (the code range centred on 8), ``scale = s``,
  ``zero = (h - z) * s``: ``(c - 8) * s + (h - z) * s = (q - z) * s``. Centring keeps ``zero`` as small as the
  weights themselves, so its bf16 rounding stays at the weights' own scale (with ``c = q`` a 2-bit zero would be
  ``(8 - z) * s``, ~5x the weights, and so its rounding);
* 8 bits: ``q = 16 * hi + lo`` with ``hi, lo`` in 0..15; the weight becomes two int4 halves side by side along K,
  ``[W_hi | W_lo]``, applied to ``[x | x]``: ``W_hi = (hi - 8) * 16s + (128 - z) * s`` and
  ``W_lo = (lo - 8) * s + 8s``, whose sum is ``(16 hi + lo - z) * s``. One call, 8 bits per weight in memory.

So the CPU kernel is exact up to bf16: the activations, and ``scale``/``zero`` stored in bf16 (relative rounding
2**-9 of each; the tests hold the output to relative 3e-2 of the fp32 reference, as the GPU kernels).

Shapes the kernel does not take are padded, not refused: K up to whole groups where no kernel group both divides the
layer's group and tiles K (a partial last group: zero columns of x meet whatever codes, so padding adds nothing;
where one does, e.g. 576 inputs with group 128 run as kernel groups of 64, K is not padded and a call pads nothing),
N up to a multiple of 16 (rows cut from the output). A group size that no kernel group divides (not a multiple of
32) is the one case left to the reference (`supports`). A kernel group smaller than ``group_size`` is fine: each
stored group becomes ``group_size // kernel_group`` kernel groups with the same scale and zero.

Plain functions over the packed buffers, usable without a transformers model (e.g. a vLLM linear method):
``pack = repack(qweight, scales, zeros, bits, group_size, in_features)`` once, then
``quant_linear(x, pack, bias, u, v)`` per call. A call of many rows (a prefill: ``DEQUANTIZE_ROWS``) dequantizes
the weight once (`dequantize_t`, a transient bf16 copy of that one layer) and runs a bf16 GEMM, which outgrows the
int4 kernel's per-row cost. Memory at run time: the int4 copy (4 bits per weight; 8 for 8-bit
layers) and bf16 scales/zeros, beside the checkpoint's own buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .reference import SUPPORTED_BITS, unpack

#: the private aten ops this path relies on (a test fails naming them if they disappear or change layout)
OPS = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernel takes, largest first
N_MULTIPLE = 16  # the kernel wants N % 16 == 0


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this torch has the int4 CPU ops (looked up once: dispatch asks at every forward)."""
    return all(hasattr(torch.ops.aten, name) for name in OPS)


@functools.lru_cache(maxsize=None)
def kernel_group(group_size: int) -> int | None:
    """The largest kernel group dividing ``group_size`` (None: no CPU kernel for it)."""
    return next((g for g in KERNEL_GROUPS if group_size % g == 0), None)


def tiling(group_size: int, in_features: int) -> tuple[int, int]:
    """(kernel group, padded K) of a layer: kernel groups that divide ``group_size`` and tile K exactly where one
    exists (no padded columns, no padded activations per call: 576 inputs with group 128 run as groups of 64), else
    the largest dividing ``group_size`` with K padded to whole groups of the layer."""
    whole = next((g for g in KERNEL_GROUPS if group_size % g == 0 and in_features % g == 0), None)
    if whole is not None:
        return whole, in_features
    return kernel_group(group_size), -(-in_features // group_size) * group_size


@functools.lru_cache(maxsize=None)  # asked at every forward
def supports(bits: int, group_size: int) -> bool:
    return bits in SUPPORTED_BITS and kernel_group(group_size) is not None


class Int4Pack(NamedTuple):
    """A layer repacked for ``_weight_int4pack_mm_for_cpu``."""

    weight: torch.Tensor  # uint8, from _convert_weight_to_int4pack_for_cpu (CPU-ISA specific)
    scales_zeros: torch.Tensor  # [copies * padded / group, padded N, 2] bf16
    group: int  # kernel group
    in_features: int  # K of the layer
    padded: int  # K, or K rounded up to whole groups of the layer where no kernel group tiles K
    copies: int  # 1, or 2 for 8-bit layers ([hi | lo] halves)
    out_features: int  # N of the layer
    sources: tuple = ()  # per output block, (qweight, scales, zeros, bits, group_size): references for `dequantize_t`

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_zeros))


def int4_layout(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                in_features: int, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Our packed layout re-expressed for the int4 kernel, exactly (fp32, before any rounding to bf16): int4 codes
    [rows, copies * padded] (int32; ``rows`` >= N, default N: the extra rows and the padded columns are code 0),
    scales and zeros [N, copies * padded / kernel group] (fp32) with ``W = sum over copies of (c - 8) * scale + zero``
    (module docstring), and the kernel group. Built in place in one int32 buffer (repacking a layer needs ~12 bytes
    per weight for a moment, not a dense copy)."""
    if not supports(bits, group_size):
        raise ValueError(f"the int4 CPU kernel takes groups that are multiples of 32 and 2/3/4/8-bit codes; "
                         f"got group_size={group_size}, bits={bits}")
    codes = unpack(qweight, bits, in_features, dtype=torch.int32)
    n = codes.shape[0]
    gk, padded = tiling(group_size, in_features)
    s, z = scales.float(), zeros.float()
    if bits == 8:
        halves = [(torch.Tensor.bitwise_right_shift_, 4, 16 * s, (128 - z) * s),
                  (torch.Tensor.bitwise_and_, 15, s, 8 * s)]
    else:
        h = 2 ** (bits - 1)
        halves = [(torch.Tensor.add_, 8 - h, s, (h - z) * s)]
    cols = torch.zeros(rows or n, len(halves) * padded, dtype=torch.int32)
    for i, (op, arg, _, _) in enumerate(halves):  # in place: no temporary the size of the codes
        part = cols[:n, i * padded:i * padded + in_features]
        op(part.copy_(codes), arg)
    rep, per_half = group_size // gk, padded // gk
    sc = torch.cat([sc.repeat_interleave(rep, 1)[:, :per_half] for *_, sc, _ in halves], 1)
    zp = torch.cat([zp.repeat_interleave(rep, 1)[:, :per_half] for *_, zp in halves], 1)
    return cols, sc, zp, gk


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
           in_features: int) -> Int4Pack:
    """Our packed layout -> the int4 CPU kernel's (`int4_layout` with N padded to a multiple of 16, converted)."""
    return repack_concat([(qweight, scales, zeros, bits, group_size, in_features)])


#: rows from which a call dequantizes the weight once and runs a bf16 GEMM instead of the int4 kernel, per pack
#: ``copies`` (1: 2/3/4 bits, 2: 8 bits, whose int4 call reads K twice). Measured on SmolLM2's whole prefill, 1
#: thread, bf16 model: 4-bit at 256 tokens 706 ms dequantizing vs 641-661 ms on the int4 kernel, at 512 tokens 1098
#: vs 1408 ms, at 1024 2146 vs 2643 ms; 8-bit at 256 tokens (fp32 model) 739-806 vs 1176-1189 ms
DEQUANTIZE_ROWS = {1: 384, 2: 96}


def dequantize_t(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int) -> torch.Tensor:
    """The layer's dense weight, transposed, in bf16: Wᵀ [groups * group_size, N] (rows past ``in_features`` belong
    to the padded last group; multiply them by zero activations). Built on the transposed words so that every step
    runs along contiguous N-long rows (scales broadcast over whole rows): code ``k = u * per + j`` of unit ``u``
    (one int32 word of ``32 / bits`` codes; 3 words of 32 codes at 3 bits) is plane ``j`` of that unit."""
    n, groups = scales.shape
    per, wpu = (32, 3) if bits == 3 else (32 // bits, 1)
    units = groups * group_size // per
    w = qweight
    if w.shape[1] < units * wpu:
        w = F.pad(w, (0, units * wpu - w.shape[1]))
    wt = w.view(n, units, wpu).permute(1, 2, 0).contiguous()  # [units, words per unit, N]
    if wpu == 1:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device).view(1, per, 1)
        planes = (wt >> shifts).bitwise_and_(2**bits - 1)
    else:  # 3 bits: code j of a unit starts at bit 3j of its 96; codes 10 and 21 straddle two words
        j = torch.arange(32, device=w.device)
        planes = (wt[:, (3 * j) // 32, :] >> ((3 * j) % 32).to(torch.int32).view(1, 32, 1)).bitwise_and_(7)
        for jj in (10, 21):
            word, shift = (3 * jj) // 32, (3 * jj) % 32
            low = (wt[:, word] >> shift) & ((1 << (32 - shift)) - 1)  # logical: drop the sign bits
            planes[:, jj] = low | ((wt[:, word + 1] << (32 - shift)) & 7)
    del wt
    sf, zf = scales.float(), zeros.float()
    st = sf.t().reshape(groups, 1, 1, n)
    zt = (-zf * sf).t().reshape(groups, 1, 1, n)
    wf = torch.mul(planes.view(groups, group_size // per, per, n), st)
    del planes  # the transient peak is one fp32 copy of the layer plus its bf16 result, not the int32 codes besides
    return wf.add_(zt).view(-1, n).to(torch.bfloat16)


def concat_key(bits: int, group_size: int, in_features: int) -> tuple[int, int, int, int] | None:
    """Layers on one input with equal keys can share one `repack_concat` (same kernel group, padded K and copies, as
    `tiling` gives them); None: no CPU kernel for the layer."""
    if not supports(bits, group_size):
        return None
    gk, padded = tiling(group_size, in_features)
    return gk, in_features, padded, 2 if bits == 8 else 1


def repack_concat(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]]) -> Int4Pack:
    """Several layers on the same input, ``(qweight, scales, zeros, bits, group_size, in_features)`` each, as one
    `Int4Pack` whose output is their outputs side by side (a merged ``qkv`` / ``gate_up`` projection in one kernel
    call). Their `concat_key` must agree (bits and group sizes may differ otherwise: every width becomes int4 codes
    with its own scales and zeros); each output column is computed exactly as in the layer's own `repack` (the
    one-layer case)."""
    keys = {concat_key(*layer[3:]) for layer in layers}
    if len(layers) > 1 and (len(keys) != 1 or None in keys):  # one layer: int4_layout names what it cannot take
        raise ValueError(f"layers with different kernel layouts cannot share one int4 pack: {sorted(map(str, keys))}")
    if not available():
        raise RuntimeError(f"this torch ({torch.__version__}) has no aten.{OPS[0]} / aten.{OPS[1]}")
    n = sum(layer[0].shape[0] for layer in layers)
    if len(layers) == 1:  # built straight into the N-padded buffer: no concatenated copy of the codes
        cols, sc, zp, _ = int4_layout(*layers[0], rows=n + -n % N_MULTIPLE)
    else:
        built = [int4_layout(*layer) for layer in layers]
        cols = F.pad(torch.cat([c for c, *_ in built]), (0, 0, 0, -n % N_MULTIPLE))
        sc, zp = torch.cat([b[1] for b in built]), torch.cat([b[2] for b in built])
        del built
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(cols, 1)
    del cols
    sz = F.pad(torch.stack([sc, zp], -1), (0, 0, 0, 0, 0, -n % N_MULTIPLE))  # [N', K' / gk, 2]
    gk, in_features, padded, copies = keys.pop()
    return Int4Pack(weight, sz.transpose(0, 1).to(torch.bfloat16).contiguous(), gk, in_features, padded, copies, n,
                    tuple(layer[:5] for layer in layers))


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the repack's freed temporaries back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Without it
    glibc keeps them in the heap (its mmap threshold grows with each large free), and a model repacked layer by
    layer keeps ~1.3x its dense fp32 projection bytes resident (measured on a 52M-weight Llama: +277 MB, vs +60 MB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def quant_linear(x: torch.Tensor, pack: Int4Pack, bias: torch.Tensor | None = None, u: torch.Tensor | None = None,
                 v: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ + (x · Vᵀ) · Uᵀ + b for a layer `repack`-ed into ``pack``; returned in ``x.dtype``."""
    if x.shape[-1] != pack.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer {pack.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pack.in_features)
    xb = x2.to(torch.bfloat16)
    if pack.padded != pack.in_features:
        xb = F.pad(xb, (0, pack.padded - pack.in_features))
    if pack.sources and xb.shape[0] >= DEQUANTIZE_ROWS[pack.copies]:  # a long prefill: dequantize once
        k = xb.shape[1]
        parts = [dequantize_t(*src)[:k] for src in pack.sources]
        y = xb @ (parts[0] if len(parts) == 1 else torch.cat(parts, 1))
    else:
        if pack.copies == 2:
            xb = torch.cat([xb, xb], 1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), pack.weight, pack.group, pack.scales_zeros)
        if y.shape[1] != pack.out_features:
            y = y[:, :pack.out_features]
    y = y.to(x.dtype)
    if u is not None:  # in the input's dtype: at one row an fp32 GEMV is faster on CPU than a bf16 one
        y = torch.addmm(y, F.linear(x2, v.to(x.dtype)), u.to(x.dtype).t())
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, pack.out_features)
