"""Quantized KV cache: KIVI (keys per channel, values per token, packed 2/4/8 bits, a full-precision window of the
most recent tokens), with the GEAR option (a low-rank approximation of the quantization residual and a sparse set
of outliers kept exactly).

Per layer the cache holds

* ``rk``/``rv`` [B, H, n, D]: the most recent ``residual <= n < residual + flush`` tokens, in the model's dtype
  (or ``window_dtype``, e.g. float16 for an fp32 model: returned upcast);
* packed codes of every older token (``kernels/kv.py`` layout): keys grouped over ``group_size`` tokens per channel,
  values over ``group_size`` channels per token (the largest power of two <= group_size dividing head_dim); keys
  take ``bits``, values ``value_bits`` (default: ``bits``; keys are the more sensitive half, so e.g. 4/2);
* with GEAR, per flushed segment: rank-``rank`` factors of the residual (fp16) and the top ``outliers`` fraction of
  entries by magnitude (int32 flat index + fp16 value).

When the window holds ``residual + flush`` tokens, its oldest tokens (a multiple of ``group_size``) are quantized;
the prefill is quantized at once, except its last ``residual``..``residual + group_size - 1`` tokens. Reads
dequantize everything (exactly the stored state, so beam reordering is exact: codes are index-selected, never
re-quantized).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..kernels.kv import KV_BITS, SCALE_DTYPES, codes_per_unit, kv_dequantize, kv_quantize, token_group
from .base import CompressedKVCache, KVCacheLayer
from .registry import KV_METHODS, check_fraction, check_int


class QuantizedKVLayer(KVCacheLayer):
    def __init__(self, layer_idx, sliding_window=None, *, bits=4, group_size=32, residual=128, flush=None,
                 rank=0, outliers=0.0, scale_dtype="float16", value_bits=None, window_dtype=None):
        super().__init__(layer_idx, sliding_window)
        self.bits, self.group = bits, group_size
        self.value_bits = value_bits or bits
        self.window_dtype = SCALE_DTYPES[window_dtype] if window_dtype else None
        self.residual = residual
        self.flush = flush or group_size
        self.rank, self.outliers = rank, outliers
        self.sdt = SCALE_DTYPES[scale_dtype]
        self._reset()

    def _reset(self):
        self.rk = self.rv = None
        self.kq = self.ks = self.km = None
        self.vq = self.vs = self.vm = None
        self.segments: list[dict[str, torch.Tensor]] = []  # GEAR extras, in token order
        self.n_quant = 0

    def tensors(self):
        out = {n: getattr(self, n) for n in ("rk", "rv", "kq", "ks", "km", "vq", "vs", "vm")
               if getattr(self, n) is not None}
        for i, seg in enumerate(self.segments):
            out.update({f"seg{i}.{k}": v for k, v in seg.items() if isinstance(v, torch.Tensor)})
        return out

    def _index_batch(self, fn):
        for n in ("rk", "rv", "kq", "ks", "km", "vq", "vs", "vm"):
            if getattr(self, n) is not None:
                setattr(self, n, fn(getattr(self, n)))
        self.segments = [{k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                         for s in self.segments]

    def stored_length(self):
        return self.n_quant + (0 if self.rk is None else self.rk.shape[-2])

    # ---- update / read
    def _update(self, key_states, value_states, prefill):
        if self.window_dtype is not None:
            key_states, value_states = key_states.to(self.window_dtype), value_states.to(self.window_dtype)
        if self.rk is None:
            self.rk, self.rv = key_states, value_states
        else:
            self.rk = torch.cat([self.rk, key_states], dim=-2)
            self.rv = torch.cat([self.rv, value_states], dim=-2)
        rk, rv = self.rk.to(self.dtype), self.rv.to(self.dtype)  # no copy unless window_dtype differs
        if self.n_quant:
            keys = torch.cat([self._read("k"), rk], dim=-2)
            values = torch.cat([self._read("v"), rv], dim=-2)
        else:
            keys, values = rk, rv
        n = self.rk.shape[-2]
        if n >= self.residual + (self.group if prefill else self.flush):
            self._quantize_oldest(((n - self.residual) // self.group) * self.group)
        return keys, values

    def _quantize_oldest(self, m: int) -> None:
        k, v = self.rk[..., :m, :], self.rv[..., :m, :]
        self.rk, self.rv = self.rk[..., m:, :].contiguous(), self.rv[..., m:, :].contiguous()
        seg = {}
        kparts = self._compress(k, "channel", seg, "k")
        vparts = self._compress(v, "token", seg, "v")
        if self.rank or self.outliers:
            seg["start"], seg["length"] = self.n_quant, m
            self.segments.append(seg)
        for names, parts in ((("kq", "ks", "km"), kparts), (("vq", "vs", "vm"), vparts)):
            for name, new in zip(names, parts):
                old = getattr(self, name)
                setattr(self, name, new if old is None else torch.cat([old, new], dim=-2))
        self.n_quant += m

    def _vgroup(self, d):
        return token_group(d, self.group, self.value_bits)

    def _bits(self, tag):
        return self.bits if tag == "k" else self.value_bits

    def _compress(self, x, axis, seg, tag):
        bits = self._bits(tag)
        group = self.group if axis == "channel" else self._vgroup(x.shape[-1])
        xf = x.float()
        mask = None
        if self.outliers:
            xf, mask = self._extract_outliers(xf, axis, group, seg, tag)
        parts = kv_quantize(xf, bits, group, axis, self.sdt)
        if self.rank:
            err = xf - kv_dequantize(*parts, bits, group, axis, torch.float32)
            if mask is not None:
                err = err.masked_fill(mask, 0.0)
            self._lowrank(err, seg, tag)
        return parts

    def _extract_outliers(self, x, axis, group, seg, tag):
        """Keep the top fraction of entries by |x| per (batch, head) exactly; replace them, for quantization, by the
        mean of the other entries of their quantization group so that they no longer stretch its range."""
        b, h, t, d = x.shape
        count = max(1, math.ceil(self.outliers * t * d))
        flat = x.reshape(b, h, t * d)
        idx = flat.abs().topk(count, dim=-1).indices
        seg[f"{tag}_idx"] = idx.to(torch.int32)
        seg[f"{tag}_val"] = flat.gather(-1, idx).to(torch.float16)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).view(b, h, t, d)
        keep = (~mask).float()
        if axis == "channel":
            shape, dim = (b, h, t // group, group, d), 3
        else:
            shape, dim = (b, h, t, d // group, group), 4
        xs, ks = (x * keep).view(shape), keep.view(shape)
        mean = xs.sum(dim, keepdim=True) / ks.sum(dim, keepdim=True).clamp_min(1.0)
        filled = torch.where(ks.bool(), xs, mean.expand(shape)).reshape(b, h, t, d)
        return filled, mask

    def _lowrank(self, err, seg, tag):
        """Rank-r factors of the residual per (batch, head): err ≈ A·Bᵀ, A [t, r], B [d, r] (eigenvectors of errᵀerr)."""
        r = min(self.rank, err.shape[-1], err.shape[-2])
        gram = err.transpose(-1, -2).double() @ err.double()
        _, vecs = torch.linalg.eigh(gram)
        basis = vecs[..., -r:].float()  # [b, h, d, r]
        seg[f"{tag}_a"] = (err @ basis).to(torch.float16)
        seg[f"{tag}_b"] = basis.to(torch.float16)

    def _read(self, tag):
        axis = "channel" if tag == "k" else "token"
        q, s, m = (getattr(self, tag + n) for n in ("q", "s", "m"))
        bits = self._bits(tag)
        group = self.group if tag == "k" else self._vgroup(q.shape[-1] * 8 // bits)
        x = kv_dequantize(q, s, m, bits, group, axis, torch.float32)
        for seg in self.segments:
            a, stop = seg["start"], seg["start"] + seg["length"]
            part = x[..., a:stop, :]
            if f"{tag}_a" in seg:
                part += seg[f"{tag}_a"].float() @ seg[f"{tag}_b"].float().transpose(-1, -2)
            if f"{tag}_idx" in seg:
                b, h, t, d = part.shape
                flat = part.reshape(b, h, t * d)
                flat.scatter_(-1, seg[f"{tag}_idx"].long(), seg[f"{tag}_val"].float())
                x[..., a:stop, :] = flat.view(b, h, t, d)
        return x.to(self.dtype)


class QuantizedKVCache(CompressedKVCache):
    """KIVI-style quantized cache (``bits`` 2, 4 or 8 for keys; ``value_bits`` for values, default ``bits``).
    ``rank``/``outliers`` > 0 add GEAR's corrections.

    ``QuantizedKVCache(model.config, bits=2)``; pass it as ``model.generate(..., past_key_values=cache)``."""

    method = "quant"

    def __init__(self, config, bits=4, group_size=32, residual=128, flush=None, rank=0, outliers=0.0,
                 scale_dtype="float16", value_bits=None, window_dtype=None):
        spec = validate_quant({"method": self.method, "bits": bits, "group_size": group_size, "residual": residual,
                               "flush": flush, "rank": rank, "outliers": outliers, "scale_dtype": scale_dtype,
                               "value_bits": value_bits, "window_dtype": window_dtype})
        opts = {k: v for k, v in spec.items() if k != "method"}
        super().__init__(config, lambda i, sw: QuantizedKVLayer(i, sw, **opts))
        check_head_dim(self.head_dim, spec)  # a head_dim that cannot be packed fails now, not mid-generate


def check_head_dim(head_dim: int, spec) -> None:
    """Keys pack ``bits`` codes along head_dim, values ``value_bits`` codes in per-token groups: both must fit."""
    try:
        if head_dim % codes_per_unit(spec["bits"]):
            raise ValueError(f"head_dim {head_dim} cannot hold whole {spec['bits']}-bit packing units "
                             f"(needs a multiple of {codes_per_unit(spec['bits'])})")
        token_group(head_dim, spec["group_size"], spec["value_bits"] or spec["bits"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_quant(spec):
    if spec.get("bits") not in KV_BITS:
        raise ConfigError(f"KV {spec['method']} bits must be one of {KV_BITS}, got {spec.get('bits')!r}")
    if spec.get("value_bits") is None:
        spec["value_bits"] = spec["bits"]
    if spec["value_bits"] not in KV_BITS:
        raise ConfigError(f"KV {spec['method']} value_bits must be one of {KV_BITS}, got {spec['value_bits']!r}")
    check_int(spec, "group_size", 1, pow2=True)
    check_int(spec, "residual", 0)
    if spec.get("flush") is None:
        spec["flush"] = spec["group_size"]
    check_int(spec, "flush", 1)
    if spec["flush"] % spec["group_size"]:
        raise ConfigError(f"KV {spec['method']} flush ({spec['flush']}) must be a multiple of group_size "
                          f"({spec['group_size']})")
    check_int(spec, "rank", 0)
    o = spec.get("outliers")
    if isinstance(o, bool) or not isinstance(o, (int, float)) or not 0.0 <= o < 0.5:
        raise ConfigError(f"KV {spec['method']} outliers must be a fraction in [0, 0.5), got {o!r}")
    if spec.get("window_dtype") not in (None, "float16", "bfloat16", "float32"):
        raise ConfigError(f"KV {spec['method']} window_dtype must be null (the model's dtype), float16, bfloat16 or "
                          f"float32, got {spec.get('window_dtype')!r}")
    if spec.get("scale_dtype") not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"KV {spec['method']} scale_dtype must be float16, bfloat16 or float32, "
                          f"got {spec.get('scale_dtype')!r}")
    return spec


@KV_METHODS.register("quant")
class QuantMethod:
    defaults = {"bits": 4, "group_size": 32, "residual": 128, "flush": None, "rank": 0, "outliers": 0.0,
                "scale_dtype": "float16", "value_bits": None, "window_dtype": None}
    recorded: tuple = ()
    needs_calibration = False
    cache_class = QuantizedKVCache

    @classmethod
    def validate(cls, spec):
        validate_quant(spec)

    @classmethod
    def make_cache(cls, model, spec):
        opts = {k: v for k, v in spec.items() if k != "method"}
        return cls.cache_class(model.config, **opts)

    @classmethod
    def check_model(cls, model, spec):
        from .base import head_geometry

        _, head_dim = head_geometry(model.config.get_text_config(decoder=True))
        check_head_dim(head_dim, spec)


class GearKVCache(QuantizedKVCache):
    """GEAR: KIVI quantization + low-rank residual (``rank``) + exact outliers (``outliers`` fraction)."""

    method = "gear"

    def __init__(self, config, bits=2, group_size=32, residual=128, flush=128, rank=2, outliers=0.01,
                 scale_dtype="float16", value_bits=None, window_dtype=None):
        super().__init__(config, bits, group_size, residual, flush, rank, outliers, scale_dtype, value_bits,
                         window_dtype)


@KV_METHODS.register("gear")
class GearMethod(QuantMethod):
    defaults = {"bits": 2, "group_size": 32, "residual": 128, "flush": 128, "rank": 2, "outliers": 0.01,
                "scale_dtype": "float16", "value_bits": None, "window_dtype": None}
    cache_class = GearKVCache
