"""CPU fast path for reading a quantized KV cache: dequantize packed 2/3/4/8-bit codes (layout:
`kernels.reference.kv`).

The reference (`reference.kv.dequantize_reference`) unpacks with a broadcast shift over the innermost, 2-to-8-wide
axis of codes per byte — a pattern torch's CPU loops do not vectorise (~0.15 µs per thousand codes, most of a
decode step's cache read at 2048 tokens). Here every step runs over whole contiguous rows:

* unpack: each 8-code packing unit (2 bytes at 2 bits, 4 at 4 bits, 3 at 3 bits) is widened into one int64 and its
  codes spread to one byte each with shift/or/mask steps (the classic bit "spread"), then viewed as uint8 — codes in
  their order, no gather, no interleaving copy;
* dequantize: ``x = q * scale + mn`` into the caller's buffer (``out``, e.g. the front of the
  tensor a cache read returns, so that the quantized tokens and the full-precision window are not concatenated
  afterwards).

Values equal the reference's up to the rounding of a fused multiply-add for keys (relative 1e-6; exact for values:
the same fp32 multiply and add). A shape this path does not take (a row of codes that is not a whole number of
8-code units) goes to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: per width: bytes per 8 codes, and the (shift, mask) steps that spread those bytes' codes to one byte each
_SPREAD = {
    4: (4, ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F))),
    2: (2, ((24, 0x000000FF000000FF), (12, 0x000F000F000F000F), (6, 0x0303030303030303))),
    3: (3, ((20, 0x00000FFF00000FFF), (10, 0x003F003F003F003F), (5, 0x0707070707070707))),
}


def supports(bits: int, packed_width: int) -> bool:
    """Whether a row of ``packed_width`` bytes of ``bits``-bit codes takes this path (whole 8-code units)."""
    return bits == 8 or (bits in _SPREAD and packed_width % _SPREAD[bits][0] == 0)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed uint8 [..., W] -> codes uint8 [..., W * 8 / bits] (the same as `reference.kv.unpack_codes`)."""
    if bits == 8:
        return packed
    unit, steps = _SPREAD[bits]
    lead, w = packed.shape[:-1], packed.shape[-1]
    if w % unit:
        raise ValueError(f"{bits}-bit rows of {w} bytes are not whole units of {unit} bytes")
    p = packed.contiguous()
    if unit in (2, 4):  # 8 codes in 2 or 4 bytes: one int16 / int32 word, widened without its sign
        word = p.view(torch.int16 if unit == 2 else torch.int32).to(torch.int64)
        word &= (1 << (8 * unit)) - 1
    else:  # 3 bytes: a 24-bit little-endian word, padded to an int32 with a zero high byte
        word = F.pad(p.view(*lead, w // 3, 3), (0, 1)).view(torch.int32).squeeze(-1).to(torch.int64)
    for shift, mask in steps:  # in place: one temporary per step
        word |= word << shift
        word &= mask
    return word.view(torch.uint8).view(*lead, w * 8 // bits)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group: int, axis: str,
               out: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """``x = q * scale + mn`` for the layout of `kernels.reference.kv`, written into ``out`` when given (a
    [..., T, C] tensor or view; fp32 math, then ``out``'s dtype) and returned."""
    q = unpack_codes(codes, bits)
    *lead, t, c = q.shape
    if axis == "channel":
        shape, s, m = (*lead, t // group, group, c), scale.unsqueeze(-2), mn.unsqueeze(-2)
    else:
        shape, s, m = (*lead, t, c // group, group), scale.unsqueeze(-1), mn.unsqueeze(-1)
    qf = q.view(shape).float()  # scales / minima stay in their dtype: the multiply-add casts them per element
    # keys (scales broadcast over token rows): one addcmul; values (scales broadcast along the innermost axis, which
    # addcmul handles ~4x slower): a multiply then an in-place add
    if out is not None and out.dtype == torch.float32:  # straight into the caller's buffer: no second pass
        view = out.unflatten(-2, shape[-3:-1]) if axis == "channel" else out.unflatten(-1, shape[-2:])
        if axis == "channel":
            torch.addcmul(m, qf, s, out=view)
        else:
            torch.mul(qf, s, out=view).add_(m)
        return out
    x = (torch.addcmul(m, qf, s) if axis == "channel" else torch.mul(qf, s).add_(m)).view(*lead, t, c)
    if out is None:
        return x.to(dtype)
    return out.copy_(x)
