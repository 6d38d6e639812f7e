"""ASVD (Yuan et al., 2023): activation-aware SVD. Scale input channels by S = diag(mean|x|^α), truncate W·S, fold
S⁻¹ back into the right factor, so that channels with large activations are reconstructed first."""

from __future__ import annotations

import torch

from ..registry import METHODS
from .base import LowRankMethod
from .linalg import spectrum, truncated_factors


@METHODS.register("asvd")
class ASVD(LowRankMethod):
    needs = frozenset({"absmean"})
    default_alloc = "energy"

    def __init__(self, alpha: float = 0.5):
        self.alpha = float(alpha)

    def _scales(self, stats) -> torch.Tensor:
        s = stats.absmean.double().pow(self.alpha)
        return s.clamp_min(s.max() * 1e-6 + 1e-30)

    def spectrum(self, weight, stats=None):
        return spectrum(weight.double() * self._scales(stats).to(weight.device))

    def factorize(self, weight, rank, stats=None, heldout=None):
        s = self._scales(stats).to(weight.device)
        u, v = truncated_factors(weight.double() * s, rank)
        return u.float(), (v / s).float()
