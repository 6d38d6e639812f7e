"""Group-wise asymmetric quantization math shared by the quantizers (rtn, hqq, gptq) and the quantized factors.

Conventions (the storage layout is `hf_compress.kernels.reference.weights`): a weight [out, in] is viewed as
[out, n_groups, g] along its input dimension (the last group may be partial: padded here for the arithmetic, never
stored); w ≈ (q − z)·s with integer
codes q in [0, 2^bits − 1] and per-group scale s and (float) zero z. Scales and zeros are rounded to their
storage dtype *before* codes are chosen, so every error computed here is the error of what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

#: a zero point stays below this magnitude (fp16 holds integers exactly up to 2048): groups whose values sit far
#: from 0 relative to their spread get a slightly wider scale instead of an unrepresentable zero.
ZERO_LIMIT = 1024.0


#: how a group's scale and zero are chosen by rtn and gptq (``grid``): see `check_grid`
GRIDS = ("minmax", "mse", "mse-act")


def check_grid(method: str, grid: str, min_shrink: float, steps: int) -> None:
    """The errors for a bad ``grid`` / range-search option of rtn or gptq."""
    if grid not in GRIDS:
        raise ConfigError(f"{method} grid must be one of {GRIDS}, got {grid!r}")
    if not 0 < min_shrink <= 1:
        raise ConfigError(f"{method} min_shrink must be in (0, 1], got {min_shrink}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"{method} steps must be an integer >= 2, got {steps!r}")


@dataclass
class Quantized:
    """codes [out, in] (uint8), scales / zeros [out, n_groups] (fp32 values exactly representable in the storage
    dtype); the last group may be partial."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    #: [out, in] fp32: the values (in weight units) the codes round to nearest on the stored grid, when they are not
    #: the input weight itself (gptq: its error-compensated columns); read by learned rounding
    #: (`hf_compress.pipelines.reconstruct`), never stored
    continuous: torch.Tensor | None = None

    def dequantize(self, in_features: int | None = None) -> torch.Tensor:
        n = self.codes.shape[1]
        s = self.scales.repeat_interleave(self.group_size, dim=1)[:, :n]
        z = self.zeros.repeat_interleave(self.group_size, dim=1)[:, :n]
        return (self.codes.float() - z) * s


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g] (fp32). Padding repeats the last column, so it never widens a group's range
    (padded entries are excluded from every error through `valid_mask`)."""
    out, n = weight.shape
    pad = -n % group_size
    w = weight.float()
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.view(out, -1, group_size)


def valid_mask(n: int, group_size: int, device=None) -> torch.Tensor | None:
    """[1, n_groups, g] weights: 1 for real input columns, 0 for padding (None when nothing is padded)."""
    if n % group_size == 0:
        return None
    m = torch.zeros(-(-n // group_size) * group_size, device=device)
    m[:n] = 1
    return m.view(1, -1, group_size)


def stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype, integer_zero: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) mapping [lo, hi] onto [0, 2^bits − 1], rounded to ``dtype``; never zero, Inf or NaN.

    ``integer_zero``: the range is widened to contain 0 and the zero point is an integer, so that w = 0 is exactly
    representable (the classic asymmetric grid of GPTQ/AutoGPTQ)."""
    maxq = 2**bits - 1
    tiny = torch.finfo(dtype).tiny
    if integer_zero:
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        scale = stored(((hi - lo) / maxq).clamp_min(tiny), dtype).clamp_min(tiny)
        return scale, (-lo / scale).round().clamp(0, maxq)
    mag = torch.maximum(lo.abs(), hi.abs())
    scale = torch.maximum((hi - lo) / maxq, mag / ZERO_LIMIT).clamp_min(tiny)
    scale = stored(scale, dtype).clamp_min(tiny)
    zero = stored((-lo / scale).clamp(-ZERO_LIMIT, ZERO_LIMIT + maxq), dtype)
    return scale, zero


def codes_for(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (wg / scale[..., None] + zero[..., None]).round_().clamp_(0, 2**bits - 1)


def fake_quant(wg, scale, zero, bits):
    return (codes_for(wg, scale, zero, bits) - zero[..., None]) * scale[..., None]


def minmax(wg: torch.Tensor, bits: int, dtype: torch.dtype, shrink: float | torch.Tensor = 1.0,
           integer_zero: bool = False):
    lo, hi = wg.aminmax(dim=-1)
    return grid(lo * shrink, hi * shrink, bits, dtype, integer_zero)


def clip_search(wg: torch.Tensor, bits: int, dtype: torch.dtype, steps: int = 20, min_shrink: float = 0.5,
                weight: torch.Tensor | None = None, integer_zero: bool = False):
    """Per group, the min–max range shrunk by the factor in [min_shrink, 1] (``steps`` values) that minimises
    Σ weight·(w − ŵ)² (weight: per input channel, broadcast over groups; None = plain squared error)."""
    best_s, best_z = minmax(wg, bits, dtype, integer_zero=integer_zero)
    best_err = _err(wg, fake_quant(wg, best_s, best_z, bits), weight)
    for k in range(1, steps):
        shrink = 1.0 - (1.0 - min_shrink) * k / (steps - 1)
        s, z = minmax(wg, bits, dtype, shrink, integer_zero)
        err = _err(wg, fake_quant(wg, s, z, bits), weight)
        better = err < best_err
        best_s, best_z, best_err = (torch.where(better, s, best_s), torch.where(better, z, best_z),
                                    torch.minimum(err, best_err))
    return best_s, best_z


def channel_weights(stats, in_features: int, group_size: int, device=None) -> torch.Tensor | None:
    """[1, n_groups, g] weights of the input channels for an activation-aware grid: the diagonal of the layer's input
    Gram, E[x_j²] — the importance matrix of llama.cpp (``imatrix``), so that Σ_j h_jj (w_j − ŵ_j)² is the layer's
    output error when the inputs' channels are uncorrelated. Normalised to mean 1 with a floor of 1e-6 (a channel
    no calibration token uses still counts a little, so no group's weights all vanish); 0 on padding. None when
    ``stats`` holds no Gram."""
    if stats is None or getattr(stats, "gram", None) is None:
        return None
    d = stats.gram.diagonal().to(device=device, dtype=torch.float64) / max(stats.count, 1)
    d = (d / d.mean().clamp_min(1e-300)).clamp_min(1e-6)
    pad = -in_features % group_size
    return torch.cat([d, d.new_zeros(pad)]).float().view(1, -1, group_size)


def _err(wg, wq, weight):
    d = (wg - wq).square()
    return (d if weight is None else d * weight).sum(-1)


def scale_refit(wg: torch.Tensor, q: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype,
                weight: torch.Tensor | None = None):
    """Given codes and (integer) zeros, the scale minimising Σ weight·(w − (q − z)·s)² per group (closed form)."""
    d = q - zero[..., None]
    wt = torch.ones_like(wg) if weight is None else weight.expand_as(wg)
    num, den = (wt * d * wg).sum(-1), (wt * d * d).sum(-1)
    ok = (den > 0) & (num > 0)
    s = stored((num / den.clamp_min(1e-30)).clamp_min(torch.finfo(dtype).tiny), dtype)
    return s, ok


def least_squares_refit(wg: torch.Tensor, q: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor | None = None):
    """Given codes q, the (scale, zero) minimising Σ weight·(w − (q − z)·s)² per group (closed form: a weighted
    linear regression of w on q, w ≈ s·q + m, z = −m/s). Groups whose codes are all equal keep s from the caller."""
    wt = torch.ones_like(wg) if weight is None else weight.expand_as(wg)
    sw = wt.sum(-1)
    mq, mw = (wt * q).sum(-1) / sw, (wt * wg).sum(-1) / sw
    cov = (wt * (q - mq[..., None]) * (wg - mw[..., None])).sum(-1)
    var = (wt * (q - mq[..., None]).square()).sum(-1)
    ok = var > 0
    s = torch.where(ok, cov / var.clamp_min(1e-30), torch.zeros_like(cov))
    m = mw - s * mq
    ok &= s > 0
    scale = stored(s.clamp_min(torch.finfo(dtype).tiny), dtype)
    zero = stored((-m / scale).clamp(-ZERO_LIMIT, ZERO_LIMIT + q.amax()), dtype)
    return scale, zero, ok


def finish(wg: torch.Tensor, scale, zero, bits: int, group_size: int, in_features: int) -> Quantized:
    out = wg.shape[0]
    codes = codes_for(wg, scale, zero, bits).to(torch.uint8).reshape(out, -1)[:, :in_features]  # exact: 0..255
    return Quantized(codes, scale, zero, bits, group_size)


def rounding_error(weight: torch.Tensor, gram: torch.Tensor | None, bits: int, group_size: int,
                   dtype: torch.dtype = torch.float16) -> float:
    """The activation-weighted error tr((W − Q(W)) H (W − Q(W))ᵀ) of rounding ``weight`` [out, in] to the nearest
    point of its min–max grid (integer zero, as gptq's; scales and zeros rounded to ``dtype``) at ``bits``:
    the summed squared output error per token when H = E[xxᵀ] is the inputs' second moment (``gram``; None: H = I,
    the plain squared weight error). What `hf_compress.allocation.allocate_layer_formats` compares formats by."""
    out, n = weight.shape
    wg = grouped(weight, group_size)
    s, z = minmax(wg, bits, dtype, integer_zero=True)
    e = (wg - fake_quant(wg, s, z, bits)).reshape(out, -1)[:, :n]
    if gram is None:
        return float(e.double().square().sum())
    # one float32 product (the costly part: out x in x in), summed in float64
    return float(((e @ gram.to(torch.float32)) * e).double().sum())
