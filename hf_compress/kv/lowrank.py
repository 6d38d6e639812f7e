"""Low-rank projected KV cache (CSKV / MatryoshkaKV-style with PCA initialisation, no training).

Calibration runs the model on text and collects, per layer, the mean and covariance of the cached keys and values
(post-RoPE, all KV heads concatenated: D = kv_heads x head_dim features per token). The top principal directions
give a basis P [D, r] per layer and kind; ranks come from one budget, ``keep`` x D per layer and kind on average:
``alloc="uniform"`` gives every layer the same rank, ``alloc="energy"`` spends the budget where it removes the most
relative variance (greedy over all layers' normalised eigenvalues). The cache stores latents (x - mean) P [B, T, r]
and reconstructs x̂ = latents Pᵀ + mean on read; the last ``window`` tokens stay in full precision.

The projections are tensors of the model (`KVProjections`, submodule ``hf_compress_kv``), saved in safetensors with
the weights; their ranks are recorded in the config so loading can check every shape before reading weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import DynamicCache

from ..compat import cache_kwargs
from ..errors import ConfigError
from .base import CompressedKVCache, KVCacheLayer, compressible_layers, head_geometry
from .registry import KV_METHODS, KVMethod, check_fraction, check_int

logger = logging.getLogger(__name__)

ATTR = "hf_compress_kv"


class _LayerProjection(nn.Module):
    def __init__(self, width: int, rank_k: int, rank_v: int, device=None, dtype=torch.float32):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("k_basis", torch.zeros(width, rank_k, **kw))
        self.register_buffer("k_mean", torch.zeros(width, **kw))
        self.register_buffer("v_basis", torch.zeros(width, rank_v, **kw))
        self.register_buffer("v_mean", torch.zeros(width, **kw))


class KVProjections(nn.Module):
    """Per-layer PCA bases and means of keys and values: ``layers[str(i)].k_basis`` [D, r_k] etc."""

    def __init__(self, width: int, ranks_k: list[int | None], ranks_v: list[int | None], device=None,
                 dtype=torch.float32):
        super().__init__()
        self.width = width
        self.layers = nn.ModuleDict({
            str(i): _LayerProjection(width, rk, rv, device=device, dtype=dtype)
            for i, (rk, rv) in enumerate(zip(ranks_k, ranks_v)) if rk is not None})

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        return {f"layers.{i}.{n}": tuple(b.shape) for i, m in self.layers.items() for n, b in m.named_buffers()}

    def ranks(self) -> dict[str, list[int | None]]:
        n = 1 + max((int(i) for i in self.layers), default=-1)
        ks = [self.layers[str(i)].k_basis.shape[1] if str(i) in self.layers else None for i in range(n)]
        vs = [self.layers[str(i)].v_basis.shape[1] if str(i) in self.layers else None for i in range(n)]
        return {"k": ks, "v": vs}


class LowRankKVLayer(KVCacheLayer):
    def __init__(self, layer_idx, sliding_window=None, *, proj: _LayerProjection, heads: int, head_dim: int, window=32):
        super().__init__(layer_idx, sliding_window)
        self.proj, self.heads, self.head_dim, self.window = proj, heads, head_dim, window
        self._reset()

    def _reset(self):
        self.lk = self.lv = self.wk = self.wv = None

    def tensors(self):
        return {n: getattr(self, n) for n in ("lk", "lv", "wk", "wv") if getattr(self, n) is not None}

    def stored_length(self):
        return sum(t.shape[-2] for t in (self.lk, self.wk) if t is not None)

    def _encode(self, x, basis, mean):  # [B, H, n, d] -> [B, n, r]
        b, h, n, d = x.shape
        flat = x.transpose(1, 2).reshape(b, n, h * d).float()
        return ((flat - mean.float()) @ basis.float()).to(self.dtype)

    def _decode(self, lat, basis, mean):  # [B, n, r] -> [B, H, n, d]
        b, n, _ = lat.shape
        flat = lat.float() @ basis.float().T + mean.float()
        return flat.view(b, n, self.heads, self.head_dim).transpose(1, 2).to(self.dtype)

    def _update(self, key_states, value_states, prefill):
        self.wk = key_states if self.wk is None else torch.cat([self.wk, key_states], dim=-2)
        self.wv = value_states if self.wv is None else torch.cat([self.wv, value_states], dim=-2)
        p = self.proj
        if self.lk is not None:
            keys = torch.cat([self._decode(self.lk, p.k_basis, p.k_mean), self.wk], dim=-2)
            values = torch.cat([self._decode(self.lv, p.v_basis, p.v_mean), self.wv], dim=-2)
        else:
            keys, values = self.wk, self.wv
        extra = self.wk.shape[-2] - self.window
        if extra > 0:
            lk = self._encode(self.wk[..., :extra, :], p.k_basis, p.k_mean)
            lv = self._encode(self.wv[..., :extra, :], p.v_basis, p.v_mean)
            self.lk = lk if self.lk is None else torch.cat([self.lk, lk], dim=1)
            self.lv = lv if self.lv is None else torch.cat([self.lv, lv], dim=1)
            self.wk, self.wv = self.wk[..., extra:, :].contiguous(), self.wv[..., extra:, :].contiguous()
        return keys, values


class LowRankKVCache(CompressedKVCache):
    """``LowRankKVCache(model)`` uses the model's calibrated projections (``model.hf_compress_kv``), or pass
    ``projections=`` explicitly."""

    method = "lowrank"

    def __init__(self, model, window: int = 32, projections: KVProjections | None = None):
        projections = projections if projections is not None else getattr(model, ATTR, None)
        if projections is None:
            raise ConfigError("LowRankKVCache needs calibrated projections: compress the model with "
                              "{'kv': 'lowrank:0.5'} and calibration text, or pass projections=calibrate_projections(...)")
        config = model.config if hasattr(model, "config") else model
        decoder = config.get_text_config(decoder=True)
        heads, head_dim = head_geometry(decoder)
        if projections.width != heads * head_dim:
            raise ConfigError(f"KV projections are {projections.width} wide, but the model caches {heads} heads x "
                              f"{head_dim} = {heads * head_dim} features per token: they belong to another model.")

        def make(i, sw):
            if str(i) not in projections.layers:
                raise ConfigError(f"KV projections have no entry for layer {i} (calibrated for another model?)")
            return LowRankKVLayer(i, sw, proj=projections.layers[str(i)], heads=heads, head_dim=head_dim, window=window)

        super().__init__(config, make)
        extra = set(projections.layers) - {str(layer.layer_idx) for layer in self.compressed_layers}
        if extra:
            raise ConfigError(f"KV projections have layers {sorted(extra, key=int)} that this model does not compress.")


# ----------------------------------------------------------------------------------------------- calibration
@torch.no_grad()
def collect_statistics(model, windows: torch.Tensor, batch_size: int = 4):
    """Per layer: (count, sum_k, gram_k, sum_v, gram_v) of the cached keys/values (fp64), over token windows."""
    from ..calibration import device_of

    device = device_of(model)
    stats: dict[int, list] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(batch_size):
            cache = DynamicCache(config=model.config)
            model(input_ids=batch.to(device), **cache_kwargs(model, cache), use_cache=True)
            for i, layer in enumerate(cache.layers):
                if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                    continue
                entry = stats.setdefault(i, [0, 0.0, 0.0, 0.0, 0.0])
                for j, x in ((1, layer.keys), (3, layer.values)):
                    b, h, t, d = x.shape
                    flat = x.transpose(1, 2).reshape(b * t, h * d).double()
                    entry[j] = entry[j] + flat.sum(0)
                    entry[j + 1] = entry[j + 1] + flat.T @ flat
                entry[0] += layer.keys.shape[0] * layer.keys.shape[2]
    finally:
        model.train(was_training)
    return stats


def _pca(count, total, gram):
    mean = total / count
    cov = gram / count - torch.outer(mean, mean)
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    if not (torch.isfinite(vals).all() and torch.isfinite(vecs).all()):
        raise ConfigError("NaN/Inf in the KV calibration statistics")
    return mean, vals, vecs


def allocate_ranks(spectra: list[torch.Tensor], keep: float, alloc: str, rank: int | None = None) -> list[int]:
    """Ranks for each spectrum (eigenvalues, descending) under the budget keep x width each on average."""
    width = spectra[0].numel()
    if rank is not None:
        return [rank] * len(spectra)
    per = max(1, min(width, int(round(keep * width))))
    if alloc == "uniform":
        return [per] * len(spectra)
    budget = per * len(spectra)
    ranks = [1] * len(spectra)
    gains = []
    for s, vals in enumerate(spectra):
        total = float(vals.sum()) or 1.0
        gains += [(float(v) / total, s) for v in vals[1:].tolist()]
    gains.sort(key=lambda g: -g[0])
    for _, s in gains[: budget - len(spectra)]:
        ranks[s] += 1
    return ranks


def calibrate_projections(model, windows: torch.Tensor, keep: float = 0.5, alloc: str = "energy",
                          rank: int | None = None, batch_size: int = 4) -> KVProjections:
    """PCA projections of the model's cached keys and values over calibration token windows [n, seqlen]."""
    decoder = model.config.get_text_config(decoder=True)
    heads, head_dim = head_geometry(decoder)
    width = heads * head_dim
    if rank is not None and not 1 <= rank <= width:
        raise ConfigError(f"KV lowrank rank {rank} must lie in [1, {width}] (kv_heads x head_dim = {heads} x {head_dim})")
    layers = compressible_layers(model.config)
    stats = collect_statistics(model, windows, batch_size)
    missing = [i for i in layers if i not in stats]
    if missing:
        raise ConfigError(f"calibration produced no keys/values for layers {missing}")
    pcas = {(i, kind): _pca(stats[i][0], stats[i][1 if kind == "k" else 3], stats[i][2 if kind == "k" else 4])
            for i in layers for kind in ("k", "v")}
    keys = list(pcas)
    ranks = dict(zip(keys, allocate_ranks([pcas[k][1] for k in keys], keep, alloc, rank)))
    n = decoder.num_hidden_layers
    rk = [ranks.get((i, "k")) for i in range(n)]
    rv = [ranks.get((i, "v")) for i in range(n)]
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    proj = KVProjections(width, rk, rv, device=device)
    with torch.no_grad():
        for i in layers:
            m = proj.layers[str(i)]
            for kind in ("k", "v"):
                mean, _, vecs = pcas[(i, kind)]
                r = ranks[(i, kind)]
                getattr(m, f"{kind}_basis").copy_(vecs[:, :r].float())
                getattr(m, f"{kind}_mean").copy_(mean.float())
    return proj


def attach_projections(model, proj: KVProjections) -> None:
    if ATTR in model._modules:
        del model._modules[ATTR]
    model.add_module(ATTR, proj)


def validate_lowrank(spec):
    check_fraction(spec)
    check_int(spec, "window", 0)
    if spec.get("alloc") not in ("uniform", "energy"):
        raise ConfigError(f"KV lowrank alloc must be 'uniform' or 'energy', got {spec.get('alloc')!r}")
    if spec.get("rank") is not None:
        check_int(spec, "rank", 1)
    ranks = spec.get("ranks")
    if ranks is not None:
        if (not isinstance(ranks, dict) or set(ranks) != {"k", "v"} or len(ranks["k"]) != len(ranks["v"])
                or not all(r is None or (isinstance(r, int) and r >= 1) for r in ranks["k"] + ranks["v"])):
            raise ConfigError(f"KV lowrank ranks must be {{'k': [...], 'v': [...]}} of positive ints/None, got {ranks!r}")


@KV_METHODS.register("lowrank")
class LowRankKVMethod(KVMethod):
    defaults = {"keep": 0.5, "window": 32, "alloc": "energy", "rank": None}
    recorded = ("ranks",)  # filled by calibration
    stores_tensors = True

    @classmethod
    def needs_calibration(cls, spec):
        return True

    @classmethod
    def validate(cls, spec):
        validate_lowrank(spec)

    @classmethod
    def make_cache(cls, model, spec):
        return LowRankKVCache(model, window=spec["window"])

    @classmethod
    def check_model(cls, model, spec):
        heads, head_dim = head_geometry(model.config.get_text_config(decoder=True))
        if spec.get("rank") is not None and spec["rank"] > heads * head_dim:
            raise ConfigError(f"KV lowrank rank {spec['rank']} is larger than kv_heads x head_dim = "
                              f"{heads} x {head_dim} = {heads * head_dim}")

    @classmethod
    def calibrate(cls, model, spec, windows):
        cls.check_model(model, spec)
        proj = calibrate_projections(model, windows, spec["keep"], spec["alloc"], spec.get("rank"))
        attach_projections(model, proj)
        spec["ranks"] = proj.ranks()
        return spec

    @classmethod
    def projections_for(cls, model, spec, device="meta"):
        """An empty `KVProjections` shaped from the recorded ranks (filled by the weight loader)."""
        heads, head_dim = head_geometry(model.config.get_text_config(decoder=True))
        ranks = spec.get("ranks")
        if ranks is None:
            raise ConfigError("checkpoint's kv config (lowrank) records no ranks: it was never calibrated")
        return KVProjections(heads * head_dim, ranks["k"], ranks["v"], device=device)
