"""CPU kernels: `weights` (`QuantLinear` on PyTorch's int4 CPU kernel, the prefill path, the ISA dispatch, U by
columns), `kv` (the KV cache's dequantize fast path), and `paging` (the OS memory around them: no kernels).
Specification: `kernels.reference`; chosen by `kernels.dispatch`.
"""
