"""Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), imported lazily by `kernels.dispatch` and only when
they run: `common` (helpers, autotuning), `lowrank` and `weights` (the low-rank and quantized linear layers), `kv`
(KV-cache quantize / dequantize). Specification: `kernels.reference`.
"""
