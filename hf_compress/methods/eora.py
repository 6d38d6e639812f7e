"""EoRA (Liu et al., 2024): low-rank compensation of a quantization error in the eigenspace of the inputs.

The error E = W − dequant(Q) costs ‖X Eᵀ‖_F on the calibration inputs. With G = XᵀX = Q Λ Qᵀ and S = Q Λ^½
(S Sᵀ = G), ‖X Eᵀ‖_F = ‖E S‖_F, so the best rank-r compensation is the truncated SVD of E·S with S⁻¹ folded back
into the right factor — the same whitening as SVD-LLM (`linalg.whitening`; Cholesky or the eigen-decomposition
give the same optimum). Without calibration statistics it falls back to the plain truncated SVD of E.
"""

from __future__ import annotations

import torch

from .linalg import truncated_factors, whitening


def eora_factors(error: torch.Tensor, rank: int, gram: torch.Tensor | None = None, name: str = ""
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, r], V [r, in]) with U·V ≈ ``error`` in the input-weighted norm (fp64 inside, fp32 out)."""
    e = error.double()
    if gram is None:
        u, v = truncated_factors(e, rank)
        return u.float(), v.float()
    s, s_inv = whitening(gram.to(e.device), name)
    u, v = truncated_factors(e @ s, rank)
    return u.float(), (v @ s_inv).float()
