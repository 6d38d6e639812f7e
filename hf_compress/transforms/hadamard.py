"""Orthogonal matrices for rotations: Hadamard matrices of many orders, randomized, and Haar-random orthogonal ones.

A Hadamard matrix H (n x n, entries ±1, H·Hᵀ = n·I) exists only for n = 1, 2 or a multiple of 4; it is built here
(`hadamard`) from three classical constructions, combined by Kronecker products (H_a ⊗ H_b is Hadamard of order
a·b):

* Sylvester: H_2 = [[1, 1], [1, −1]], so every power of two;
* Paley I: order q + 1 for a prime q ≡ 3 (mod 4) (12, 20, 24, 32, 44, 48, 60, 72, 84, ...);
* Paley II: order 2(q + 1) for a prime q ≡ 1 (mod 4) (12, 28, 36, 60, 76, 108, ...).

That covers the hidden sizes of the usual decoders: 576 (SmolLM2-135M) = 2³·72 with H_72 Paley I (q = 71),
896 (Qwen2-0.5B) = 2⁵·28 (Paley II, q = 13), 960 = 2⁴·60, 1536 = 2⁷·12, 2304 = 2⁵·72, 3584 = 2⁷·28, 5120 = 2⁸·20,
and every power of two. Orders with no construction here (an odd order, n ≡ 2 mod 4, or one that needs a prime
power q) get None, and the rotation falls back to a random orthogonal matrix (`random_orthogonal`).

`randomized_hadamard` is QuaRot's Q = diag(s)·H/√n with random signs s: orthogonal, and every row and column spreads
one coordinate evenly over all n (|Q_ij| = 1/√n), which is what flattens outlier channels ("incoherence").
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = χ(j − i) with χ the Legendre symbol mod the prime q (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley1(q: int) -> torch.Tensor:
    """Hadamard of order q + 1 (prime q ≡ 3 mod 4): I + [[0, 1ᵀ], [−1, Q]] (Q skew-symmetric)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """Hadamard of order 2(q + 1) (prime q ≡ 1 mod 4): C = [[0, 1ᵀ], [1, Q]] (symmetric, C² = q·I) with each 0
    replaced by [[1, −1], [−1, −1]] and each ±1 by ±[[1, 1], [1, −1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, b) + torch.kron(torch.eye(q + 1, dtype=torch.float64), a)


@lru_cache(maxsize=None)
def _hadamard(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None
    if (n - 1) % 4 == 3 and _is_prime(n - 1):
        return paley1(n - 1)
    if (n // 2 - 1) % 4 == 1 and _is_prime(n // 2 - 1):
        return paley2(n // 2 - 1)
    half = _hadamard(n // 2)
    if half is not None:
        return torch.kron(_hadamard(2), half)
    for a in range(4, math.isqrt(n) + 1, 4):  # a product of two constructible orders (144 = 12 · 12)
        if n % a == 0 and (n // a) % 4 == 0:
            ha, hb = _hadamard(a), _hadamard(n // a)
            if ha is not None and hb is not None:
                return torch.kron(ha, hb)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (fp64, entries ±1, H·Hᵀ = n·I), or None when none is constructed here."""
    h = _hadamard(int(n))
    return None if h is None else h.clone()


def randomized_hadamard(n: int, generator: torch.Generator) -> torch.Tensor | None:
    """Q = diag(s)·H/√n, s uniform random signs: orthogonal (fp64), or None when there is no Hadamard of order n."""
    h = hadamard(n)
    if h is None:
        return None
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * h / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (fp64): QR of a Gaussian matrix, with R's diagonal signs moved into Q."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.sign(r.diagonal()) + 0.5)[None, :]
