"""KV-cache quantization, the torch reference (the specification): packed 2/4/8-bit codes, per-channel (keys) or
per-token (values) groups.

Layout (shared by the torch reference and the Triton kernels, and by `hf_compress.kv.quant`)
-----------------------------------------------------------------------------------------
``x`` is a tensor [..., T, C] (T tokens, C = head_dim channels), quantized asymmetrically with min/max:

* ``axis="channel"`` (KIVI keys): a group is ``group`` consecutive *tokens* of one channel; ``T`` must be a
  multiple of ``group``; ``scale``/``mn`` are [..., T // group, C];
* ``axis="token"`` (KIVI values): a group is ``group`` consecutive *channels* of one token; ``C`` must be a
  multiple of ``group``; ``scale``/``mn`` are [..., T, C // group].

``scale = (max - min) / (2**bits - 1)`` and ``mn = min`` are stored in ``scale_dtype`` (fp16 by default); codes are
``q = clamp(floor((x - mn) / scale + 0.5), 0, 2**bits - 1)`` computed in fp32 with the *stored* (rounded) scale and
minimum (a zero scale divides by 1). ``x̂ = q * scale + mn`` (fp32, returned in the requested dtype).

Codes are packed along C into uint8: ``8 // bits`` codes per byte, code ``c`` in byte ``c // per`` at bit
``(c % per) * bits`` (little-endian within the byte); ``codes`` is [..., T, C * bits / 8]. C must be a multiple of
``8 // bits``. 3-bit codes form one little-endian bit stream per row: every 8 codes fill 3 bytes (code ``c`` of a
chunk at bits ``3c .. 3c + 2`` of the chunk's 24-bit little-endian word), so C must be a multiple of 8; the Triton
kernels cover 2/4/8 bits and 3-bit runs the torch reference on every device.

Which implementation runs (this reference, `kernels.cpu.kv`, `kernels.triton.kv`) is chosen in
`hf_compress.kernels.dispatch` (`kv_quantize`, `kv_dequantize`).
"""

from __future__ import annotations

import torch

from .weights import codes_per_unit

KV_BITS = (2, 3, 4, 8)
#: storage dtypes by name: a KV cache's scales / minima and window take all three, a `QuantLinear`'s scales and zeros
#: float16 and bfloat16 (`hf_compress.modules.quant`)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------- checks
def _check(bits: int, group: int, axis: str, shape: torch.Size) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"KV quantization bits must be one of {KV_BITS}, got {bits}")
    if axis not in ("channel", "token"):
        raise ValueError(f"axis must be 'channel' (keys) or 'token' (values), got {axis!r}")
    if len(shape) < 2:
        raise ValueError(f"expected a tensor [..., T, C], got shape {tuple(shape)}")
    t, c = shape[-2], shape[-1]
    per = codes_per_unit(bits)
    if c % per:
        raise ValueError(f"{bits}-bit packing needs the channel count to be a multiple of {per}, got {c}")
    if group < 1:
        raise ValueError(f"group must be positive, got {group}")
    if axis == "channel" and t % group:
        raise ValueError(f"per-channel groups span {group} tokens; got {t} tokens (not a multiple)")
    if axis == "token" and c % group:
        raise ValueError(f"per-token groups span {group} channels; got {c} channels (not a multiple)")


def token_group(channels: int, requested: int, bits: int) -> int:
    """The per-token group size used for ``channels``: the largest power of two <= ``requested`` dividing
    ``channels`` and holding whole packing units (`codes_per_unit`); raises where none exists."""
    per = codes_per_unit(bits)
    g = 1
    while g * 2 <= requested:
        g *= 2
    while g >= per:
        if channels % g == 0:
            return g
        g //= 2
    raise ValueError(f"head_dim {channels} cannot be split into groups of whole {bits}-bit bytes "
                     f"(needs a multiple of {per})")


# ----------------------------------------------------------------------------------------------- torch reference
def _qparams(xg: torch.Tensor, dim: int, bits: int, sdt: torch.dtype):
    mn = xg.amin(dim, keepdim=True)
    mx = xg.amax(dim, keepdim=True)
    scale_s = ((mx - mn) / (2**bits - 1)).to(sdt)
    mn_s = mn.to(sdt)
    return scale_s, mn_s


def _codes(xg, scale_s, mn_s, bits):
    scale = scale_s.float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.floor((xg - mn_s.float()) / safe + 0.5)
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., C] -> packed uint8 [..., C * bits / 8]."""
    if bits == 3:  # 8 codes -> one 24-bit little-endian word -> 3 bytes
        chunks = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
        word = (chunks << (torch.arange(8, device=q.device, dtype=torch.int32) * 3)).sum(-1, keepdim=True)
        out = (word >> torch.tensor([0, 8, 16], device=q.device, dtype=torch.int32)) & 0xFF
        return out.reshape(*q.shape[:-1], q.shape[-1] * 3 // 8).to(torch.uint8)
    per = 8 // bits
    if per == 1:
        return q.to(torch.uint8).contiguous()
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    grouped = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed uint8 [..., W] -> codes uint8 [..., W * 8 / bits]."""
    if bits == 3:
        b = packed.to(torch.int32).reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3)
        word = b[..., 0:1] | (b[..., 1:2] << 8) | (b[..., 2:3] << 16)
        q = (word >> (torch.arange(8, device=packed.device, dtype=torch.int32) * 3)) & 7
        return q.reshape(*packed.shape[:-1], packed.shape[-1] * 8 // 3).to(torch.uint8)
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def quantize_reference(x: torch.Tensor, bits: int, group: int, axis: str, scale_dtype=torch.float16):
    _check(bits, group, axis, x.shape)
    *lead, t, c = x.shape
    xf = x.float()
    if axis == "channel":
        xg = xf.reshape(*lead, t // group, group, c)
        scale, mn = _qparams(xg, -2, bits, scale_dtype)
        q = _codes(xg, scale, mn, bits).reshape(*lead, t, c)
        scale, mn = scale.squeeze(-2), mn.squeeze(-2)
    else:
        xg = xf.reshape(*lead, t, c // group, group)
        scale, mn = _qparams(xg, -1, bits, scale_dtype)
        q = _codes(xg, scale, mn, bits).reshape(*lead, t, c)
        scale, mn = scale.squeeze(-1), mn.squeeze(-1)
    return pack_codes(q, bits), scale.contiguous(), mn.contiguous()


def dequantize_reference(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, group: int, axis: str,
                         dtype=torch.float32) -> torch.Tensor:
    q = unpack_codes(codes, bits).float()
    *lead, t, c = q.shape
    if axis == "channel":
        qg = q.reshape(*lead, t // group, group, c)
        x = qg * scale.float().unsqueeze(-2) + mn.float().unsqueeze(-2)
    else:
        qg = q.reshape(*lead, t, c // group, group)
        x = qg * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)
    return x.reshape(*lead, t, c).to(dtype)
