"""Learned rounding and clipping (``learn_rounding``): block-wise output reconstruction in the spirit of AutoRound
(Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent", 2023).

After the calibrated pipeline has quantized a block's layers (rtn or gptq), every quantized layer of the block gets

* a rounding offset V ∈ [−0.5, 0.5] per weight: code = clamp(round(w/s + z + V), 0, 2^bits − 1), where w are the
  values the method rounded to nearest (rtn: the weight; gptq: its error-compensated columns, so V = 0 gives back
  exactly the method's codes);
* two clipping factors α, β ∈ [``min_clip``, 1] per group that shrink the group's grid range [lo, hi] (the method's
  own grid: lo = −z·s, hi = (2^bits − 1 − z)·s) to [β·lo, α·hi]: s = (α·hi − β·lo)/(2^bits − 1), z = −β·lo/s
  (rounded to an integer when the method's zeros are integers).

V, α and β are learned by signed gradient descent (a step of ``lr``·sign(gradient), the learning rate decaying
linearly to 0; rounding passes its gradient straight through) on the mean squared error between the quantized
block's output, given the inputs the compressed model really produces, and the dense model's block output on the
dense stream (the calibration windows, ``batch_size`` windows per step, drawn by a generator seeded from ``seed`` and
the block's index). The result is stored exactly as rtn/gptq store theirs (codes, scales and zeros per group, scales
and zeros rounded to their storage dtype). It is kept only when its output error on *all* the calibration windows is
not larger than the method's own result's; otherwise the block keeps the method's codes (logged).

Memory: one block's learnable tensors (V is the size of the block's weights, in fp32) and the autograd graph of one
step's windows. Nothing here reads or writes the model outside the block it is given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..methods.quantlib import ZERO_LIMIT, Quantized, grouped, stored

logger = logging.getLogger(__name__)

#: the options of ``learn_rounding`` and their defaults (``lr`` None: 1/iters, AutoRound's default)
DEFAULTS: dict[str, Any] = {"iters": 200, "lr": None, "batch_size": 4, "min_clip": 0.5, "seed": 0}
#: the quantization methods whose result it refines
METHODS = ("rtn", "gptq")


def options(value, method: str, config=None) -> dict[str, Any] | None:
    """``learn_rounding`` as given (None/False, True, or a dict of `DEFAULTS`' keys), checked and completed; a clear
    `ConfigError` for anything else."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"learn_rounding must be a dict of options {sorted(DEFAULTS)} (or true for the defaults), "
                          f"got {value!r}")
    unknown = set(value) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"Unknown learn_rounding option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if method not in METHODS:
        raise ConfigError(f"learn_rounding refines the codes of {' or '.join(METHODS)}, not of method {method!r}")
    opts = {**DEFAULTS, **value}
    for key in ("iters", "batch_size"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"learn_rounding {key} must be a positive integer, got {v!r}")
    seed = opts["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"learn_rounding seed must be a non-negative integer, got {seed!r}")
    if opts["lr"] is None:
        opts["lr"] = 1.0 / opts["iters"]
    for key, ok, what in (("lr", lambda v: 0 < v <= 1, "in (0, 1]"), ("min_clip", lambda v: 0 < v <= 1, "in (0, 1]")):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise ConfigError(f"learn_rounding {key} must be a number {what}, got {v!r}")
        opts[key] = float(v)
    if config is not None:
        if config.eora_rank or config.eora_bits:
            raise ConfigError("learn_rounding refines the codes alone: it cannot be combined with eora_rank/eora_bits "
                              "(the EoRA factors would be fitted to the codes before they are learned)")
    return opts


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


class Learnable(nn.Module):
    """A quantized linear layer with learnable rounding offsets and clipping factors (see the module docstring); its
    forward computes with the fake-quantized weight, differentiable in V, α, β."""

    def __init__(self, continuous: torch.Tensor, q: Quantized, bias: torch.Tensor | None, min_clip: float):
        super().__init__()
        self.in_features = continuous.shape[1]
        self.bits, self.group_size, self.min_clip = q.bits, q.group_size, min_clip
        self.maxq = 2**q.bits - 1
        self.register_buffer("w", grouped(continuous, q.group_size))  # [out, G, g] fp32
        self.register_buffer("s0", q.scales.float())
        self.register_buffer("z0", q.zeros.float())
        self.integer_zero = bool(torch.equal(self.z0, self.z0.round()))
        self.bias = bias
        self.v = nn.Parameter(torch.zeros_like(self.w))
        self.alpha = nn.Parameter(torch.ones_like(self.s0))
        self.beta = nn.Parameter(torch.ones_like(self.s0))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of the clipped range, unrounded (zero rounded with a straight-through gradient)."""
        lo, hi = -self.z0 * self.s0, (self.maxq - self.z0) * self.s0
        s = ((self.alpha * hi - self.beta * lo) / self.maxq).clamp_min(1e-3 * self.s0)
        z = -self.beta * lo / s
        if self.integer_zero:
            z = _ste_round(z).clamp(0, self.maxq)
        return s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.grid()
        s, z = s[..., None], z[..., None]
        q = _ste_round(self.w / s + z + self.v).clamp(0, self.maxq)
        w = ((q - z) * s).reshape(self.w.shape[0], -1)[:, : self.in_features]
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def project(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(self.min_clip, 1.0)
        self.beta.clamp_(self.min_clip, 1.0)

    @torch.no_grad()
    def quantized(self, scale_dtype: torch.dtype) -> Quantized:
        """The learned result as stored: scale (and a non-integer zero) rounded to ``scale_dtype`` first, then the
        codes."""
        s, z = self.grid()
        s = stored(s, scale_dtype).clamp_min(torch.finfo(scale_dtype).tiny)
        z = z.round().clamp(0, self.maxq) if self.integer_zero else stored(
            z.clamp(-ZERO_LIMIT, ZERO_LIMIT + self.maxq), scale_dtype)
        codes = (self.w / s[..., None] + z[..., None] + self.v).round_().clamp_(0, self.maxq)
        codes = codes.to(torch.uint8).reshape(self.w.shape[0], -1)[:, : self.in_features]
        return Quantized(codes, s, z, self.bits, self.group_size)


@dataclass
class Fitted:
    """One block's learned-rounding outcome: the output MSE on every calibration window of the method's result and of
    the learned one, and whether the learned one was kept."""

    mse_before: float
    mse_after: float
    kept: bool

    def as_dict(self) -> dict:
        return {"mse_before": self.mse_before, "mse_after": self.mse_after, "kept": self.kept}


def _take(obj, idx: torch.Tensor, n: int):
    """``obj`` (a captured call argument: tensor, tuple/list of them, or anything else) with its batch dimension of
    size ``n`` cut to the windows ``idx``; tensors whose first dimension is not the batch's (broadcast position
    embeddings, None masks) pass unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.dim() > 0 and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(o, idx, n) for o in obj)
    return obj


def output_mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared error over every element of every batch (float64 sums)."""
    total, count = 0.0, 0
    for o, t in zip(outputs, targets):
        total += (o.double() - t.double()).square().sum().item()
        count += o.numel()
    return total / max(count, 1)


def train(block: nn.Module, learnables: dict[str, Learnable], inputs: list[torch.Tensor],
          targets: list[torch.Tensor], calls: list, opts: dict, seed: int) -> list[float]:
    """Signed gradient descent on the ``learnables`` (already swapped into ``block``) for ``opts["iters"]`` steps;
    returns the loss of each step. ``calls``: the block's captured call per batch (``.args``, ``.kwargs``)."""
    params = [p for m in learnables.values() for p in (m.v, m.alpha, m.beta)]
    gen = torch.Generator().manual_seed(seed)
    iters, lr, bs = opts["iters"], opts["lr"], opts["batch_size"]
    losses = []
    for it in range(iters):
        b = int(torch.randint(len(inputs), (1,), generator=gen))
        n = inputs[b].shape[0]
        idx = torch.randperm(n, generator=gen)[: min(bs, n)].sort().values
        call = calls[b]
        x = inputs[b][idx] if n > 1 else inputs[b]
        y = targets[b][idx] if n > 1 else targets[b]
        with torch.enable_grad():
            out = block(x, *_take(call.args, idx, n), **{k: _take(v, idx, n) for k, v in call.kwargs.items()})
            out = out[0] if isinstance(out, tuple) else out
            loss = F.mse_loss(out.float(), y.float())
            grads = torch.autograd.grad(loss, params)
        step = lr * (1.0 - it / iters)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(step * g.sign())
            for m in learnables.values():
                m.project()
        losses.append(loss.item())
    return losses
