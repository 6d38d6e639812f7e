"""Shared pieces of the compressed KV caches: the per-layer base class, the `Cache` subclass that lays out one
layer per decoder layer (compressed where the attention layout allows it, transformers' own layer elsewhere), and
byte accounting.

Invariants every compressed layer keeps (transformers 5 reads them):

* ``get_seq_length()`` is the *logical* number of tokens seen (positions are computed from it);
* ``get_mask_sizes(q)`` returns ``(stored + q, logical - stored)``: the mask covers exactly the K/V the layer
  returns, the stored tokens mapped to the positions just before the new ones;
* ``update`` returns K/V of shape [batch, kv_heads, stored + q, head_dim] in the dtype it was given.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..errors import ConfigError

logger = logging.getLogger(__name__)

COMPRESSIBLE = ("full_attention",)
WINDOWED = ("sliding_attention", "chunked_attention")


class KVCacheLayer(CacheLayerMixin):
    """Base of hf-compress cache layers. Subclasses implement `_update`, `stored_length`, `tensors` (everything
    stored, for byte counting and batch operations) and may override `_index_batch`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0

    def __repr__(self):
        return f"{type(self).__name__}(layer={self.layer_idx}, tokens={self.cumulative_length})"

    # ---- transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.sliding_window is not None and self.cumulative_length + q > self.sliding_window:
            raise ConfigError(
                f"Layer {self.layer_idx} is a sliding-window layer (window {self.sliding_window}); hf-compress "
                f"compresses it as full attention only while the sequence fits in the window, and "
                f"{self.cumulative_length + q} tokens do not. Use a shorter context or the uncompressed cache.")
        prefill = self.cumulative_length == 0
        self.cumulative_length += q
        return self._update(key_states, value_states, prefill)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cumulative_length = 0
        self.is_initialized = False
        self._reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be cropped (assisted / speculative decoding and "
                                  "DoLa are not supported with hf-compress KV caches)")

    def offload(self):  # nothing to move: the compressed state stays where it is
        return None

    def prefetch(self):
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized and self.cumulative_length:
            self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self.cumulative_length:
            self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self.cumulative_length:
            self._index_batch(lambda t: t[indices])

    # ---- to implement
    def _update(self, key_states, value_states, prefill: bool):
        raise NotImplementedError

    def stored_length(self) -> int:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer stores (batch-first), by name."""
        raise NotImplementedError

    def _reset(self) -> None:
        for name in list(self.tensors()):
            setattr(self, name, None)

    def _index_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name, t in self.tensors().items():
            setattr(self, name, fn(t))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())


def empty_like_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, 0, D] in x's dtype/device."""
    return x[..., :0, :]


def check_attention_layout(config) -> None:
    """Refuse layouts whose K/V the caches do not understand."""
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        raise ConfigError(f"{getattr(config, 'model_type', '?')} uses multi-head latent attention (MLA); hf-compress KV "
                          "caches support standard multi-head / grouped-query attention only.")


def head_geometry(config) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of a decoder config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(heads), int(head_dim)


def layer_plan(decoder_config) -> list[tuple[str, dict, bool, int | None]]:
    """Per decoder layer: (layer type, transformers layer kwargs, compressed?, sliding window guarded or None)."""
    layer_types, per_layer_kwargs = get_layer_types_and_kwargs(decoder_config)
    max_pos = getattr(decoder_config, "max_position_embeddings", None)
    plan = []
    for kind, kw in zip(layer_types, per_layer_kwargs):
        if kind in COMPRESSIBLE:
            plan.append((kind, kw, True, None))
        elif kind in WINDOWED and max_pos is not None and kw.get("sliding_window", 0) >= max_pos:
            plan.append((kind, kw, True, kw["sliding_window"]))
        else:
            plan.append((kind, kw, False, None))
    return plan


def compressible_layers(config) -> list[int]:
    decoder = config.get_text_config(decoder=True)
    check_attention_layout(decoder)
    return [i for i, (_, _, compress, _) in enumerate(layer_plan(decoder)) if compress]


class CompressedKVCache(Cache):
    """A `Cache` with one hf-compress layer per compressible decoder layer.

    Full-attention layers are compressed. A sliding-window / chunked layer whose window is at least the model's
    ``max_position_embeddings`` never slides within the supported context: it is compressed too, and raises if a
    sequence outgrows the window. Other layers (smaller windows, linear attention, convolution, shared-KV dummies)
    get transformers' own uncompressed layer — they pass through, listed in ``passthrough``.
    """

    method = "base"

    def __init__(self, config, make_layer: Callable[[int, int | None], KVCacheLayer]):
        decoder = config.get_text_config(decoder=True)
        check_attention_layout(decoder)
        self.config = decoder
        self.kv_heads, self.head_dim = head_geometry(decoder)
        layer_types = []
        layers, self.passthrough = [], []
        for i, (kind, kw, compress, window) in enumerate(layer_plan(decoder)):
            layer_types.append(kind)
            if compress:
                layers.append(make_layer(i, window))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))
                self.passthrough.append(i)
        if self.passthrough:
            logger.warning("hf-compress %s cache: layers %s (%s) are not full attention and stay uncompressed.",
                           self.method, self.passthrough, sorted({layer_types[i] for i in self.passthrough}))
        if len(self.passthrough) == len(layers):
            logger.warning("hf-compress %s cache: no layer of this model can be compressed.", self.method)
        super().__init__(layers=layers)

    @property
    def compressed_layers(self) -> list[KVCacheLayer]:
        return [layer for layer in self.layers if isinstance(layer, KVCacheLayer)]

    def nbytes(self) -> int:
        return cache_nbytes(self)


def _tensor_bytes(obj, seen: set, depth: int = 0) -> int:
    if depth > 6 or obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n), seen, depth + 1) for n in names)
        key = (obj.data_ptr(), obj.nbytes) if obj.device.type != "meta" else id(obj)
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(_tensor_bytes(v, seen, depth + 1) for k, v in vars(obj).items() if not k.startswith("__"))
    return 0


def cache_nbytes(cache: Cache) -> int:
    """Real bytes of the tensors a cache holds (compressed codes, scales, factors, windows; a quanto/HQQ layer's
    packed data and metadata) — not a formula. Shared tensors are counted once."""
    seen: set = set()
    total = 0
    for layer in cache.layers:
        if isinstance(layer, KVCacheLayer):
            for t in layer.tensors().values():
                total += _tensor_bytes(t, seen)
            total += sum(_tensor_bytes(t, seen) for t in getattr(layer, "shared_tensors", lambda: {})().values())
        else:
            total += _tensor_bytes({k: v for k, v in vars(layer).items()
                                    if k not in ("dtype", "device", "_pending_beam_idx")}, seen)
    return total


def bytes_per_token(cache: Cache) -> float:
    """Cache bytes per cached token and sequence (logical tokens x batch)."""
    tokens = cache.get_seq_length()
    batch = None
    for layer in cache.layers:
        for t in (layer.tensors().values() if isinstance(layer, KVCacheLayer) else (getattr(layer, "keys", None),)):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.numel():
                batch = t.shape[0]
                break
        if batch:
            break
    return cache_nbytes(cache) / max(tokens * (batch or 1), 1)
