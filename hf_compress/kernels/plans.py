"""Per-layer execution plans for the vLLM plugin (`hf_compress.integrations.vllm.plugin`): several parts of one
merged vLLM linear layer (``qkv_proj``, ``gate_up_proj``, or a single layer) run as one call, planned once at load.

* `Int4Plan`: every part a `QuantLinear` the CPU int4 kernel takes, on the CPU backend — the parts' codes side by
  side in one `cpu.weights.Int4Pack`, one kernel call, plus one low-rank term for their EoRA factors;
* `LowRankPlan`: every part a `LowRankLinear` on a backend other than Triton — V stacked along the rank (one GEMM),
  then each part's U on its slice.

The plugin says which modules the parts are (it knows the module classes; nothing here imports them) and hands in its
GEMM (`LowRankPlan`'s callables: vLLM's own dense CPU GEMM); the backend is `dispatch`'s choice.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .cpu import weights as cpu
from .cpu.paging import release_freed_memory
from .dispatch import backend_for


class Int4Plan(NamedTuple):
    """A layer's parts on the CPU int4 kernel in one call: their codes side by side in one `cpu.Int4Pack`, their
    EoRA factors (if any) as one low-rank term, V [R, in] stacked along the rank and U [N, R] block-diagonal."""

    pack: cpu.Int4Pack
    u: torch.Tensor | None
    v: torch.Tensor | None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return cpu.quant_linear(x, self.pack, bias, self.u, self.v)


class LowRankPlan(NamedTuple):
    """Low-rank parts: V [R, in] stacked along the rank (one GEMM for all parts), each part's U [out_i, r_i] applied
    to its ``spans`` slice of V·x; each GEMM a callable x -> x·Wᵀ (the ``gemm`` given to `lowrank_plan`)."""

    gemm_v: Any
    gemm_u: list[Any]
    spans: list[tuple[int, int]]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        t = self.gemm_v(x)
        if len(self.gemm_u) == 1:
            y = self.gemm_u[0](t)
        else:
            y = torch.cat([gemm(t[..., a:b].contiguous()) for gemm, (a, b) in zip(self.gemm_u, self.spans)], -1)
        return y if bias is None else y + bias


def _backend(t: torch.Tensor) -> str | None:
    """`dispatch.backend_for`, or None where the forced backend cannot run here (the parts' forward then says so)."""
    try:
        return backend_for(t)
    except RuntimeError:
        return None


def int4_plan(parts: list[nn.Module]) -> Int4Plan | None:
    """The int4 plan for ``parts``, all `QuantLinear` (the caller checks), when their tensors are on the CPU, the CPU
    backend is selected (`hf_compress.kernels.dispatch`) and the CPU kernel takes them all in one layout; None
    otherwise (the parts' own forward runs). Repacked once, here at load; packed EoRA factors are dequantized once, to
    the values the module's forward computes with."""
    if parts[0].qweight.device.type != "cpu" or _backend(parts[0].qweight) != "cpu":
        return None
    keys = {cpu.concat_key(p.bits, p.group_size, p.in_features) for p in parts}
    if len(keys) != 1 or None in keys:
        return None
    pack = cpu.repack_concat([(p.qweight, p.scales, p.zeros, p.bits, p.group_size, p.in_features) for p in parts])
    release_freed_memory()
    dtype = parts[0].compute_dtype
    factors = [p.factors(dtype) for p in parts]
    if all(u is None for u, _ in factors):
        return Int4Plan(pack, None, None)
    rank = sum(p.rank for p in parts)
    u_all = torch.zeros(pack.out_features, rank, dtype=dtype)
    v_all = torch.zeros(rank, parts[0].in_features, dtype=dtype)
    row = col = 0
    for p, (u, v) in zip(parts, factors):
        if u is not None:
            u_all[row:row + p.out_features, col:col + p.rank] = u.detach()
            v_all[col:col + p.rank] = v.detach()
            col += p.rank
        row += p.out_features
    return Int4Plan(pack, u_all, v_all)


def lowrank_plan(parts: list[nn.Module], gemm) -> LowRankPlan | None:
    """The low-rank plan for ``parts``, all `LowRankLinear` (the caller checks), on a device where the parts' forward
    is two GEMMs (not Triton); None otherwise. ``gemm``: weight -> a callable x -> x·weightᵀ."""
    if _backend(parts[0].U) in ("triton", None):
        return None
    v = parts[0].V.detach() if len(parts) == 1 else torch.cat([p.V.detach() for p in parts]).contiguous()
    ends = torch.tensor([p.rank for p in parts]).cumsum(0).tolist()
    return LowRankPlan(gemm(v), [gemm(p.U.detach().contiguous()) for p in parts], list(zip([0] + ends[:-1], ends)))
