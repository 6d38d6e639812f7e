"""Activation-aware channel scales (AWQ, Lin et al. 2024), folded into the weights, block by block.

A linear layer's output does not change when its input channel j is multiplied by s_j and its weight column j divided
by it — or, as done here, when the module that produces the input divides its output channel j by s_j and every layer
that reads it multiplies column j by s_j. Quantizing W·diag(s) instead of W protects the columns of the most active
input channels (their weights are scaled up, so the grid's rounding error costs them relatively less), at no bytes:
the inverse scale is folded into what produces the input. The producers (`mappings`):

* a norm whose output goes only to target layers (q/k/v after ``input_layernorm``; gate/up after
  ``post_attention_layernorm``): its weight (and bias) ← ·/s;
* ``v_proj`` before ``o_proj``: v_proj's rows ← ·/s (attention mixes each head's value vectors linearly); with
  grouped-query attention every query head reading a kv head shares that head's scales;
* ``up_proj`` before ``down_proj`` (dense MLPs, each expert, shared experts): up_proj's rows ← ·/s, since the gated
  product act(gate)·up is linear in up.

Each candidate is checked on the block itself before it is used: random scales are folded in, the block runs on one
calibration batch, and a mapping whose outputs move (a norm read by something else, Gemma's (1 + γ) norm weight) is
left out, with its reason in the report.

The scales are searched as AWQ does: s = a^α / w^(1−α) (a: the mean |x| of each input channel on the calibration
windows; w: the mean over rows of |W| relative to its group's largest, over every reader; normalised as AWQ
does, so that the largest times the smallest is 1), α on a grid of ``GRID`` values in [0, 1), and the unscaled weights as one more candidate. A candidate's cost is what
its readers' rounding (min–max grid, the run's bits and group size per layer) adds to their outputs: Σ tr(E H Eᵀ),
E = W − Q(W·diag(s))·diag(s)⁻¹ and H the inputs' Gram — computed from the statistics the pipeline gathers anyway,
with no forward per candidate (AWQ runs the module once per candidate). The chosen scales are folded into the dense
block, and the run's method then quantizes the scaled weights on the scaled inputs' statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import trace_inputs
from ..methods.quantlib import rounding_error

logger = logging.getLogger(__name__)

#: the kinds of channel scaling (`CompressionConfig.channel_scales`)
CHANNEL_SCALES = ("awq",)
#: values of α searched: 0, 1/GRID, ..., (GRID-1)/GRID (AWQ's n_grid)
GRID = 20
#: a mapping is exact when the block's outputs with random scales folded in stay within this relative error (of the
#: block's weights' dtype: rounding the folded weights to 16 bits moves them by up to 2^-8 relative in bfloat16); a
#: mapping that is not exact moves them by O(1), since the scales span e^±0.7
EXACT_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class Mapping:
    """A module whose output channels feed ``readers`` (names inside the block) and can absorb 1/s: a norm
    (``kind="norm"``) or a linear layer's rows (``"linear"``). ``repeat``: v_proj before o_proj under grouped-query
    attention, (kv heads, query heads per kv head, head size): o_proj's input channel (h, d) reads v_proj's row
    (h // per kv head, d)."""

    producer: str
    kind: str
    readers: list[str]
    repeat: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        return f"{self.producer} -> {'/'.join(r.rsplit('.', 1)[-1] for r in self.readers)}"


def _is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1


def candidates(block: nn.Module, targets: dict[str, nn.Module], runner, index: int, hidden: torch.Tensor
               ) -> list[Mapping]:
    """The mappings of ``block`` among its target layers ``targets`` (names inside the block, `nn.Linear` only): each
    norm whose output tensor is the input of target layers (found by running the block on ``hidden``), v_proj ->
    o_proj, and every up_proj -> down_proj pair of one MLP. Not yet checked for exactness (`exact`)."""
    linear = {n: m for n, m in targets.items() if type(m) is nn.Linear}
    norms = {n: m for n, m in block.named_modules() if n and _is_norm(m)}
    found = [Mapping(producer, "norm", readers)
             for readers, producer in trace_inputs(block, linear, runner, index, hidden, producers=norms) if producer]
    for name in linear:
        parent, _, leaf = name.rpartition(".")
        pre = f"{parent}." if parent else ""
        if leaf == "o_proj" and f"{pre}v_proj" in linear:
            v, o = linear[f"{pre}v_proj"], linear[name]
            attn = block.get_submodule(parent) if parent else block
            d = int(getattr(attn, "head_dim", 0) or 0)
            if d and v.out_features % d == 0 and o.in_features % v.out_features == 0:
                kv = v.out_features // d
                found.append(Mapping(f"{pre}v_proj", "linear", [name], (kv, o.in_features // v.out_features, d)))
        if leaf == "down_proj" and f"{pre}up_proj" in linear:
            found.append(Mapping(f"{pre}up_proj", "linear", [name]))
    return found


def exact(block: nn.Module, mappings: list[Mapping], runner, index: int, hidden: torch.Tensor, seed: int = 0
          ) -> tuple[list[Mapping], dict[str, str]]:
    """The mappings under which ``block`` computes the same outputs on ``hidden`` with random scales folded in (each
    checked alone), and {mapping: why it was left out} for the others. The block's weights are restored exactly."""
    base = runner.run(index, block, [hidden])[0].double()
    generator = torch.Generator().manual_seed(seed)
    kept, left = [], {}
    for m in mappings:
        n = block.get_submodule(m.producer).weight.shape[0]  # the producer's output channels
        s = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-0.7, 0.7, generator=generator))
        saved = {p: p.detach().clone() for p in [t for _, t in producer_params(block, m)]
                 + [block.get_submodule(r).weight for r in m.readers]}
        try:
            fold(block, m, s)
            out = runner.run(index, block, [hidden])[0].double()
        finally:
            _restore(block, saved)
        err = float((out - base).norm() / base.norm().clamp_min(1e-30))
        if err <= EXACT_RTOL.get(block.get_submodule(m.readers[0]).weight.dtype, 5e-2):
            kept.append(m)
        else:
            left[m.name] = (f"the block's outputs moved by {err:.2g} (relative) with scales folded in: "
                            f"{m.producer}'s output has readers other than {', '.join(m.readers)}, or its weight "
                            "does not scale its output")
    return kept, left


def producer_params(block: nn.Module, m: Mapping) -> list[tuple[str, torch.Tensor]]:
    """(name inside the block, tensor) of what `fold` divides: the producer's weight and its bias if it has one."""
    producer = block.get_submodule(m.producer)
    return [(f"{m.producer}.{n}", t) for n in ("weight", "bias")
            if isinstance(t := getattr(producer, n, None), torch.Tensor)]


def _restore(block: nn.Module, saved: dict) -> None:
    with torch.no_grad():
        for p, v in saved.items():
            p.copy_(v)


def reader_scales(m: Mapping, s: torch.Tensor) -> torch.Tensor:
    """The scales of the readers' input columns: ``s`` itself, or under grouped-query attention each kv head's scales
    repeated for the query heads that read it."""
    if m.repeat is None:
        return s
    kv, rep, d = m.repeat
    return s.view(kv, 1, d).expand(kv, rep, d).reshape(-1)


def fold(block: nn.Module, m: Mapping, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the readers' input columns by it (fp64, rounded
    once to each weight's dtype)."""
    s = s.double()
    with torch.no_grad():
        for _, p in producer_params(block, m):
            shape = (-1,) + (1,) * (p.dim() - 1)  # a norm's weight [n]; a linear layer's rows [n, in]
            p.copy_((p.double() / s.to(p.device).view(shape)).to(p.dtype))
        cols = reader_scales(m, s)
        for r in m.readers:
            w = block.get_submodule(r).weight
            w.copy_((w.double() * cols.to(w.device)[None, :]).to(w.dtype))


def _weight_means(weights: list[torch.Tensor], group_sizes: list[int]) -> torch.Tensor:
    """AWQ's weight statistic per input channel: |W| over its group's largest |W|, averaged over every reader's rows."""
    rows = []
    for w, g in zip(weights, group_sizes):
        out, n = w.shape
        g = n if n % g else g  # a group size that does not divide the row: the row's largest
        a = w.abs().float().reshape(out, n // g, g)
        rows.append((a / a.amax(-1, keepdim=True).clamp_min(1e-12)).reshape(out, n))
    return torch.cat(rows).mean(0)


def _per_kv(x: torch.Tensor, repeat) -> torch.Tensor:
    """A per-o_proj-input statistic averaged over the query heads sharing each kv head."""
    if repeat is None:
        return x
    kv, rep, d = repeat
    return x.view(kv, rep, d).mean(1).reshape(-1)


def search(m: Mapping, weights: list[torch.Tensor], absmean: torch.Tensor, gram: torch.Tensor,
           formats: list[tuple[int, int]], scale_dtype: torch.dtype, grid: int = GRID) -> dict:
    """The scales of mapping ``m`` (`fold`) that minimise its readers' rounding error on their inputs' Gram ``gram``
    (E[xxᵀ]); ``weights``: the readers' dense weights [out, in], ``formats``: each one's (bits, group size).
    Returns {"scales": tensor or None (no scaling measured best), "alpha", "error": {"before", "after"}}."""
    weights = [w.detach().float() for w in weights]
    h = gram.to(torch.float32)

    def cost(cols: torch.Tensor) -> float:
        hs = h / (cols[:, None] * cols[None, :])
        return sum(rounding_error(w * cols[None, :], hs, b, g, scale_dtype) for w, (b, g) in zip(weights, formats))

    a = _per_kv(absmean.float(), m.repeat).clamp_min(1e-12)
    wm = _per_kv(_weight_means(weights, [g for _, g in formats]), m.repeat).clamp_min(1e-12)
    before = cost(torch.ones_like(h[0]))
    best = {"scales": None, "alpha": None, "error": {"before": before, "after": before}}
    for k in range(grid):
        alpha = k / grid
        s = (a.pow(alpha) / (wm.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if not torch.isfinite(s).all():
            continue
        e = cost(reader_scales(m, s))
        if e < best["error"]["after"]:
            best = {"scales": s, "alpha": alpha, "error": {"before": before, "after": e}}
    return best
