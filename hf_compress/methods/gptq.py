"""GPTQ (Frantar et al., 2023): quantize one input column at a time and push its rounding error onto the columns
not yet quantized, weighted by the inverse Hessian H = XᵀX of the layer's inputs — a closed-form step of the
layer-output least-squares problem (Optimal Brain Quantization with lazy block updates).

Options: ``act_order`` (quantize columns by decreasing H diagonal, i.e. the most active inputs first, while the
storage keeps contiguous groups: a group's scale/zero is fixed when its first column comes up, from the group's
then-current weights), ``damp`` (diagonal damping, fraction of mean(diag H)), ``grid`` ("minmax", default, as
in GPTQ; "mse": per-group range search — the min–max range shrunk by the factor in [``min_shrink``, 1], ``steps``
values — minimising the squared weight error; range shrinking on the weight error hurt RTN/HQQ on SmolLM2, see
hqq.py; "mse-act": the same search on the activation-weighted error Σ_j H_jj (w_j − ŵ_j)² over the group's columns,
llama.cpp's importance-matrix objective, from the Gram GPTQ already has), ``integer_zero`` (default on: 0 is exactly on
every group's grid).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import METHODS
from .base import QuantMethod
from .linalg import spd_inverse
from .quantlib import Quantized, channel_weights, check_grid, clip_search, grouped, minmax


@METHODS.register("gptq")
class GPTQ(QuantMethod):
    needs = frozenset({"gram"})

    def __init__(self, damp: float = 0.01, act_order: bool = True, grid: str = "minmax", block_size: int = 128,
                 integer_zero: bool = True, min_shrink: float = 0.5, steps: int = 20):
        check_grid("gptq", grid, min_shrink, steps)
        self.min_shrink, self.steps = float(min_shrink), steps
        if not 0 <= damp < 1:
            raise ConfigError(f"gptq damp must be in [0, 1), got {damp}")
        self.damp, self.act_order, self.grid, self.block_size = float(damp), bool(act_order), grid, int(block_size)
        self.integer_zero = bool(integer_zero)

    def _grid(self, wg, bits, dtype, act=None):
        """A group's (scale, zero) from its current weights ``wg`` [out, 1, g]; ``act`` [1, 1, g]: its columns'
        channel weights (grid "mse-act")."""
        if self.grid == "minmax":
            return minmax(wg, bits, dtype, integer_zero=self.integer_zero)
        return clip_search(wg, bits, dtype, self.steps, self.min_shrink, weight=act, integer_zero=self.integer_zero)

    def quantize(self, weight, bits, group_size, stats=None, scale_dtype=torch.float16):
        if stats is None or stats.gram is None:
            raise ConfigError("gptq needs the input Gram matrix of each layer (calibration data)")
        g = group_size
        out, n = weight.shape
        w = grouped(weight, g).reshape(out, -1).clone()
        n_pad, n_groups = w.shape[1], w.shape[1] // g
        act = channel_weights(stats, n, g, w.device).reshape(-1) if self.grid == "mse-act" else None
        h = torch.eye(n_pad, dtype=torch.float64, device=w.device)
        h[:n, :n] = stats.gram.to(w.device) / max(stats.count, 1)
        dead = h.diagonal() == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        h.diagonal().add_(self.damp * h.diagonal().mean())
        perm = torch.argsort(h.diagonal(), descending=True) if self.act_order else torch.arange(n_pad, device=w.device)
        w, h = w[:, perm], h[perm][:, perm]
        act = None if act is None else act[perm]
        hinv = torch.linalg.cholesky(spd_inverse(h), upper=True).float()
        group_of = perm // g
        groups = group_of.tolist()  # per processed column, as Python ints: the loop below is per column
        scales = torch.zeros(out, n_groups, device=w.device)
        zeros = torch.zeros_like(scales)
        done = [False] * n_groups
        codes = torch.zeros(out, n_pad, device=w.device)
        continuous = torch.zeros(out, n_pad, device=w.device)  # each column as rounded (after the earlier updates)
        maxq = 2**bits - 1
        # blocks hold whole groups when there is no reordering, so a group's grid sees its up-to-date weights
        bs = max(g, self.block_size // g * g) if not self.act_order else self.block_size
        for i1 in range(0, n_pad, bs):
            i2 = min(i1 + bs, n_pad)
            w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
            err1 = torch.zeros_like(w1)
            for i in range(i2 - i1):
                grp = groups[i1 + i]
                if not done[grp]:
                    pos = (group_of == grp).nonzero().squeeze(1)  # this group's columns, in processing order
                    current = torch.where((pos >= i1) & (pos < i2), w1[:, (pos - i1).clamp(0, i2 - i1 - 1)], w[:, pos])
                    s, z = self._grid(current[:, None, :], bits, scale_dtype,
                                      None if act is None else act[pos][None, None, :])
                    scales[:, grp], zeros[:, grp] = s[:, 0], z[:, 0]
                    done[grp] = True
                s, z = scales[:, grp], zeros[:, grp]
                col = w1[:, i]
                q = (col / s + z).round_().clamp_(0, maxq)
                codes[:, i1 + i] = q
                continuous[:, i1 + i] = col
                e = (col - (q - z) * s) / hinv1[i, i]
                w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
                err1[:, i] = e
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        unperm = torch.argsort(perm)
        codes, continuous = codes[:, unperm][:, :n], continuous[:, unperm][:, :n]
        return Quantized(codes.to(torch.uint8), scales, zeros, bits, g, continuous)
