"""Expert pruning (``expert_prune``): drop the experts of each mixture-of-experts block that matter least to its
output, before any weight method.

Importance of expert e in a block (output-space, as HEAPr / MC-SMoE measure it): Σ_t w_t,e · ‖f_e(x_t)‖ over the
calibration tokens t the router sends to e, with w_t,e the routing weight and f_e the expert's output — the share of
the block's output the expert carries. In every block the ``round(fraction · E)`` least important experts are
removed: their slices of the fused expert weights (and biases) and their router rows (and router biases) go, and
the experts' count drops from E to E' in the block's modules and in the model config, so that the model is a plain
model of its own class with E' experts: ``save_pretrained`` / ``from_pretrained`` need nothing else. Every block
loses the same number of experts (a config holds one expert count).

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
from ..modules.experts import WEIGHT_NAMES, is_fused_experts

logger = logging.getLogger(__name__)

#: config attributes that hold the number of routed experts (one per architecture family)
COUNT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts")


def _native_expert(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a fused transformers experts module on the rows ``x``."""
    def linear(name, h):
        w = getattr(experts, name)[e]
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
    blocks = moe_blocks(model)
    scores: dict[str, torch.Tensor] = {}

    def hook(name):
        def measure(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            s = scores.setdefault(name, torch.zeros(module.num_experts, dtype=torch.float64))
            for e in range(module.num_experts):
                tok, pos = torch.where(index == e)
                if tok.numel():
                    y = _native_expert(module, e, x[tok]).double().norm(dim=-1)
                    s[e] += float((weights[tok, pos].double() * y).sum())
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
    return scores


def prune_experts(model: nn.Module, fraction: float, batches) -> dict:
    """Remove the ``round(fraction · E)`` least important experts of every MoE block of ``model`` (in place; see the
    module docstring). Returns {"kept": {block: [original indices kept]}, "dropped": {block: [...]}, "parameters":
    parameters removed, "experts": (E, E')}."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"expert_prune is the fraction of each block's experts to remove: it must lie strictly "
                          f"between 0 and 1, got {fraction}")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if (getattr(config, "n_group", None) or 1) > 1:
        raise UnsupportedModuleError(f"expert_prune: {config.model_type} routes to groups of experts first "
                                     f"(n_group={config.n_group}); removing experts would leave unequal groups")
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError("expert_prune: the model has no mixture-of-experts block")
    counts = {getattr(block, child).num_experts for block, child, _ in blocks.values()}
    if len(counts) != 1:
        raise UnsupportedModuleError(f"expert_prune: the blocks hold different numbers of experts {sorted(counts)}")
    n = counts.pop()
    drop = round(fraction * n)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None) or 1
    if drop == 0 or n - drop < top_k:
        raise ConfigError(f"expert_prune={fraction} of {n} experts removes {drop}: it must remove at least one and "
                          f"keep at least num_experts_per_tok={top_k}")
    scores = expert_importance(model, batches)
    report = {"kept": {}, "dropped": {}, "parameters": 0, "experts": (n, n - drop)}
    for name, (block, child, router) in blocks.items():
        experts = getattr(block, child)
        score = scores.get(name, torch.zeros(n, dtype=torch.float64))
        order = sorted(range(n), key=lambda e: (float(score[e]), e))  # ties: the lower index goes first
        dropped = sorted(order[:drop])
        kept = [e for e in range(n) if e not in dropped]
        report["kept"][name], report["dropped"][name] = kept, dropped
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
    changed = [a for a in COUNT_NAMES if getattr(config, a, None) == n]
    if not changed:
        raise UnsupportedModuleError(f"expert_prune: none of {COUNT_NAMES} of the {config.model_type} config holds "
                                     f"the expert count {n}")
    for a in changed:
        setattr(config, a, n - drop)
    logger.warning("expert_prune=%s: removed %d of %d experts in each of %d blocks (%s parameters; by routing "
                   "weight x output norm on the calibration tokens); the model now has %d experts per block",
                   fraction, drop, n, len(blocks), f"{report['parameters']:,}", n - drop)
    return report


__all__ = ["COUNT_NAMES", "expert_importance", "moe_blocks", "prune_experts"]
