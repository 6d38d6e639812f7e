"""xKV: cross-layer SVD of the prefill's keys and values (calibration-free).

Adjacent compressed layers form groups of ``group`` layers. At prefill each layer keeps its K/V until the last
layer of its group has run; then, per sequence and separately for keys and values, the group's caches are
concatenated along features, X = [X_1 | ... | X_g] [T, g·D] (D = kv_heads x head_dim), and truncated to rank r by
SVD (eigenvectors of XᵀX): X ≈ A Vᵀ with A = X V [T, r] *shared by the group's layers* and V_l [D, r] per layer.
The rank comes from ``keep``, the fraction of the group's prefill floats kept: r = keep·T·g·D / (T + g·D). The
last ``window`` prefill tokens and every token generated later stay in full precision. Reads reconstruct
X_l = A V_lᵀ.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import CompressedKVCache, KVCacheLayer
from .registry import KV_METHODS, KVMethod, check_fraction, check_int


class XKVGroup:
    """State shared by the layers of one group: the token factors A of keys and values."""

    def __init__(self, members: list[int], keep: float, rank: int | None = None):
        self.members, self.keep, self.rank = members, keep, rank
        self.layers: dict[int, "XKVLayer"] = {}
        self.ak = self.av = None  # [B, T, r]

    def ready(self) -> bool:
        return all(self.layers[i].pending is not None for i in self.members)

    @torch.no_grad()
    def compress(self) -> None:
        for kind in ("k", "v"):
            xs = [self.layers[i].pending[0 if kind == "k" else 1] for i in self.members]  # [B, H, T, d] each
            b, h, t, d = xs[0].shape
            flat = torch.cat([x.transpose(1, 2).reshape(b, t, h * d) for x in xs], dim=-1).float()  # [B, T, gD]
            width = flat.shape[-1]
            if self.rank is not None:
                r = min(self.rank, t, width)
            else:
                r = max(1, min(int(round(self.keep * t * width / (t + width))), t, width))
            gram = flat.transpose(1, 2).double() @ flat.double()
            _, vecs = torch.linalg.eigh(gram)
            basis = vecs[..., -r:].flip(-1).float()  # [B, gD, r]
            a = (flat @ basis).to(xs[0].dtype)
            setattr(self, "a" + kind, a)
            for j, i in enumerate(self.members):
                self.layers[i].set_basis(kind, basis[:, j * h * d:(j + 1) * h * d, :].to(xs[0].dtype))
        for i in self.members:
            self.layers[i].pending = None

    def tensors(self):
        return {n: getattr(self, n) for n in ("ak", "av") if getattr(self, n) is not None}

    def index_batch(self, fn):
        for n, t in self.tensors().items():
            setattr(self, n, fn(t))


class XKVLayer(KVCacheLayer):
    def __init__(self, layer_idx, sliding_window=None, *, group: XKVGroup, heads: int, head_dim: int, window=32):
        super().__init__(layer_idx, sliding_window)
        self.group, self.heads, self.head_dim, self.window = group, heads, head_dim, window
        group.layers[layer_idx] = self
        self._reset()

    def _reset(self):
        self.bk = self.bv = self.wk = self.wv = None
        self.pending = None
        self.n_latent = 0
        if self.group.members and self.layer_idx == self.group.members[0]:
            self.group.ak = self.group.av = None

    def tensors(self):
        return {n: getattr(self, n) for n in ("bk", "bv", "wk", "wv") if getattr(self, n) is not None}

    def shared_tensors(self):
        return self.group.tensors() if self.layer_idx == self.group.members[0] else {}

    def _index_batch(self, fn):
        super()._index_batch(fn)
        if self.layer_idx == self.group.members[0]:
            self.group.index_batch(fn)

    def nbytes(self):
        return super().nbytes() + sum(t.nbytes for t in self.shared_tensors().values())

    def stored_length(self):
        return self.n_latent + (0 if self.wk is None else self.wk.shape[-2])

    def set_basis(self, kind, basis):
        setattr(self, "b" + kind, basis)

    def _decode(self, kind):
        a, basis = getattr(self.group, "a" + kind), getattr(self, "b" + kind)
        b, t, _ = a.shape
        flat = a.float() @ basis.float().transpose(1, 2)
        return flat.view(b, t, self.heads, self.head_dim).transpose(1, 2).to(self.dtype)

    def _update(self, key_states, value_states, prefill):
        if prefill and key_states.shape[-2] > self.window + 1:
            n = key_states.shape[-2] - self.window
            self.pending = (key_states[..., :n, :], value_states[..., :n, :])
            self.wk, self.wv = key_states[..., n:, :], value_states[..., n:, :]
            self.n_latent = n
            if self.group.ready():
                self.group.compress()
            return key_states, value_states
        self.wk = key_states if self.wk is None else torch.cat([self.wk, key_states], dim=-2)
        self.wv = value_states if self.wv is None else torch.cat([self.wv, value_states], dim=-2)
        if self.pending is not None:
            raise ConfigError(f"xKV layer {self.layer_idx}: decoding before its group {self.group.members} finished "
                              "the prefill (layers must run in order)")
        if self.n_latent:
            return (torch.cat([self._decode("k"), self.wk], dim=-2), torch.cat([self._decode("v"), self.wv], dim=-2))
        return self.wk, self.wv


class XKVCache(CompressedKVCache):
    method = "xkv"

    def __init__(self, config, keep: float = 0.25, group: int = 4, window: int = 32, rank: int | None = None):
        validate_xkv({"method": "xkv", "keep": keep, "group": group, "window": window, "rank": rank})
        from .base import compressible_layers, head_geometry

        heads, head_dim = head_geometry(config.get_text_config(decoder=True))
        layers = compressible_layers(config)
        groups = {}
        for start in range(0, len(layers), group):
            g = XKVGroup(layers[start:start + group], keep, rank)
            if rank is not None and rank > len(g.members) * heads * head_dim:
                raise ConfigError(f"xKV rank {rank} is larger than the group's width: {len(g.members)} layers x "
                                  f"{heads} kv heads x {head_dim} head_dim = {len(g.members) * heads * head_dim}")
            for i in g.members:
                groups[i] = g
        super().__init__(config, lambda i, sw: XKVLayer(i, sw, group=groups[i], heads=heads, head_dim=head_dim,
                                                        window=window))


def validate_xkv(spec):
    check_fraction(spec)
    check_int(spec, "group", 1)
    check_int(spec, "window", 0)
    if spec.get("rank") is not None:
        check_int(spec, "rank", 1)


@KV_METHODS.register("xkv")
class XKVMethod(KVMethod):
    defaults = {"keep": 0.25, "group": 4, "window": 32, "rank": None}

    @classmethod
    def validate(cls, spec):
        validate_xkv(spec)

    @classmethod
    def make_cache(cls, model, spec):
        return XKVCache(model.config, spec["keep"], spec["group"], spec["window"], spec.get("rank"))

    @classmethod
    def check_model(cls, model, spec):
        cls.make_cache(model, spec)  # raises for a rank the model's heads cannot hold
