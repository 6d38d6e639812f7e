"""Per-layer widths of a quantized KV cache spec, and whether they pack into a model's head_dim: read by the caches
(`kv.quant`) and by the width allocation (`kv.allocation`), which is why they live below both."""

from __future__ import annotations

from ..errors import ConfigError
from ..kernels import codes_per_unit, token_group


def layer_widths(spec, i: int) -> tuple[int, int]:
    """(key bits, value bits) of decoder layer ``i``."""
    lb = spec.get("layer_bits")
    if lb is not None and lb["k"][i] is not None:
        return lb["k"][i], lb["v"][i]
    return spec["bits"], spec["value_bits"]


def check_layer_bits(spec, num_layers: int) -> None:
    lb = spec.get("layer_bits")
    if lb is not None and len(lb["k"]) != num_layers:
        raise ConfigError(f"KV {spec['method']} layer_bits has {len(lb['k'])} entries per half, but the model has "
                          f"{num_layers} decoder layers")


def check_head_dim(head_dim: int, spec) -> None:
    """Keys pack their codes along head_dim, values in per-token groups: every width used must fit."""
    lb = spec.get("layer_bits") or {"k": [], "v": []}
    key_bits = {spec["bits"], *(b for b in lb["k"] if b is not None)}
    value_bits = {spec["value_bits"] or spec["bits"], *(b for b in lb["v"] if b is not None)}
    try:
        for bits in sorted(key_bits):
            if head_dim % codes_per_unit(bits):
                raise ValueError(f"head_dim {head_dim} cannot hold whole {bits}-bit packing units "
                                 f"(needs a multiple of {codes_per_unit(bits)})")
        for bits in sorted(value_bits):
            token_group(head_dim, spec["group_size"], bits)
    except ValueError as e:
        raise ConfigError(str(e)) from None
