"""Pure-torch references: the specification every kernel is tested against, and the fallback wherever no kernel
runs. `weights`: the packed low-bit layout of `QuantLinear` and the linear products; `kv`: the KV cache's packed codes.
"""
