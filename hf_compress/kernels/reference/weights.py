"""Pure-torch references: the specification every kernel is tested against.

Packed low-bit layout (``QuantLinear``; shared by every quantized kernel)
------------------------------------------------------------------------
A weight W [out, in] is quantized group-wise along its input dimension with group size ``g``: group ``j`` holds
input columns ``[j*g, (j+1)*g)``; when ``g`` does not divide ``in`` the last group is partial (no padding is
stored).

* codes ``q[o, k]`` in ``[0, 2**bits - 1]``, ``bits`` in {2, 3, 4, 8}, for ``k < in``;
* each row's codes form one little-endian bit stream: code ``k`` occupies bits ``[bits*k, bits*k + bits)``;
  the stream is stored in int32 words, ``qweight`` [out, ceil(in * bits / 32)], bit 0 = least significant
  (unused high bits of the last word are 0). For 2, 4 and 8 bits a code never straddles two words; 3-bit codes
  can (bits 30-31 of one word + bit 0 of the next) — no bit is wasted, so 3-bit costs exactly 3 bits per weight;
* ``scales`` and ``zeros`` [out, ceil(in / g)] (fp16 or bf16): ``W[o, k] ≈ (q[o, k] - zeros[o, k // g]) *
  scales[o, k // g]``, evaluated in fp32.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)


def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x · Vᵀ) · Uᵀ + b with x [..., in], V [r, in], U [out, r]."""
    return F.linear(F.linear(x, v), u, bias)


def codes_per_unit(bits: int) -> int:
    """Codes in the smallest whole-byte unit of a little-endian bit stream of ``bits``-bit codes: 8 per 3 bytes at 3
    bits, else ``8 // bits`` per byte (the weight words of this module and the KV codes of `reference.kv` alike)."""
    return 8 if bits == 3 else 8 // bits


def packed_words(n_codes: int, bits: int) -> int:
    """int32 words that hold ``n_codes`` codes of ``bits`` bits."""
    return -(-n_codes * bits // 32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [rows, n] (integers in [0, 2**bits)) -> int32 words [rows, packed_words(n, bits)]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    rows, n = codes.shape
    if codes.numel():
        lo, hi = codes.aminmax()
        if int(lo) < 0 or int(hi) >= 2**bits:
            raise ValueError(f"codes out of range for {bits}-bit packing")
    if sys.byteorder != "little":  # the byte-level path below reads bytes as little-endian int32 words
        return _pack_words(codes, bits)
    # The bit stream as bytes: 8 // bits codes per byte (2, 4, 8 bits), or for 3 bits 8 codes per 3 bytes (a
    # 24-bit group never straddles a byte). Reinterpreting 4 little-endian bytes as one int32 is the word.
    nwords = packed_words(n, bits)
    per = codes_per_unit(bits)  # codes per unit (3 bytes for 3 bits, else 1 byte)
    q = F.pad(codes.to(torch.int32 if bits == 3 else torch.uint8), (0, -n % per)).view(rows, -1, per)
    if bits == 8:
        stream = q.reshape(rows, -1)
    elif bits == 3:  # 8 codes -> one 24-bit word -> its 3 bytes
        word = (q << torch.arange(0, 24, 3, device=q.device, dtype=torch.int32)).sum(-1, dtype=torch.int32)
        stream = ((word[..., None] >> torch.tensor([0, 8, 16], device=q.device, dtype=torch.int32)) & 0xFF)
        stream = stream.to(torch.uint8).reshape(rows, -1)
    else:  # 2, 4 bits: the codes of a byte occupy disjoint bits, so their sum is their bitwise or (no carry)
        stream = (q << torch.arange(0, 8, bits, device=q.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    stream = F.pad(stream, (0, 4 * nwords - stream.shape[1]))
    return stream.contiguous().view(torch.int32)


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack` by integer arithmetic on int64 words (any byte order; the layout's definition spelled out)."""
    rows, n = codes.shape
    q = codes.to(torch.int64)
    if 32 % bits == 0:  # 2, 4, 8 bits: whole codes per word, code j of a word at bit j·bits
        per = 32 // bits
        q = torch.nn.functional.pad(q, (0, -n % per)).view(rows, -1, per)
        words = (q << torch.arange(0, 32, bits, device=q.device)).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    start = torch.arange(n, device=codes.device) * bits
    lo, shift = start // 32, start % 32
    nwords = packed_words(n, bits)
    words = torch.zeros(rows, nwords + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(1, lo, (q << shift) & 0xFFFFFFFF)
    words.index_add_(1, lo + 1, q >> (32 - shift))  # the straddling high bits (zero unless shift + bits > 32)
    words = words[:, :nwords]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """int32 words [rows, w] -> codes [rows, n] (int64, or ``dtype``)."""
    if 32 % bits == 0:  # 2, 4, 8 bits: no code straddles two words; arithmetic shifts are fine once masked
        per = 32 // bits
        shifts = torch.arange(per, device=words.device, dtype=torch.int32) * bits
        codes = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(words.shape[0], -1)[:, :n].to(dtype)
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    start = torch.arange(n, device=words.device) * bits
    lo, shift = start // 32, start % 32
    both = w[:, lo] | (w[:, lo + 1] << 32)
    return ((both >> shift) & (2**bits - 1)).to(dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [out, in_features] weight a packed layout stands for (computed in fp32, returned in ``dtype``)."""
    q = unpack(qweight, bits, in_features).to(torch.float32)
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    return ((q - z) * s).to(dtype)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, in_features: int, bias: torch.Tensor | None = None,
                 u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · dequant(Q)ᵀ + (x · Vᵀ) · Uᵀ + b — the low-rank term only when ``u``/``v`` are given."""
    w = dequantize(qweight, scales, zeros, bits, group_size, in_features, dtype=x.dtype)
    y = F.linear(x, w, bias)
    if u is not None:
        y = y + F.linear(F.linear(x, v.to(x.dtype)), u.to(x.dtype))
    return y
