"""Per-layer size accounting: what `hf-compress info` prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .modules import compressed_modules


@dataclass
class LayerInfo:
    name: str
    kind: str  # dense | lowrank | ...
    shape: tuple[int, int]  # (out, in)
    detail: str  # "rank 12" / "4b g128 +r32" / "" ...
    bytes: int  # bytes of all the module's tensors now
    dense_bytes: int  # bytes the dense layer would take in the same dtype
    bits_per_weight: float  # storage bits per weight of the layer (codes, scales, zeros, factors; bias excluded)


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _detail(module) -> str:
    if module.type_name == "lowrank":
        return f"rank {module.rank}"
    if module.type_name == "lowrank_quant":
        return f"r{module.rank} {module.bits}b g{module.group_size}"
    return (f"{module.bits}b g{module.group_size}" + (f" +r{module.rank}" if module.rank else "")
            + (f"@{module.factor_bits}b" if getattr(module, "factor_bits", 0) else ""))


def layer_table(model: nn.Module) -> list[LayerInfo]:
    compressed = compressed_modules(model)
    rows = []
    for name, module in model.named_modules():
        if name in compressed:
            out_f, in_f = module.out_features, module.in_features
            bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
            size = torch.empty((), dtype=module.compute_dtype).element_size()  # (`weight` would compute the product)
            dense = out_f * in_f * size + bias
            now = _tensor_bytes(module)
            rows.append(LayerInfo(name, module.type_name, (out_f, in_f), _detail(module), now, dense,
                                  8 * (now - bias) / (out_f * in_f)))
        elif isinstance(module, (nn.Linear, Conv1D)):
            shape = (module.nf, module.nx) if isinstance(module, Conv1D) else (module.out_features, module.in_features)
            b = _tensor_bytes(module)
            rows.append(LayerInfo(name, "dense", shape, "", b, b, 8 * module.weight.element_size()))
    return rows


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def format_table(model: nn.Module) -> str:
    rows = layer_table(model)
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<13} {'shape (out x in)':>17} {'rank/bits':>15} {'bits/w':>7} {'bytes':>12} "
             f"{'dense bytes':>12}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.kind:<13} {f'{r.shape[0]}x{r.shape[1]}':>17} {r.detail:>15} "
                     f"{r.bits_per_weight:>7.3f} {r.bytes:>12,} {r.dense_bytes:>12,}")
    now, dense = sum(r.bytes for r in rows), sum(r.dense_bytes for r in rows)
    n_comp = sum(r.kind != "dense" for r in rows)
    total = model_bytes(model)
    lines.append("")
    comp = [r for r in rows if r.kind != "dense"]
    weights = sum(r.shape[0] * r.shape[1] for r in comp)
    lines.append(f"linear layers: {len(rows)} ({n_comp} compressed); bytes {now:,} now vs {dense:,} dense "
                 f"({now / max(dense, 1):.3f}x)")
    if comp:
        bits = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in comp) / weights
        lines.append(f"compressed layers: {bits:.3f} bits per weight (all stored tensors but biases)")
    lines.append(f"whole model: {total:,} bytes now vs {total - now + dense:,} dense "
                 f"({total / max(total - now + dense, 1):.3f}x); parameters {sum(p.numel() for p in model.parameters()):,}")
    return "\n".join(lines)
