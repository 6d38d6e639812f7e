"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, with √Σ split evenly between the two factors (data-free)."""

from __future__ import annotations

import torch

from ..registry import METHODS
from .base import LowRankMethod
from .linalg import spectrum, truncated_factors


def balanced_truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of `matrix` (Eckart–Young) as (U·√Σ, √Σ·Vᵀ), computed in fp64."""
    u, v = truncated_factors(matrix.double(), rank)
    return u.float(), v.float()


@METHODS.register("svd")
class SVD(LowRankMethod):
    def spectrum(self, weight, stats=None):
        return spectrum(weight)

    def factorize(self, weight, rank, stats=None, heldout=None):
        return balanced_truncated_svd(weight, rank)
