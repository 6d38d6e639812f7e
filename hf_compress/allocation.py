"""Budgets per layer: low-rank ranks, quantization EoRA ranks, and the EoRA bit budget.

* ``uniform``: every layer keeps the same fraction of its parameters (`plan`: ranks, or EoRA ranks of a
  quantization method, from the config alone);
* ``energy``: one global budget, ranks where the measured spectra say they buy the most (`allocate_energy`);
* ``loss``: ``energy`` weighted by each layer's output sensitivity (`hf_compress.gradients.output_sensitivity`);
* ``eora_bits``: EoRA factors of a generous rank (`eora_rank_cap`), truncated after compression to one global
  budget of extra bits per weight (`allocate_eora`).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .modules import QuantLinear


def uniform_rank(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose factors hold at most (1 - ratio) of the dense parameters (at least 1)."""
    return max(1, math.floor((1.0 - ratio) * out_features * in_features / (out_features + in_features)))


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    return rank * (out_features + in_features) < out_features * in_features


def plan_ranks(shapes: dict[str, tuple[int, int]], ratio: float | None, rank: int | None,
               dense_fallback: bool) -> dict[str, int | None]:
    """name -> rank, or None where the layer stays dense."""
    plan: dict[str, int | None] = {}
    for name, (out_f, in_f) in shapes.items():
        if rank is not None:
            if rank > min(out_f, in_f):
                raise ConfigError(
                    f"rank {rank} is above min(out, in) = {min(out_f, in_f)} for {name} ({out_f}x{in_f})"
                )
            r = rank
        else:
            r = uniform_rank(out_f, in_f, ratio)
        plan[name] = r if (saves_parameters(out_f, in_f, r) or not dense_fallback) else None
    return plan


ALLOCATORS = ("uniform", "energy", "loss")


def allocator_for(config, method) -> str:
    """The allocator a run uses: the config's, else the method's default; ``uniform`` for a fixed rank and for
    quantization methods."""
    if config.rank is not None or method.family == "quant":
        return "uniform"
    return config.alloc or method.default_alloc


def plan(config, method, shapes: dict[str, tuple[int, int]], factor_bits: dict[str, int] | None = None
         ) -> dict[str, int | None]:
    """The ``uniform`` plan: name -> rank (for a quantization method its EoRA rank, 0 for none), or None where
    the layer stays dense."""
    if method.family == "quant":
        if config.eora_bits:  # factors of a generous rank now; `allocate_eora` truncates them to the budget
            return {n: eora_rank_cap(o, i, config.eora_bits, config.eora_factor_bits or (factor_bits or {}).get(n, 16))
                    for n, (o, i) in shapes.items()}
        return {n: min(config.eora_rank or 0, o, i) for n, (o, i) in shapes.items()}
    return plan_ranks(shapes, config.ratio, config.rank, config.dense_fallback)


def eora_rank_cap(out_f: int, in_f: int, bits: float, factor_bits: int) -> int:
    """The largest EoRA rank a budgeted layer may get: 4x its equal-share rank (at least 8), at most min(out, in)."""
    equal = bits * out_f * in_f / ((out_f + in_f) * factor_bits)
    return min(out_f, in_f, max(8, math.ceil(4 * equal)))


def allocate_eora(model, names, bits: float) -> dict[str, int]:
    """Truncate the EoRA factors of the layers ``names`` to one global budget of ``bits`` extra bits per weight.

    Rank i of a layer removes σᵢ² of its (input-weighted) error energy; the factors come from ``truncated_factors``
    (U = Uₛ·√Σ with orthonormal Uₛ), so σᵢ = ‖U[:, i]‖². Taking ranks in decreasing σᵢ² per stored bit is the
    greedy knapsack; within a layer it takes a prefix, which is the truncated SVD at that rank."""
    layers = {n: model.get_submodule(n) for n in names}
    layers = {n: m for n, m in layers.items() if isinstance(m, QuantLinear)}
    budget = bits * sum(m.out_features * m.in_features for m in layers.values())
    items = []
    for n, m in layers.items():
        if not m.rank:
            continue
        cost = m.rank_bits
        gains = m.factors(torch.float64)[0].detach().square().sum(0).square()  # σᵢ² (of the stored factors)
        items += [(g / cost, cost, n) for g in gains.tolist()]
    items.sort(key=lambda t: -t[0])
    ranks = {n: 0 for n in layers}
    spent = 0.0
    for _, cost, n in items:
        if spent + cost <= budget:
            ranks[n] += 1
            spent += cost
    for n, m in layers.items():
        m.truncate_rank(ranks[n])
    return ranks


def max_ratio(shapes: dict[str, tuple[int, int]]) -> float:
    """Largest removable fraction: every layer at rank 1."""
    dense = sum(o * i for o, i in shapes.values())
    return 1.0 - sum(o + i for o, i in shapes.values()) / dense


def allocate_energy(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float,
                    weights: dict[str, float] | None = None, relative: bool = True) -> dict[str, int | None]:
    """Ranks under one global budget: minimise Σ_l w_l·(Σ_{k>r_l} σ_{l,k}² / Σ_k σ_{l,k}²) subject to
    Σ_l cost_l(r_l) ≤ (1 − ratio)·Σ_l m_l·n_l, where cost = r·(m+n), or m·n for a layer kept dense (error 0).

    σ are each layer's singular values in its method's metric (whitened for SVD-LLM), so the objective is the sum
    of relative output errors. With ``relative=False`` the errors are not divided by Σσ² (absolute output error
    energy), which with ``weights`` = each layer's mean squared loss gradient at its output is a first-order
    estimate of the loss increase (the ``loss`` allocator). Solved exactly per layer for a Lagrange multiplier λ (error + λ·cost), with λ found
    by bisection so that the budget is met; non-convex error curves and the dense option are handled by the
    per-layer argmin. Returns name -> rank, or None where the layer stays dense."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio must lie strictly between 0 and 1, got {ratio}")
    top = max_ratio(shapes)
    if ratio > top:
        raise ConfigError(f"ratio {ratio} cannot be met: with rank 1 everywhere the targeted layers lose at most "
                          f"{top:.4f} of their parameters; feasible range is (0, {top:.4f}].")
    budget = (1.0 - ratio) * sum(o * i for o, i in shapes.values())
    curves = {}
    for name, (o, i) in shapes.items():
        s2 = spectra[name].double().pow(2)
        tail = s2.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{k>=r} σ_k² (0-based): error of keeping r
        total = tail[0].clamp_min(1e-30) if relative else 1.0
        r_max = min(o, i)
        ranks = torch.arange(1, r_max + 1, dtype=torch.float64)
        err = torch.cat([tail[1:], tail.new_zeros(1)])[: r_max] / total * (weights or {}).get(name, 1.0)
        curves[name] = (ranks, err, float(o + i), float(o * i))

    def solve(lam: float):
        plan, cost = {}, 0.0
        for name, (ranks, err, per_rank, dense) in curves.items():
            obj = err + lam * ranks * per_rank
            k = int(torch.argmin(obj))
            if lam * dense <= float(obj[k]) or float(ranks[k]) * per_rank >= dense:
                plan[name], c = None, dense
            else:
                plan[name], c = int(ranks[k]), float(ranks[k]) * per_rank
            cost += c
        return plan, cost

    lo, hi = 0.0, 1.0
    while solve(hi)[1] > budget:
        hi *= 4.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if solve(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    return solve(hi)[0]


def allocate_expert_bits(usage: dict[str, float], sizes: dict[str, int], choices: list[int], budget: float,
                         errors: dict[str, dict[int, float]] | None = None, blocks: dict[str, list[str]] | None = None,
                         keep: int = 1) -> dict[str, int]:
    """One bit width per expert layer (or per expert: a unit whose layers share a width) under one budget: the
    parameter-weighted mean of the widths is at most ``budget`` (bits per weight).

    The error model is the usual one for uniform rounding: a layer quantized to b bits adds output error
    proportional to 4^-b, weighted by how often the router uses the layer (``usage``: the share of routed tokens);
    a layer at b bits costs size·b. The widths are those of `allocate_bits` on that model (upgrades by error
    reduction per added bit, ties to the earlier layer). A layer the router never used stays at the smallest width.

    ``errors`` ({name: {width: error}}, `hf_compress.statistics.expert_errors`): the measured error of each layer at
    each width replaces ``usage · 4^-b``.

    Width 0 in ``choices`` removes the unit (an expert: `hf_compress.transforms.expert_pruning.expert_costs` gives
    ``errors``, error[0] its importance): it costs no bits, and the budget stays that of all units, so removing
    experts pays for wider ones. ``blocks`` ({block: [its units]}) is then required: every block removes the same
    number d of its units (one expert count per model config) and keeps at least ``keep`` (top-k). For each
    feasible d, each block removes its d units of least error[0] (ties: the earlier one) and the kept units' widths
    come from `allocate_bits` with the whole budget; the d of least total error (removed units' error[0] plus the
    kept units' error at their widths; ties: the smaller d) wins. Returns {unit: width}, 0 for a removed unit."""
    choices = sorted(choices)
    if errors is None:
        if 0 in choices:
            raise ConfigError("expert_bits with 0 (removing experts) needs measured costs (errors)")
        errors = {n: {b: usage[n] * 4.0 ** -b for b in choices} for n in usage}
    total = budget * sum(sizes[n] for n in usage)
    widths = [b for b in choices if b > 0]
    costs = {n: {b: sizes[n] * b for b in widths} for n in usage}
    if 0 not in choices:
        return allocate_bits(errors, costs, total)
    if not widths:
        raise ConfigError("expert_bits must hold at least one width above 0")
    if blocks is None:
        raise ConfigError("expert_bits with 0: the units' blocks are needed (every block removes as many)")
    smallest = min(len(units) for units in blocks.values())
    best, best_error = None, None
    for d in range(0, smallest - keep + 1):
        removed = set()
        for units in blocks.values():
            order = sorted(range(len(units)), key=lambda k: (errors[units[k]][0], k))
            removed.update(units[k] for k in order[:d])
        kept = [n for n in usage if n not in removed]
        try:
            chosen = allocate_bits({n: {b: errors[n][b] for b in widths} for n in kept}, {n: costs[n] for n in kept},
                                   total)
        except ConfigError:  # even the smallest width for the kept units is over the budget: remove more
            continue
        error = sum(errors[n][0] for n in removed) + sum(errors[n][chosen[n]] for n in kept)
        if best_error is None or error < best_error:
            best, best_error = {**chosen, **{n: 0 for n in removed}}, error
    if best is None:
        low = keep * min(widths) / max(len(units) for units in blocks.values())
        raise ConfigError(f"the expert bit budget {budget:g} cannot be met with expert_bits {choices}: keeping "
                          f"{keep} experts per block (num_experts_per_tok) at {min(widths)} bits needs at least "
                          f"{low:.4g} bits per expert weight")
    return {n: best[n] for n in usage}


def stored_bits(out_features: int, in_features: int, bits: int, group_size: int, scale_bits: int = 16) -> int:
    """Bits a `QuantLinear` of this shape stores: its packed codes and one scale and one zero per group (no bias)."""
    from .kernels.reference.weights import packed_words
    from .modules.quant import n_groups

    return out_features * (32 * packed_words(in_features, bits) + 2 * scale_bits * n_groups(in_features, group_size))


def _hull_steps(errors: dict[int, float], costs: dict[int, float]) -> list[tuple[int, float, float]]:
    """The upgrades of one unit along the lower convex hull of its (cost, error) points from its cheapest choice:
    [(choice reached, error reduction, added cost)], with decreasing reduction per cost. A choice that costs more
    and removes no more error than a cheaper one, or lies above the hull, is never reached (a hull step may skip it)."""
    pts = sorted((costs[b], errors[b], b) for b in errors)
    hull = [pts[0]]
    for c, e, b in pts[1:]:
        if e >= hull[-1][1] or c <= hull[-1][0]:  # no better than what is already on the hull
            continue
        while len(hull) >= 2:
            (c0, e0, _), (c1, e1, _) = hull[-2], hull[-1]
            if (e0 - e1) * (c - c0) <= (e0 - e) * (c1 - c0):  # hull[-1] is not below the chord: drop it
                hull.pop()
            else:
                break
        hull.append((c, e, b))
    return [(b1, e0 - e1, c1 - c0) for (c0, e0, _), (c1, e1, b1) in zip(hull, hull[1:])]


def allocate_bits(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, float]], budget: float
                  ) -> dict[str, int]:
    """One choice per unit (a layer, or layers that must share a width) under one budget: Σ cost ≤ ``budget``,
    minimising Σ error. ``errors[u][b]`` / ``costs[u][b]``: unit u's error and cost at width b.

    Every unit starts at its cheapest choice; the upgrades along each unit's convex hull (`_hull_steps`) are taken
    in decreasing error reduction per added cost (ties: the earlier unit, then the smaller width) as long as they
    fit, stopping at the first that does not. Taking a prefix of one fixed order makes the widths monotone in the
    budget (more budget never gives a unit fewer bits), and at every budget the prefix spends exactly it is the
    optimum (the Lagrangian solution of the multiple-choice knapsack); in between, at most the next upgrade's cost is
    left unspent. Upgrades that remove no error are never taken. Raises `ConfigError` when even the cheapest
    choices exceed the budget."""
    if not errors:
        return {}
    start = {u: min(costs[u], key=lambda b: (costs[u][b], b)) for u in errors}
    spent = sum(costs[u][start[u]] for u in errors)
    if spent > budget * (1 + 1e-12):
        raise ConfigError(f"the bit budget ({budget:.6g} bits) is below the cheapest choice for every layer "
                          f"({spent:.6g} bits)")
    steps = []
    for k, u in enumerate(errors):
        for b, gain, cost in _hull_steps(errors[u], costs[u]):
            if gain > 0:
                steps.append((-gain / cost, k, b, u, cost))
    steps.sort(key=lambda t: t[:3])
    bits = dict(start)
    for _, _, b, u, cost in steps:
        if spent + cost > budget * (1 + 1e-12):
            break
        bits[u], spent = b, spent + cost
    return bits


def layer_groups(in_features: int, group_choices: list[int]) -> list[int]:
    """The group sizes of ``group_choices`` a layer with ``in_features`` inputs may get: those that divide it (a partial
    last group costs a whole group's scale and zero, and compressed-tensors refuses it), or all of them if none does."""
    whole = [g for g in group_choices if in_features % g == 0]
    return whole or list(group_choices)


def allocate_layer_formats(errors: dict[str, dict[tuple[int, int], float]], shapes: dict[str, tuple[int, int]],
                           groups: list[list[str]], avg_bits: float, scale_bits: int = 16
                           ) -> dict[str, tuple[int, int]]:
    """Per-layer formats (bits, group size) under a budget of ``avg_bits`` stored bits per weight (codes, scales and
    zeros: `stored_bits`) over the layers of ``shapes``. ``errors[name][(bits, group)]``: the layer's estimated loss
    increase in that format (the formats a layer may get are the keys of its entry); ``groups``: layers that must
    share one format (those vLLM fuses: q/k/v, gate/up; they read one input, so they have the same formats); a
    layer in no group is its own. Raises `ConfigError` naming the feasible range when ``avg_bits`` is outside it."""
    if not shapes:
        return {}
    grouped = {n for g in groups for n in g}
    unknown = sorted(grouped - set(shapes))
    if unknown:
        raise ConfigError(f"bit groups name layers that are not targets: {unknown[:3]}")
    units = [list(g) for g in groups] + [[n] for n in shapes if n not in grouped]
    weights = sum(o * i for o, i in shapes.values())
    cost = {n: {f: stored_bits(*shapes[n], f[0], f[1], scale_bits) for f in errors[n]} for n in shapes}
    key = {u[0]: u for u in units}
    formats = {k: sorted(set.intersection(*(set(errors[n]) for n in u))) for k, u in key.items()}
    empty = [k for k, f in formats.items() if not f]
    if empty:
        raise ConfigError(f"layers that must share a format have no format in common: {key[empty[0]]}")
    unit_errors = {k: {f: sum(errors[n][f] for n in u) for f in formats[k]} for k, u in key.items()}
    unit_costs = {k: {f: sum(cost[n][f] for n in u) for f in formats[k]} for k, u in key.items()}
    low = sum(min(c.values()) for c in unit_costs.values()) / weights
    high = sum(max(c.values()) for c in unit_costs.values()) / weights
    if not low <= avg_bits * (1 + 1e-12):
        bits = sorted({f[0] for f in formats[next(iter(formats))]})
        group_sizes = sorted({f[1] for fs in formats.values() for f in fs})
        raise ConfigError(f"avg_bits {avg_bits:g} cannot be met with bit_choices {bits} and group sizes "
                          f"{group_sizes}: the targeted layers store at least {low:.4f} bits per weight (every layer "
                          f"in its cheapest format, scales and zeros included); feasible range is "
                          f"[{low:.4f}, {high:.4f}]")
    chosen = allocate_bits(unit_errors, unit_costs, avg_bits * weights)
    return {n: chosen[k] for k, u in key.items() for n in u}

