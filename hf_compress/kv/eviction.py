"""Eviction cache: SnapKV / PyramidKV-style token selection at prefill.

At the prefill of each layer, the attention of the last ``window`` prompt queries over the whole prompt is computed
(queries recomputed by a forward pre-hook on the attention module: ``q_proj`` of the window's hidden states, the
module's ``q_norm`` if any, and the model's own ``apply_rotary_pos_emb``); summed over the window and averaged over
the query heads of each KV head, smoothed by average pooling over ``kernel`` positions, it scores every prompt
token. Each KV head keeps its ``budget`` best tokens (the window itself always), in position order; tokens
generated afterwards are all kept. The prefill's own attention uses the whole prompt.

transformers 5 invariants: ``get_seq_length()`` stays the logical length (positions keep counting), and
``get_mask_sizes(q)`` = ``(stored + q, logical - stored)`` maps the kept tokens onto the positions just before the
new ones. With left padding the padded positions score -inf: they are evicted first, and any that must be kept
(budget larger than a row's real tokens) stay in front, where the shifted padding mask still hides them. Right
padding is refused. With ``schedule="pyramid"`` budgets shrink linearly from the first to the last layer (same
mean); the one mask is then built for the largest layer and each layer's attention gets its last columns.
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import CompressedKVCache, KVCacheLayer
from .registry import KV_METHODS, KVMethod, check_fraction, check_int


class EvictionKVLayer(KVCacheLayer):
    def __init__(self, layer_idx, sliding_window=None, *, keep=0.25, window=32, kernel=7, budget_scale=1.0):
        super().__init__(layer_idx, sliding_window)
        self.keep, self.window, self.kernel, self.budget_scale = keep, window, kernel, budget_scale
        self.pending = None  # (queries [B, Hq, w, D], valid [B, L] or None, scaling) set by the pre-hook
        self._reset()

    def _reset(self):
        self.k = self.v = None

    def tensors(self):
        return {n: getattr(self, n) for n in ("k", "v") if getattr(self, n) is not None}

    def stored_length(self):
        return 0 if self.k is None else self.k.shape[-2]

    def budget(self, length: int) -> int:
        b = int(round(self.keep * self.budget_scale * length))
        return min(length, max(b, min(self.window, length), 1))

    def _update(self, key_states, value_states, prefill):
        if self.k is not None:
            self.k = torch.cat([self.k, key_states], dim=-2)
            self.v = torch.cat([self.v, value_states], dim=-2)
            return self.k, self.v
        length = key_states.shape[-2]
        budget = self.budget(length)
        if budget >= length:
            self.k, self.v = key_states, value_states
            self.pending = None
            return key_states, value_states
        if self.pending is None:
            raise ConfigError(
                "This eviction cache scores tokens with the prefill's queries, captured by hooks on the model's "
                "attention modules: build it with hf_compress.kv.make_cache(model, 'snapkv:0.25') or "
                "SnapKVCache(model, ...), not from a config alone.")
        queries, valid, scaling = self.pending
        self.pending = None
        idx = self._select(queries, key_states, valid, scaling, budget)
        gather = idx.unsqueeze(-1).expand(-1, -1, -1, key_states.shape[-1])
        self.k = key_states.gather(2, gather)
        self.v = value_states.gather(2, gather)
        return key_states, value_states  # the prefill attends to the whole prompt

    @torch.no_grad()
    def _select(self, queries, keys, valid, scaling, budget):
        b, hkv, length, d = keys.shape
        hq, w = queries.shape[1], queries.shape[2]
        groups = hq // hkv
        logits = torch.einsum("bhwd,bhld->bhwl", queries.float().reshape(b, hkv, groups * w, d), keys.float()) * scaling
        logits = logits.view(b, hkv, groups, w, length)
        pos_q = torch.arange(length - w, length, device=keys.device)
        causal = torch.arange(length, device=keys.device)[None, :] <= pos_q[:, None]  # [w, L]
        mask = causal[None, None, None]
        if valid is not None:
            mask = mask & valid[:, None, None, None, :]
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        if valid is not None:  # padded query rows of the window contribute nothing
            weights = weights * valid[:, None, None, length - w:, None]
        scores = weights.sum(dim=3).mean(dim=2)  # [b, hkv, L]
        if self.kernel > 1:
            scores = F.avg_pool1d(scores.view(b * hkv, 1, length), self.kernel, stride=1,
                                  padding=self.kernel // 2, count_include_pad=False).view(b, hkv, length)
        scores[..., length - w:] = float("inf")  # the observation window is always kept
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        idx = scores.topk(budget, dim=-1).indices
        return idx.sort(dim=-1).values


def _apply_rope(module, q, cos, sin):
    fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        raise ConfigError(f"{type(module).__name__} has no apply_rotary_pos_emb in its modeling module; the eviction "
                          "cache cannot recompute its queries.")
    q_rot, _ = fn(q, q, cos, sin)
    return q_rot


def _valid_from_mask(mask, length, batch):
    """[B, L] bool of the prompt positions the last query may attend to (None: no padding)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ConfigError(f"eviction caches need a 4D tensor attention mask at prefill (sdpa or eager attention), "
                          f"got {type(mask).__name__}")
    row = mask[:, 0, -1, -length:]
    valid = row if row.dtype == torch.bool else row == 0
    valid = valid.expand(batch, -1)
    if valid.all():
        return None
    # left padding only: once a row becomes valid it must stay valid
    first = valid.float().cummax(dim=-1).values.bool()
    if (first & ~valid).any():
        raise ConfigError("eviction caches support left padding only (pad tokens must come first)")
    return valid


def _pre_hook(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, EvictionKVCache):
        return None
    idx = getattr(module, "layer_idx", None)
    if idx is None or idx >= len(cache.layers):
        return None
    layer = cache.layers[idx]
    if not isinstance(layer, EvictionKVLayer):
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    q_len = hidden.shape[1]
    if layer.k is None and q_len > 1:  # prefill: capture the observation window's queries
        pe = kwargs.get("position_embeddings")
        if pe is None or not hasattr(module, "q_proj"):
            raise ConfigError(f"{type(module).__name__} (layer {idx}) is not a q_proj + rotary attention; the eviction "
                              "cache cannot score its tokens.")
        w = min(layer.window, q_len)
        head_dim = getattr(module, "head_dim")
        q = module.q_proj(hidden[:, -w:])
        q = q.view(hidden.shape[0], w, -1, head_dim)
        if hasattr(module, "q_norm"):
            q = module.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = pe
        q = _apply_rope(module, q, cos[:, -w:], sin[:, -w:])
        valid = _valid_from_mask(mask, q_len, hidden.shape[0])
        layer.pending = (q.detach(), valid, getattr(module, "scaling", head_dim ** -0.5))
        return None
    if layer.k is not None and isinstance(mask, torch.Tensor) and mask.dim() == 4:
        need = layer.stored_length() + q_len
        if mask.shape[-1] != need:  # pyramid budgets: this layer keeps fewer tokens than the mask's layer
            if mask.shape[-1] < need:
                raise ConfigError(f"mask of {mask.shape[-1]} columns for layer {idx} holding {need} tokens")
            kwargs["attention_mask"] = mask[..., -need:]
            return args, kwargs
    elif layer.k is not None and mask is not None and not isinstance(mask, torch.Tensor) and len(
            {lay.stored_length() for lay in cache.compressed_layers}) > 1:
        raise ConfigError("pyramid eviction needs sdpa or eager attention (per-layer masks are sliced)")
    return None


def install_hooks(model) -> None:
    """Register the query-capturing pre-hooks on every attention module (once per model; inert for other caches)."""
    if getattr(model, "_hf_compress_eviction_hooks", None):
        return
    handles = []
    for name, module in model.named_modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            handles.append(module.register_forward_pre_hook(_pre_hook, with_kwargs=True))
    if not handles:
        raise ConfigError(f"{type(model).__name__} has no attention modules with q_proj/k_proj and a layer_idx; the "
                          "eviction cache cannot score tokens on it.")
    model._hf_compress_eviction_hooks = handles


def pyramid_scales(n: int, ratio: float = 3.0) -> list[float]:
    """Linearly decreasing budget multipliers with mean 1: the first layer gets ``ratio`` times the last one."""
    if n == 1:
        return [1.0]
    lo = 2.0 / (1.0 + ratio)
    hi = ratio * lo
    return [hi - (hi - lo) * i / (n - 1) for i in range(n)]


class EvictionKVCache(CompressedKVCache):
    """SnapKV (``schedule="uniform"``) or PyramidKV (``"pyramid"``) eviction at prefill; ``keep`` is the fraction
    of prompt tokens kept per layer and head (on average over layers for the pyramid)."""

    method = "snapkv"

    def __init__(self, model, keep=0.25, window=32, kernel=7, schedule="uniform"):
        spec = {"method": "snapkv", "keep": keep, "window": window, "kernel": kernel, "schedule": schedule}
        validate_eviction(spec)
        install_hooks(model)
        config = model.config
        n = config.get_text_config(decoder=True).num_hidden_layers
        scales = pyramid_scales(n) if schedule == "pyramid" else [1.0] * n
        super().__init__(config, lambda i, sw: EvictionKVLayer(i, sw, keep=keep, window=window, kernel=kernel,
                                                               budget_scale=scales[i]))
        self.schedule = schedule
        self._model = weakref.ref(model)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, EvictionKVLayer) and layer.k is not None:
            stored = max(lay.stored_length() for lay in self.compressed_layers)
            return stored + query_length, layer.cumulative_length - stored
        return super().get_mask_sizes(query_length, layer_idx)


SnapKVCache = EvictionKVCache


def validate_eviction(spec):
    check_fraction(spec)
    check_int(spec, "window", 1)
    check_int(spec, "kernel", 1)
    if spec["kernel"] % 2 == 0:
        raise ConfigError(f"KV snapkv kernel must be odd (centred pooling), got {spec['kernel']}")
    if spec.get("schedule") not in ("uniform", "pyramid"):
        raise ConfigError(f"KV snapkv schedule must be 'uniform' or 'pyramid', got {spec.get('schedule')!r}")


@KV_METHODS.register("snapkv")
class SnapKVMethod(KVMethod):
    defaults = {"keep": 0.25, "window": 32, "kernel": 7, "schedule": "uniform"}

    @classmethod
    def validate(cls, spec):
        validate_eviction(spec)

    @classmethod
    def make_cache(cls, model, spec):
        return EvictionKVCache(model, spec["keep"], spec["window"], spec["kernel"], spec["schedule"])

    @classmethod
    def check_model(cls, model, spec):
        install_hooks(model)

