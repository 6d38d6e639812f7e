"""Choose between the Triton kernels and the torch references.

``HF_COMPRESS_KERNELS`` = ``auto`` (default: Triton for CUDA tensors when importable), ``torch`` (always the
reference) or ``triton`` (Triton wherever it can run; on CPU that needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch

from . import reference


def backend_for(tensor: torch.Tensor) -> str:
    choice = os.environ.get("HF_COMPRESS_KERNELS", "auto").lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"HF_COMPRESS_KERNELS must be auto, torch or triton, got {choice!r}")
    # No Triton kernel is registered yet: every op resolves to its torch reference.
    return "torch"


def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x · Vᵀ) · Uᵀ + b."""
    backend_for(x)
    return reference.lowrank_linear(x, u, v, bias)
