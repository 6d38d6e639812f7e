"""Per-layer size accounting: what `hf-compress info` prints."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .modules import MODULE_TYPES


@dataclass
class LayerInfo:
    name: str
    kind: str  # dense | lowrank | ...
    shape: tuple[int, int]  # (out, in)
    detail: str  # "rank 12" / "" ...
    bytes: int  # bytes of the module's own tensors now
    dense_bytes: int  # bytes the dense layer would take in the same dtype


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)))


def layer_table(model: nn.Module) -> list[LayerInfo]:
    compressed = tuple(MODULE_TYPES.values())
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, compressed):
            out_f, in_f = module.out_features, module.in_features
            size = module.U.element_size()
            dense = (out_f * in_f + (out_f if module.bias is not None else 0)) * size
            rows.append(LayerInfo(name, module.type_name, (out_f, in_f), f"rank {module.rank}", _tensor_bytes(module), dense))
        elif isinstance(module, (nn.Linear, Conv1D)):
            shape = (module.nf, module.nx) if isinstance(module, Conv1D) else (module.out_features, module.in_features)
            b = _tensor_bytes(module)
            rows.append(LayerInfo(name, "dense", shape, "", b, b))
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
    lines = [f"{'layer':<{width}}  {'kind':<8} {'shape (out x in)':>17} {'rank/bits':>10} {'bytes':>12} {'dense bytes':>12}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.kind:<8} {f'{r.shape[0]}x{r.shape[1]}':>17} {r.detail:>10} {r.bytes:>12,} {r.dense_bytes:>12,}")
    now, dense = sum(r.bytes for r in rows), sum(r.dense_bytes for r in rows)
    n_comp = sum(r.kind != "dense" for r in rows)
    total = model_bytes(model)
    lines.append("")
    lines.append(f"linear layers: {len(rows)} ({n_comp} compressed); bytes {now:,} now vs {dense:,} dense "
                 f"({now / max(dense, 1):.3f}x)")
    lines.append(f"whole model: {total:,} bytes now vs {total - now + dense:,} dense "
                 f"({total / max(total - now + dense, 1):.3f}x); parameters {sum(p.numel() for p in model.parameters()):,}")
    return "\n".join(lines)
