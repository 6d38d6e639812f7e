"""Compute kernels behind hf-compress modules, installed as ``hf_compress.kernels``.

Laid out by backend, the same for weights and the KV cache:

* `reference` — pure torch, the specification (`reference.weights`: the packed low-bit layout; `reference.kv`: the
  KV cache's codes), used on CPU and wherever no kernel runs;
* `triton` — Triton kernels (`common`, `lowrank`, `weights`, `kv`; imported lazily, only when they run) for CUDA
  tensors;
* `cpu` — CPU kernels (`weights`: the int4 paths; `kv`: the KV dequantize fast path) and `cpu.paging` (OS memory);
* `dispatch` — one backend choice for weights and KV cache, ``HF_COMPRESS_KERNELS=auto|torch|triton|cpu``;
* `cache` — derived tensors kept between forwards (`reuse`); `plans` — the vLLM plugin's per-layer execution plans.

Imports flow one way: reference <- cpu / triton <- dispatch <- plans; nothing here imports the rest of hf-compress.
"""

from .cache import reuse
from .dispatch import (backend_for, kernel_mode, kv_dequantize, kv_quantize, lowrank_linear, quant_linear,
                       refresh_backend, triton_available)
from .reference.kv import KV_BITS, SCALE_DTYPES, token_group
from .reference.weights import SUPPORTED_BITS, codes_per_unit, dequantize, pack, packed_words, unpack

__all__ = ["KV_BITS", "SCALE_DTYPES", "SUPPORTED_BITS", "backend_for", "codes_per_unit", "dequantize", "kernel_mode",
           "kv_dequantize", "kv_quantize", "lowrank_linear", "pack", "packed_words", "quant_linear", "refresh_backend",
           "reuse", "token_group", "triton_available", "unpack"]
