"""KV-cache compression on the transformers 5 Cache API, one file per method:

* ``quant``  (quant.py): KIVI — keys per channel, values per token, packed 2/3/4/8 bits, full-precision recent window;
  widths per layer from one ``avg_bits`` budget by measured sensitivity (allocation.py); ``gear`` adds a low-rank
  approximation of the quantization residual and exact outliers;
* ``lowrank`` (lowrank.py): calibrated PCA projections of keys and values per layer (rank budget), latents cached;
* ``xkv`` (xkv.py): cross-layer SVD of the prefill, calibration-free;
* ``snapkv`` (eviction.py): SnapKV / PyramidKV eviction from the prefill's last-window attention.

``make_cache(model, "quant4")`` builds a cache for ``model.generate(..., past_key_values=cache)``;
``CompressionConfig(kv="snapkv:0.25")`` records the choice in a checkpoint, whose ``generate`` then uses it by default.
"""

from .base import CompressedKVCache, KVCacheLayer, bytes_per_token, cache_nbytes
from .eviction import EvictionKVCache, SnapKVCache
from .hook import default_cache_spec, install_default_cache, make_cache
from .lowrank import KVProjections, LowRankKVCache, calibrate_projections
from .quant import GearKVCache, QuantizedKVCache
from .registry import available_kv_methods, parse_kv_spec
from .xkv import XKVCache

__all__ = [
    "CompressedKVCache", "KVCacheLayer", "QuantizedKVCache", "GearKVCache", "LowRankKVCache", "KVProjections",
    "XKVCache", "EvictionKVCache", "SnapKVCache", "make_cache", "install_default_cache", "default_cache_spec",
    "parse_kv_spec", "available_kv_methods", "calibrate_projections", "cache_nbytes", "bytes_per_token",
]
