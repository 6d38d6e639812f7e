"""Size accounting, in one place: bytes per layer (`layer_table`), of the whole model (`model_bytes`) and their
breakdown (`size_breakdown`: compressed layers now and dense, dense linear layers, the rest). What `hf-compress info`
prints (`format_table`), what `hf-compress compress` reports and what the model card's tables and plot show
(`hf_compress.hub`)."""

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


def layer_type(name: str) -> str:
    """The type of a layer, as the card groups them: the leaf of its name (``q_proj``); one expert's layer of a
    mixture-of-experts block (``...experts.down_proj.7``) is of type ``experts.down_proj``, whatever its expert."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1].isdigit():
        return ".".join(parts[-3:-1])
    return parts[-1]


def size_breakdown(model: nn.Module, rows: list[LayerInfo] | None = None) -> dict:
    """Bytes now and dense-equivalent: compressed layers, dense linear layers, everything else (embeddings, ...).

    ``compressed_now`` / ``compressed_dense``: the compressed layers' bytes and their dense layers' bytes;
    ``other_linear``: linear layers left dense; ``other``: the rest (embeddings, norms, a head tied to the
    embeddings, weights outside linear layers such as fused experts left dense; `hf_compress.coverage` counts the
    parameters by kind); ``total_now`` / ``total_dense``: the whole model (tied tensors once) now and with every compressed
    layer dense again; ``linear_now`` / ``linear_dense``: all linear layers (`layer_table`'s rows); ``layers`` and
    ``compressed_layers``: how many; ``bits_per_weight``: of the compressed layers, weighted by their weights (None
    when none is); ``params``: parameters now. ``rows``: `layer_table(model)` when already computed."""
    rows = layer_table(model) if rows is None else rows
    comp = [r for r in rows if r.kind != "dense"]
    comp_now = sum(r.bytes for r in comp)
    comp_dense = sum(r.dense_bytes for r in comp)
    # a dense layer's tensors shared with another module (a head tied to the embeddings) count as "other"
    holders: dict[int, int] = {}
    for m in model.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            holders[t.data_ptr()] = holders.get(t.data_ptr(), 0) + 1
    linear_dense = 0
    for r in rows:
        if r.kind == "dense":
            m = model.get_submodule(r.name)
            linear_dense += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())
                                if holders.get(t.data_ptr(), 0) <= 1)
    total = model_bytes(model)
    other = total - comp_now - linear_dense
    weights = sum(r.shape[0] * r.shape[1] for r in comp)
    bits = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in comp) / weights if comp else None
    return {"compressed_now": comp_now, "compressed_dense": comp_dense, "other_linear": linear_dense,
            "other": max(other, 0), "total_now": total, "total_dense": total - comp_now + comp_dense,
            "params": sum(p.numel() for p in model.parameters()),
            "linear_now": sum(r.bytes for r in rows), "linear_dense": sum(r.dense_bytes for r in rows),
            "layers": len(rows), "compressed_layers": len(comp), "bits_per_weight": bits}


def format_table(model: nn.Module) -> str:
    rows = layer_table(model)
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<13} {'shape (out x in)':>17} {'rank/bits':>15} {'bits/w':>7} {'bytes':>12} "
             f"{'dense bytes':>12}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.kind:<13} {f'{r.shape[0]}x{r.shape[1]}':>17} {r.detail:>15} "
                     f"{r.bits_per_weight:>7.3f} {r.bytes:>12,} {r.dense_bytes:>12,}")
    s = size_breakdown(model, rows)
    now, dense, total, total_dense = s["linear_now"], s["linear_dense"], s["total_now"], s["total_dense"]
    lines.append("")
    lines.append(f"linear layers: {s['layers']} ({s['compressed_layers']} compressed); bytes {now:,} now vs {dense:,} "
                 f"dense ({now / max(dense, 1):.3f}x)")
    if s["compressed_layers"]:
        lines.append(f"compressed layers: {s['bits_per_weight']:.3f} bits per weight (all stored tensors but biases)")
    lines.append(f"whole model: {total:,} bytes now vs {total_dense:,} dense "
                 f"({total / max(total_dense, 1):.3f}x); parameters {s['params']:,}")
    return "\n".join(lines)
