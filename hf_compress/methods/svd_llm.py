"""SVD-LLM (Wang et al., 2024): truncation-aware whitening, plus cumulative-error compensation.

Whitening: with S·Sᵀ = Σ x xᵀ (Cholesky of the input Gram), ‖X(W − W')ᵀ‖_F = ‖(W − W')·S‖_F, so truncating
W·S at rank r and folding S⁻¹ into the right factor minimises the layer's *output* error on the calibration
inputs.

Compensation (the idea of SAES-SVD / SVD-LLM v2): in sequential mode a layer's input x_c comes from the already
compressed blocks, while the dense model would have fed it x_d. Fitting the *dense* output instead,
min ‖X_c W'ᵀ − X_d Wᵀ‖, has the closed form W* = W·G_dc·G_cc⁻¹ (G_dc = Σ x_d x_cᵀ, G_cc = Σ x_c x_cᵀ),
and the rank-r optimum is the whitened truncation of W* — in whitened space W*·S = W·G_dc·S⁻ᵀ. Full compensation
can overfit the calibration tokens, so the target blends the two, (1−β)·W·S + β·W·G_dc·S⁻ᵀ, and β is measured:
each layer takes, from a small grid, the β whose factors give the lowest dense-output error on held-out
calibration windows; the factors are then refitted on all windows.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import METHODS
from .base import LowRankMethod
from .linalg import spectrum, truncated_factors, whitening

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@METHODS.register("svd_llm")
class SVDLLM(LowRankMethod):
    needs = frozenset({"gram", "cross"})
    needs_heldout = True
    default_alloc = "energy"

    def __init__(self, compensation: str | float = "auto"):
        if compensation not in ("auto", "off") and not (isinstance(compensation, (int, float)) and 0 <= compensation <= 1):
            raise ConfigError(f"svd_llm compensation must be 'auto', 'off' or a number in [0, 1], got {compensation!r}")
        self.compensation = compensation
        if compensation == "off":
            self.needs = frozenset({"gram"})
            self.needs_heldout = False

    def spectrum(self, weight, stats=None):
        s, _ = whitening(stats.gram)
        return spectrum(weight.double() @ s)

    def _factors(self, w, stats, rank, beta):
        s, s_inv = whitening(stats.gram)
        target = w @ s
        if beta > 0 and stats.cross is not None:
            target = (1 - beta) * target + beta * (w @ stats.cross @ s_inv.T)
        u, v = truncated_factors(target, rank)
        return u, v @ s_inv

    @staticmethod
    def _heldout_error(w, u, v, val) -> float:
        """Σ_t ‖W' x_c − W x_d‖² on held-out tokens, from their statistics (W' = U·V)."""
        wp = u @ v
        return float(((wp @ val.gram) * wp).sum() - 2 * ((w @ val.cross) * wp).sum() + ((w @ val.ref_gram) * w).sum())

    def factorize(self, weight, rank, stats=None, heldout=None):
        w = weight.double()
        if self.compensation == "off" or stats.cross is None:
            beta = 0.0
        elif self.compensation != "auto":
            beta = float(self.compensation)
        elif heldout is None or heldout.count == 0:
            beta = 0.5
        else:
            errors = {b: self._heldout_error(w, *self._factors(w, stats, rank, b), heldout) for b in BETAS}
            beta = min(errors, key=errors.get)
        self.last_beta = beta
        u, v = self._factors(w, stats.merged(heldout), rank, beta)
        return u.float(), v.float()
