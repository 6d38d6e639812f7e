"""RTN: round to nearest on the min–max grid of each group (data-free; also compress-on-load).

``integer_zero`` (default): the grid contains 0 exactly (range widened to include 0, integer zero point) — the
classic asymmetric grid. Measured on SmolLM2-135M at 3-bit/g64 it matters: some layers (value projections) lose
far less output accuracy when 0 is on the grid (see docs/quantization.md); ``integer_zero=False`` maps [min, max] exactly.

``grid``: ``"minmax"`` (default); ``"mse"``: per group, the min–max range shrunk by the factor in [``min_shrink``, 1]
(``steps`` values) with the lowest squared weight error; ``"mse-act"``: the same search on the activation-weighted
error Σ_j h_jj (w_j − ŵ_j)², h = diagonal of the layer's input Gram (llama.cpp's importance matrix; llm-compressor's
mse observer without weights) — it needs calibration data, so RTN then runs in the calibrated pipeline.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..registry import METHODS
from .base import QuantMethod
from .quantlib import channel_weights, check_grid, clip_search, finish, grouped, minmax, valid_mask


@METHODS.register("rtn")
class RTN(QuantMethod):
    def __init__(self, integer_zero: bool = True, grid: str = "minmax", min_shrink: float = 0.5, steps: int = 20):
        check_grid("rtn", grid, min_shrink, steps)
        self.integer_zero, self.grid, self.min_shrink, self.steps = bool(integer_zero), grid, float(min_shrink), steps
        if grid == "mse-act":
            self.needs = frozenset({"gram"})

    def quantize(self, weight, bits, group_size, stats=None, scale_dtype=None):
        wg = grouped(weight, group_size)
        if self.grid == "minmax":
            scale, zero = minmax(wg, bits, scale_dtype, integer_zero=self.integer_zero)
        else:
            n = weight.shape[1]
            if self.grid == "mse":
                w = valid_mask(n, group_size, weight.device)
            else:
                w = channel_weights(stats, n, group_size, weight.device)
                if w is None:
                    raise ConfigError("rtn grid='mse-act' weights the error by the input Gram: it needs calibration data")
            scale, zero = clip_search(wg, bits, scale_dtype, self.steps, self.min_shrink, weight=w,
                                      integer_zero=self.integer_zero)
        return finish(wg, scale, zero, bits, group_size, weight.shape[1])
