"""FWSVD (Hsu et al., 2022): Fisher-weighted SVD. Rows weighted by √(Σ_j E[(∂L/∂W_ij)²]) from the diagonal
Fisher information of the LM loss on calibration text; truncate diag(w)·W and unscale the left factor."""

from __future__ import annotations

import torch

from ..registry import METHODS
from .base import LowRankMethod
from .linalg import spectrum, truncated_factors


@METHODS.register("fwsvd")
class FWSVD(LowRankMethod):
    needs = frozenset({"fisher"})
    default_alloc = "energy"

    @staticmethod
    def _rows(stats) -> torch.Tensor:
        w = stats.fisher_rows.double().clamp_min(0).sqrt()
        return w.clamp_min(w.max() * 1e-6 + 1e-30)

    def spectrum(self, weight, stats=None):
        return spectrum(self._rows(stats).to(weight.device)[:, None] * weight.double())

    def factorize(self, weight, rank, stats=None, heldout=None):
        w = self._rows(stats).to(weight.device)
        u, v = truncated_factors(w[:, None] * weight.double(), rank)
        return (u / w[:, None]).float(), v.float()
