"""Linear algebra shared by the calibrated methods (fp64 throughout)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def whitening(gram: torch.Tensor, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁻¹) with S·Sᵀ ≈ gram. Cholesky first; on failure (rank-deficient Gram from real data) retry with
    growing diagonal damping, then fall back to the eigen-decomposition with small eigenvalues clipped.
    Never raises for a finite symmetric positive semi-definite input."""
    return _whitening(gram, name, inverse=True)


def whitening_factor(gram: torch.Tensor, name: str = "") -> torch.Tensor:
    """S of `whitening` alone, bit for bit (the same damping ladder), without computing S⁻¹."""
    return _whitening(gram, name, inverse=False)[0]


def _whitening(gram: torch.Tensor, name: str, inverse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    gram = gram.double()
    n = gram.shape[0]
    scale = gram.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    for damp in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        s, info = torch.linalg.cholesky_ex(gram + damp * scale * eye)
        if info == 0:
            if damp > 0:
                logger.info("whitening %s: Cholesky needed damping %.0e x mean(diag)", name, damp)
            return s, torch.linalg.solve_triangular(s, eye, upper=False) if inverse else None
    logger.warning("whitening %s: Cholesky failed, using the eigen-decomposition", name)
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    evals = evals.clamp_min(1e-6 * scale)
    root = evals.sqrt()
    return evecs * root, (evecs / root).T if inverse else None


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U·√Σ, √Σ·Vᵀ) of the best rank-``rank`` approximation of ``matrix`` (in its own dtype)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def spectrum(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


def spd_inverse(h: torch.Tensor) -> torch.Tensor:
    """H⁻¹ of a symmetric positive-definite H from its Cholesky factor, by solving H X = I (`torch.cholesky_solve`).
    Same result as ``torch.cholesky_inverse`` to fp64 rounding (~1e-15 relative), 10-30x faster on CPU in torch
    2.13-2.14 (n = 768: 0.04 s vs 1.1 s; n = 2048: 0.3 s vs 3.7 s, 2 threads), where LAPACK's potri path is slow."""
    factor = torch.linalg.cholesky(h)
    return torch.cholesky_solve(torch.eye(h.shape[0], dtype=h.dtype, device=h.device), factor)
