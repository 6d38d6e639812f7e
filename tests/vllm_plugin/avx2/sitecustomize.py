"""Imported by every Python process started with this folder on PYTHONPATH (vLLM's engine and workers included):
where ``HF_COMPRESS_EMULATE_AVX2=1``, torch reports a CPU without AVX512, AVX512-BF16 or AMX, so that vLLM loads its
AVX2 build (``vllm._C_AVX2``) and picks its AVX2 attention; ``ATEN_CPU_CAPABILITY=avx2`` (set beside it) makes
torch's own kernels, the int4 ones included, run their AVX2 code. On a CPU without AVX512 both are what happens
anyway. Used by tests/vllm_plugin/test_avx2.py."""

import os

if os.environ.get("HF_COMPRESS_EMULATE_AVX2") == "1":
    import torch

    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
