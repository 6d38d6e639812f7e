"""Compute kernels behind hf-compress modules, installed as ``hf_compress.kernels``.

Every op has a pure-torch reference (the specification, used on CPU and wherever Triton is missing).
GPU Triton implementations plug in behind the same functions; ``HF_COMPRESS_KERNELS=torch`` forces the
reference path everywhere.
"""

from .dispatch import backend_for, lowrank_linear

__all__ = ["backend_for", "lowrank_linear"]
