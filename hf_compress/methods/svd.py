"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, with √Σ split evenly between the two factors (data-free)."""

from __future__ import annotations

import torch

from ..registry import METHODS
from .base import LowRankMethod


def balanced_truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of `matrix` (Eckart–Young) as (U·√Σ, √Σ·Vᵀ), computed in fp64."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


@METHODS.register("svd")
class SVD(LowRankMethod):
    def factorize(self, weight, rank, stats=None):
        return balanced_truncated_svd(weight, rank)
