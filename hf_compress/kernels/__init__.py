"""Compute kernels behind hf-compress modules, installed as ``hf_compress.kernels``.

Every op has a pure-torch reference (the specification, used on CPU and wherever Triton is missing).
Triton implementations (`triton_lowrank`, `triton_quant`; imported lazily, only when they run) plug in behind
the same functions for CUDA tensors; ``HF_COMPRESS_KERNELS=auto|torch|triton`` forces either path
(`dispatch`).
"""

from .dispatch import backend_for, kernel_mode, lowrank_linear, quant_linear, refresh_backend, triton_available
from .reference import SUPPORTED_BITS, dequantize, pack, packed_words, unpack

__all__ = ["SUPPORTED_BITS", "backend_for", "dequantize", "kernel_mode", "lowrank_linear", "pack", "packed_words",
           "quant_linear", "refresh_backend", "triton_available", "unpack"]
