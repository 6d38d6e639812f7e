"""The interface every compression method implements.

A method turns one dense weight into the factors/codes of a compressed module; it never touches the model.
The driver (`hf_compress.compressor`) finds the targets, asks the allocator for a budget per layer, calls the
method, and swaps modules. Calibrated methods additionally declare which activation statistics they need.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class CompressionMethod:
    name: ClassVar[str]
    #: "lowrank" or "quant": which module family the method fills.
    family: ClassVar[str]
    #: True when the method needs calibration statistics (and so cannot run at load time).
    requires_calibration: ClassVar[bool] = False

    def __init__(self, **kwargs: Any):
        if kwargs:
            from ..errors import ConfigError

            raise ConfigError(f"method {self.name!r} takes no option(s) {sorted(kwargs)}")


class LowRankMethod(CompressionMethod):
    family = "lowrank"

    def factorize(self, weight: torch.Tensor, rank: int, stats: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (U [out, rank], V [rank, in]) with U @ V ≈ weight. ``weight`` is fp32, [out, in]."""
        raise NotImplementedError
