"""Eviction cache: SnapKV / PyramidKV-style token selection at prefill.

At the prefill of each layer, the attention of the last ``window`` prompt queries over the whole prompt scores every
prompt token: summed over the window and averaged over the query heads of each KV head, smoothed by average pooling
over ``kernel`` positions. Each KV head keeps its ``budget`` best tokens (the window itself always), in position
order; tokens generated afterwards are all kept. The prefill's own attention uses the whole prompt.

The queries are observed through transformers' public ``AttentionInterface``: building an eviction cache switches
the model to ``hf_compress_eviction_<base>`` (base = its ``sdpa`` or ``eager`` implementation), an attention function
that receives the post-RoPE queries, the module and the keys the cache's ``update`` just returned, selects the kept
tokens, then calls the base implementation unchanged. Nothing depends on how the model names its call arguments: the
layer whose ``update`` returned those very key tensors is the one that scores them. For other caches the function is
a pass-through.

transformers 5 invariants: ``get_seq_length()`` stays the logical length (positions keep counting), and
``get_mask_sizes(q)`` = ``(stored + q, logical - stored)`` maps the kept tokens onto the positions just before the
new ones. With left padding the padded positions score -inf: they are evicted first, and any that must be kept
(budget larger than a row's real tokens) stay in front, where the shifted padding mask still hides them. Right
padding is refused. With ``schedule="pyramid"`` budgets shrink linearly from the first to the last layer (same
mean); the one mask is then built for the largest layer and each layer's attention gets its last columns.
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

from ..errors import ConfigError
from .base import CompressedKVCache, KVCacheLayer
from .registry import KV_METHODS, KVMethod, check_fraction, check_int

#: attention implementations the eviction attention can wrap (both build 4D masks the selection reads)
BASES = ("sdpa", "eager")
PREFIX = "hf_compress_eviction_"
#: the layer whose ``update`` ran last in this thread, with the key tensor it returned (claimed by the attention)
_last_update = threading.local()


class EvictionKVLayer(KVCacheLayer):
    def __init__(self, layer_idx, sliding_window=None, *, keep=0.25, window=32, kernel=7, budget_scale=1.0):
        super().__init__(layer_idx, sliding_window)
        self.keep, self.window, self.kernel, self.budget_scale = keep, window, kernel, budget_scale
        self._reset()

    def _reset(self):
        self.k = self.v = None
        self.pending = None  # the prompt's (keys, values) until `observe` has selected from them

    def tensors(self):
        return {n: getattr(self, n) for n in ("k", "v") if getattr(self, n) is not None}

    def stored_length(self):
        return 0 if self.k is None else self.k.shape[-2]

    def budget(self, length: int) -> int:
        b = int(round(self.keep * self.budget_scale * length))
        return min(length, max(b, min(self.window, length), 1))

    def _update(self, key_states, value_states, prefill):
        if self.pending is not None:
            raise ConfigError(
                f"Layer {self.layer_idx} of this eviction cache never saw its prefill's queries: the model does not "
                "run the hf-compress eviction attention. Build the cache with hf_compress.kv.make_cache(model, "
                "'snapkv:0.25') or SnapKVCache(model, ...) and do not change the model's attention implementation "
                "afterwards.")
        if self.k is not None:
            self.k = torch.cat([self.k, key_states], dim=-2)
            self.v = torch.cat([self.v, value_states], dim=-2)
            _last_update.value = (self, self.k)
            return self.k, self.v
        if self.budget(key_states.shape[-2]) >= key_states.shape[-2]:
            self.k, self.v = key_states, value_states
        else:  # keep the whole prompt until the attention hands over the window's queries (`observe`)
            self.pending = (key_states, value_states)
        _last_update.value = (self, key_states)
        return key_states, value_states  # the prefill attends to the whole prompt

    def observe(self, query, attention_mask, scaling):
        """Called by the eviction attention with this layer's post-RoPE queries [B, Hq, q, D] and the mask it got;
        selects the kept prompt tokens (prefill) and returns the mask this layer's stored keys need (decode)."""
        if self.pending is not None:
            keys, values = self.pending
            self.pending = None
            length = keys.shape[-2]
            w = min(self.window, query.shape[-2])
            valid = _valid_from_mask(attention_mask, length, keys.shape[0])
            idx = self._select(query[:, :, -w:].detach(), keys, valid, scaling, self.budget(length))
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            self.k, self.v = keys.gather(2, gather), values.gather(2, gather)
            return attention_mask
        need = self.k.shape[-2]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] != need:
            if attention_mask.shape[-1] < need:  # pyramid budgets: this layer keeps fewer tokens than the mask's layer
                raise ConfigError(f"mask of {attention_mask.shape[-1]} columns for layer {self.layer_idx} holding "
                                  f"{need} tokens")
            return attention_mask[..., -need:]
        return attention_mask

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


def _base_attention(module, base):
    if base == "sdpa":
        return _SDPA
    # "eager" is not in the interface: each modeling module defines the eager function the interface falls back to
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ConfigError(f"{type(module).__name__} has no eager_attention_forward in its modeling module; the eviction "
                          "cache cannot wrap its eager attention (use attn_implementation='sdpa').")
    return fn


def _eviction_attention(base):
    def attention(module, query, key, value, attention_mask, **kwargs):
        last = getattr(_last_update, "value", None)
        if last is not None and last[1] is key:  # the keys an eviction layer's update returned for this module
            _last_update.value = None
            scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
            attention_mask = last[0].observe(query, attention_mask, scaling)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


_SDPA = AttentionInterface()["sdpa"]  # resolved once, not at every attention call
for _base in BASES:
    AttentionInterface.register(f"{PREFIX}{_base}", _eviction_attention(_base))
    AttentionMaskInterface.register(f"{PREFIX}{_base}", AttentionMaskInterface()[_base])


def eviction_attention_name(model) -> str:
    """The eviction attention for ``model`` (``hf_compress_eviction_sdpa``/``_eager``), or a ConfigError."""
    current = model.config._attn_implementation
    if isinstance(current, str) and current.startswith(PREFIX):
        return current
    if current not in BASES:
        raise ConfigError(f"eviction caches read the prefill's queries from sdpa or eager attention; "
                          f"{type(model).__name__} uses {current!r}. Load it with attn_implementation='sdpa'.")
    return f"{PREFIX}{current}"


def install_attention(model) -> None:
    """Switch ``model`` to the eviction attention wrapping its current implementation (a pass-through for other
    caches); idempotent."""
    name = eviction_attention_name(model)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ConfigError(f"{type(model).__name__} does not dispatch attention through transformers' "
                          f"AttentionInterface (it refused {name!r}); the eviction cache cannot see its queries.")


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
        install_attention(model)
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
        eviction_attention_name(model)

