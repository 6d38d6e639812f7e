"""Expert pruning (``expert_prune``): drop the experts of each mixture-of-experts block that matter least to its
output, before any weight method.

Importance of expert e in a block (output-space, as HEAPr / MC-SMoE measure it): Σ_t w_t,e · ‖f_e(x_t)‖ over the
calibration tokens t the router sends to e, with w_t,e the routing weight and f_e the expert's output — the share of
the block's output the expert carries. In every block the ``round(fraction · E)`` least important experts are
removed: their slices of the fused expert weights (and biases) and their router rows (and router biases) go, and
the experts' count drops from E to E' in the block's modules and in the model config, so that the model is a plain
model of its own class with E' experts: ``save_pretrained`` / ``from_pretrained`` need nothing else. Every block
loses the same number of experts (a config holds one expert count).

``expert_bits`` with a width 0 (``expert_bits=[0, 3, 4]``: `hf_compress.allocation.allocate_expert_bits`) removes
experts through the same `remove_experts`, the removed experts chosen by one budgeted allocation on `expert_costs`
(the importance above is the cost of removing an expert; the output error of its rounded weights the cost of a
width).

Removing a router row is masking that expert's logit to -inf: softmax routers renormalise over the experts left
(Mixtral, Qwen3-MoE, OLMoE, gpt-oss, ...), and the top-k is taken among them, so the pruned model never routes to
a dropped expert. Routers that choose groups of experts first (DeepSeek-V3 with ``n_group`` > 1) are refused: the
groups would no longer have equal sizes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModuleError
from ..modules.experts import WEIGHT_NAMES, _offload_hook, is_fused_experts

logger = logging.getLogger(__name__)

#: config attributes that hold the number of routed experts (one per architecture family)
COUNT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts")


def _native_expert(experts: nn.Module, e: int, x: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    """Expert ``e`` of a fused transformers experts module on the rows ``x``; ``weights`` ({name: tensor in the
    fused layout of one expert}) replace that expert's weights."""
    def linear(name, h):
        w = (weights or {}).get(name)
        w = getattr(experts, name)[e] if w is None else w.to(h.dtype)
        bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
        return nn.functional.linear(h, w.T if experts.is_transposed else w, None if bias is None else bias[e])

    h = experts._apply_gate(linear("gate_up_proj", x)) if experts.has_gate else experts.act_fn(linear("up_proj", x))
    y = linear("down_proj", h)
    return experts.post_expert_norm(y) if getattr(experts, "has_post_expert_norm", False) else y


def moe_blocks(model: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Module]]:
    """name of each MoE block -> (block, its experts module's child name, its router): the router is the child
    whose 2-D ``weight`` has one row per expert."""
    found = {}
    for name, block in model.named_modules():
        for child_name, child in block.named_children():
            if not is_fused_experts(child):
                continue
            routers = [c for c in block.children() if c is not child and isinstance(getattr(c, "weight", None),
                       torch.Tensor) and c.weight.dim() == 2 and c.weight.shape[0] == child.num_experts]
            if len(routers) != 1:
                raise UnsupportedModuleError(f"expert_prune: {name} holds {len(routers)} modules with one weight row "
                                             f"per expert; the router must be exactly one of them")
            found[name] = (block, child_name, routers[0])
    return found


def expert_importance(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per MoE block: each expert's Σ_t w_t,e · ‖f_e(x_t)‖ over the tokens routed to it (fp64), from one forward of
    ``model`` over ``batches``."""
    return {name: torch.tensor([c[0] for c in costs], dtype=torch.float64)
            for name, costs in expert_costs(model, batches).items()}


def _rounded(experts: nn.Module, e: int, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s weights rounded to ``bits`` (RTN, ``group_size`` along each layer's inputs, fp16 scales), in the
    fused layout."""
    from ..methods.rtn import RTN

    out = {}
    for name in WEIGHT_NAMES:
        w = getattr(experts, name, None)
        if not isinstance(w, torch.Tensor):
            continue
        w = w.detach()[e].float()
        w = w.T if experts.is_transposed else w  # [out, in]
        q = RTN().quantize(w.contiguous(), bits, group_size, scale_dtype=torch.float16).dequantize(w.shape[1])
        out[name] = q.T if experts.is_transposed else q
    return out


def expert_costs(model: nn.Module, batches, widths=(), group_size: int = 128, max_tokens: int = 256
                 ) -> dict[str, list[dict[int, float]]]:
    """Per MoE block and expert e: the output error of the block's routed sum when e is removed (key 0) or its
    weights are rounded to b bits (key b, for b in ``widths``), from one forward of the dense ``model`` over
    ``batches``: Σ_t w_t,e · ‖ŷ_e(x_t) − f_e(x_t)‖ over the tokens t routed to e (w: routing weight), with ŷ_e = 0
    (removed; the error is then the importance Σ_t w_t,e · ‖f_e(x_t)‖) or e with all its layers rounded to b bits
    (RTN at ``group_size``). Removal is costed on every routed token; the widths on at most ``max_tokens`` routed
    tokens per expert and batch (an even subsample, scaled up to the count). An expert no token reaches costs 0
    everywhere. fp64 sums."""
    blocks = moe_blocks(model)
    costs: dict[str, list[dict[int, float]]] = {}

    def hook(name):
        def measure(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            per = costs.setdefault(name, [{b: 0.0 for b in (0, *widths)} for _ in range(module.num_experts)])
            for e in range(module.num_experts):
                tok, pos = torch.where(index == e)
                if not tok.numel():
                    continue
                w = weights[tok, pos].double()
                y = _native_expert(module, e, x[tok])
                per[e][0] += float((w * y.double().norm(dim=-1)).sum())
                if not widths:
                    continue
                keep = torch.arange(tok.numel(), device=tok.device)
                if tok.numel() > max_tokens:
                    keep = torch.linspace(0, tok.numel() - 1, max_tokens, device=tok.device).round().long()
                scale = tok.numel() / keep.numel()  # the subsample stands for all routed tokens
                for b in widths:  # rounded again for each batch: nothing the size of the experts is kept
                    yb = _native_expert(module, e, x[tok[keep]], _rounded(module, e, b, group_size))
                    diff = (yb.double() - y[keep].double()).norm(dim=-1)
                    per[e][b] += scale * float((w[keep] * diff).sum())
        return measure

    handles = [getattr(block, child).register_forward_pre_hook(hook(name), with_kwargs=True)
               for name, (block, child, _) in blocks.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for name, (block, child, _) in blocks.items():  # a block no batch reached
        costs.setdefault(name, [{b: 0.0 for b in (0, *widths)} for _ in range(getattr(block, child).num_experts)])
    return costs


def prunable(model: nn.Module, what: str = "expert_prune") -> tuple[dict, int, int]:
    """The MoE blocks of ``model`` (`moe_blocks`), their expert count E and the experts each token is routed to
    (top-k): what removing experts needs. Refuses (naming ``what``) a model without MoE blocks, blocks with unequal
    expert counts, routers that choose groups of experts first and offloaded experts."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if (getattr(config, "n_group", None) or 1) > 1:
        raise UnsupportedModuleError(f"{what}: {config.model_type} routes to groups of experts first "
                                     f"(n_group={config.n_group}); removing experts would leave unequal groups")
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError(f"{what}: the model has no mixture-of-experts block")
    counts = {getattr(block, child).num_experts for block, child, _ in blocks.values()}
    if len(counts) != 1:
        raise UnsupportedModuleError(f"{what}: the blocks hold different numbers of experts {sorted(counts)}")
    for name, (block, child, router) in blocks.items():
        for module in (getattr(block, child), router):
            if any(p.device.type == "meta" for p in module.parameters()) or _offload_hook(module) is not None:
                raise UnsupportedModuleError(
                    f"{what}: the experts of {name} are offloaded (accelerate device_map with 'disk' or meta "
                    f"weights); removing experts rewrites their fused tensors, which an offload store would keep "
                    f"whole: load the model in RAM for {what}, or use expert_bits without 0")
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None) or 1
    return blocks, counts.pop(), top_k


def prune_experts(model: nn.Module, fraction: float, batches) -> dict:
    """Remove the ``round(fraction · E)`` least important experts of every MoE block of ``model`` (in place; see the
    module docstring). Returns {"kept": {block: [original indices kept]}, "dropped": {block: [...]}, "parameters":
    parameters removed, "experts": (E, E')}."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"expert_prune is the fraction of each block's experts to remove: it must lie strictly "
                          f"between 0 and 1, got {fraction}")
    blocks, n, top_k = prunable(model)
    drop = round(fraction * n)
    if drop == 0 or n - drop < top_k:
        raise ConfigError(f"expert_prune={fraction} of {n} experts removes {drop}: it must remove at least one and "
                          f"keep at least num_experts_per_tok={top_k}")
    scores = expert_importance(model, batches)
    dropped = {}
    for name in blocks:
        score = scores.get(name, torch.zeros(n, dtype=torch.float64))
        order = sorted(range(n), key=lambda e: (float(score[e]), e))  # ties: the lower index goes first
        dropped[name] = sorted(order[:drop])
    report = remove_experts(model, dropped)
    logger.warning("expert_prune=%s: removed %d of %d experts in each of %d blocks (%s parameters; by routing "
                   "weight x output norm on the calibration tokens); the model now has %d experts per block",
                   fraction, drop, n, len(blocks), f"{report['parameters']:,}", n - drop)
    return report


def remove_experts(model: nn.Module, dropped: dict[str, list[int]]) -> dict:
    """Remove the experts ``dropped`` ({MoE block: [expert indices]}, the same number in every block) from ``model``
    in place: their slices of the fused weights and biases, their router rows, and the expert count in the blocks'
    modules and the model config. Returns {"kept": {block: [original indices kept]}, "dropped": {block: [...]},
    "parameters": parameters removed, "experts": (E, E')}."""
    blocks, n, _ = prunable(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    drops = {len(set(dropped.get(name, ()))) for name in blocks}
    if len(drops) != 1:
        raise UnsupportedModuleError(f"removing experts: every block must lose the same number (a config holds one "
                                     f"expert count), got {sorted(drops)}")
    drop = drops.pop()
    report = {"kept": {}, "dropped": {}, "parameters": 0, "experts": (n, n - drop)}
    if drop == 0:
        return report
    changed = [a for a in COUNT_NAMES if getattr(config, a, None) == n]
    if not changed:  # checked before anything changes
        raise UnsupportedModuleError(f"removing experts: none of {COUNT_NAMES} of the {config.model_type} config "
                                     f"holds the expert count {n}")
    for name, (block, child, router) in blocks.items():
        experts = getattr(block, child)
        gone = sorted(set(dropped[name]))
        kept = [e for e in range(n) if e not in gone]
        report["kept"][name], report["dropped"][name] = kept, gone
        idx = torch.tensor(kept)
        before = sum(p.numel() for p in experts.parameters()) + sum(p.numel() for p in router.parameters())
        with torch.no_grad():
            for wname in WEIGHT_NAMES + tuple(f"{w}_bias" for w in WEIGHT_NAMES):
                w = getattr(experts, wname, None)
                if isinstance(w, torch.Tensor):
                    setattr(experts, wname, nn.Parameter(w.data[idx].clone(), requires_grad=w.requires_grad))
            for pname in ("weight", "bias", "e_score_correction_bias"):
                p = getattr(router, pname, None)
                if isinstance(p, torch.Tensor) and p.shape[0] == n:
                    if isinstance(p, nn.Parameter):
                        setattr(router, pname, nn.Parameter(p.data[idx].clone(), requires_grad=p.requires_grad))
                    else:
                        router.register_buffer(pname, p[idx].clone())
        for module in (block, experts, router):
            for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
                if getattr(module, attr, None) == n:
                    setattr(module, attr, n - drop)
        if hasattr(router, "out_features") and router.out_features == n:
            router.out_features = n - drop
        report["parameters"] += before - (sum(p.numel() for p in experts.parameters())
                                          + sum(p.numel() for p in router.parameters()))
    for a in changed:
        setattr(config, a, n - drop)
    return report


__all__ = ["COUNT_NAMES", "expert_costs", "expert_importance", "moe_blocks", "prunable", "prune_experts",
           "remove_experts"]
