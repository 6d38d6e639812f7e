"""Pure-torch references: the specification every kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x · Vᵀ) · Uᵀ + b with x [..., in], V [r, in], U [out, r]."""
    return F.linear(F.linear(x, v), u, bias)
