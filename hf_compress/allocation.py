"""Rank per layer from a budget. `uniform`: every layer keeps the same fraction of its parameters."""

from __future__ import annotations

import math

from .errors import ConfigError


def uniform_rank(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose factors hold at most (1 - ratio) of the dense parameters (at least 1)."""
    return max(1, math.floor((1.0 - ratio) * out_features * in_features / (out_features + in_features)))


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    return rank * (out_features + in_features) < out_features * in_features


def plan_ranks(shapes: dict[str, tuple[int, int]], ratio: float | None, rank: int | None,
               dense_fallback: bool) -> dict[str, int | None]:
    """name -> rank, or None where the layer stays dense."""
    plan: dict[str, int | None] = {}
    for name, (out_f, in_f) in shapes.items():
        if rank is not None:
            if rank > min(out_f, in_f):
                raise ConfigError(
                    f"rank {rank} is above min(out, in) = {min(out_f, in_f)} for {name} ({out_f}x{in_f})"
                )
            r = rank
        else:
            r = uniform_rank(out_f, in_f, ratio)
        plan[name] = r if (saves_parameters(out_f, in_f, r) or not dense_fallback) else None
    return plan
