"""Quantized KV cache: KIVI (keys per channel, values per token, packed 2/3/4/8 bits, a full-precision window of the
most recent tokens), with the GEAR option (a low-rank approximation of the quantization residual and a sparse set
of outliers kept exactly).

Per layer the cache holds

* ``rk``/``rv`` [B, H, n, D]: the most recent tokens of each half, in the model's dtype (or ``window_dtype``, e.g.
  float16 for an fp32 model: returned upcast): keys ``residual <= n < residual + flush``; values the same, or with
  ``value_flush`` their own ``residual <= n < residual + value_flush``;
* packed codes of every older token (``hf_compress/kernels/reference/kv.py`` layout): keys grouped over ``group_size`` tokens per channel,
  values over ``group_size`` channels per token (the largest power of two <= group_size dividing head_dim); keys
  take ``bits``, values ``value_bits`` (default: ``bits``; keys are the more sensitive half, so e.g. 4/3), or per
  layer ``layer_bits`` {"k": [...], "v": [...]} (set by hand, or from one ``avg_bits`` budget by measured
  sensitivity: `hf_compress.kv.allocation`);
* with GEAR, per flushed segment of each half: rank-``rank`` factors of the residual (fp16) and the top ``outliers``
  fraction of entries by magnitude (int32 flat index + fp16 value).

When the key window holds ``residual + flush`` tokens, its oldest tokens (a multiple of ``group_size``) are
quantized; the prefill is quantized at once, except its last ``residual``..``residual + group_size - 1`` tokens.
Values go with the keys, or, with ``value_flush`` (per-token groups need no token grouping), ``value_flush`` at a
time as soon as they leave their ``residual`` window (the prefill's all but the last ``residual``); their codes are
made ahead, for the whole window at once, and wait until their tokens leave it (per-token codes do not depend on
when they are made, so reads are those of quantizing one flush at a time, for one quantization call per
``residual`` tokens; without GEAR corrections, whose segments would change).

Reads return exactly the stored state dequantized (so beam reordering is exact: codes are index-selected, never
re-quantized). By default a read dequantizes the codes (the cache holds only its compressed state). With
``dense_copy=True`` tokens are dequantized once, when they are quantized, into ``dk``/``dv`` (the model's dtype, with
GEAR's corrections): a read is then one concatenation with the window, as `DynamicCache`'s (decode at 2048 tokens
on CPU ~2x faster), but the cache then also holds that dense copy: more memory than `DynamicCache`, so it trades
the memory saving for speed. `tensors()` (byte counts, what the cache stores) are the codes; `runtime_nbytes()`
adds the copy. Reads are bit-identical either way.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..kernels import KV_BITS, SCALE_DTYPES, codes_per_unit, kv_dequantize, kv_quantize, token_group
from .base import CompressedKVCache, KVCacheLayer
from .widths import check_head_dim, check_layer_bits, layer_widths
from .registry import KV_METHODS, KVMethod, check_int


class QuantizedKVLayer(KVCacheLayer):
    STATE = ("rk", "rv", "kq", "ks", "km", "vq", "vs", "vm")  # windows, then codes / scales / minima per half
    DEQUANTIZED = ("dk", "dv")  # the quantized tokens dequantized, per half (capacity-grown; first quantized[tag])

    def __init__(self, layer_idx, sliding_window=None, *, bits=4, group_size=32, residual=128, flush=None,
                 rank=0, outliers=0.0, scale_dtype="float16", value_bits=None, window_dtype=None, value_flush=None,
                 dense_copy=False):
        super().__init__(layer_idx, sliding_window)
        self.dense_copy = dense_copy
        self.bits, self.group = bits, group_size
        self.value_bits = value_bits or bits
        self.window_dtype = SCALE_DTYPES[window_dtype] if window_dtype else None
        self.residual = residual
        self.flush = flush or group_size
        self.value_flush = value_flush
        self.rank, self.outliers = rank, outliers
        self.sdt = SCALE_DTYPES[scale_dtype]
        self._reset()

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.head_dim = key_states.shape[-1]

    def _reset(self):
        for name in self.STATE + self.DEQUANTIZED:
            setattr(self, name, None)
        self.segments: list[dict] = []  # GEAR extras per flushed segment: tag "k"/"v", start, length, tensors
        self.quantized = {"k": 0, "v": 0}  # tokens held as codes, per half

    @property
    def n_quant(self) -> int:
        return self.quantized["k"]

    def _coded(self, tag: str) -> int:
        """Tokens of one half that have codes: the quantized ones, then (values with ``value_flush``) codes made
        ahead for the window's oldest tokens (`_quantize_oldest`)."""
        codes = getattr(self, tag + "q")
        return 0 if codes is None else codes.shape[-2]

    def _codes(self, tag: str) -> list[torch.Tensor]:
        """(codes, scales, minima) of the quantized tokens of one half (without codes made ahead)."""
        parts = [getattr(self, tag + n) for n in ("q", "s", "m")]
        if self._coded(tag) > self.quantized[tag]:  # only values, whose groups are per token: sliced along tokens
            parts = [p[..., :self.quantized[tag], :] for p in parts]
        return parts

    def tensors(self):
        """The stored state: windows and the quantized tokens' codes (codes made ahead for window tokens are a
        run-time precomputation, like ``dense_copy``: `runtime_nbytes`)."""
        out = {n: getattr(self, n) for n in self.STATE if getattr(self, n) is not None}
        out.update(zip(("vq", "vs", "vm"), self._codes("v")) if self.vq is not None else ())
        for i, seg in enumerate(self.segments):
            out.update({f"seg{i}.{k}": v for k, v in seg.items() if isinstance(v, torch.Tensor)})
        return out

    def runtime_nbytes(self) -> int:
        """What the layer holds at run time: the stored state, the codes made ahead and the dequantized copy."""
        copies = sum(getattr(self, n).nbytes for n in self.DEQUANTIZED if getattr(self, n) is not None)
        ahead = sum(full.nbytes - live.nbytes for full, live in zip((self.vq, self.vs, self.vm), self._codes("v"))
                    if full is not None)
        return self.nbytes() + copies + ahead

    def _index_batch(self, fn):
        for n in self.STATE + self.DEQUANTIZED:
            if getattr(self, n) is not None:
                setattr(self, n, fn(getattr(self, n)))
        self.segments = [{k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                         for s in self.segments]

    def stored_length(self):
        return self.quantized["k"] + (0 if self.rk is None else self.rk.shape[-2])

    # ---- update / read
    def _update(self, key_states, value_states, prefill):
        if self.window_dtype is not None:
            key_states, value_states = key_states.to(self.window_dtype), value_states.to(self.window_dtype)
        if self.rk is None:
            self.rk, self.rv = key_states, value_states
        else:
            self.rk = torch.cat([self.rk, key_states], dim=-2)
            self.rv = torch.cat([self.rv, value_states], dim=-2)
        keys, values = self._full("k"), self._full("v")
        m = self._due(self.rk.shape[-2], self.group, self.group if prefill else self.flush)
        if m:
            self._quantize_oldest("k", m)
        if self.value_flush is not None:  # values need no token groups: they leave the window on their own
            step = 1 if prefill else self.value_flush
            m = self._due(self.rv.shape[-2], step, step)
        if m:
            self._quantize_oldest("v", m)
        return keys, values

    def _due(self, n: int, unit: int, trigger: int) -> int:
        """Tokens to quantize out of a window of ``n`` (0 until it holds ``residual + trigger``): the largest multiple
        of ``unit`` that leaves at least ``residual`` tokens."""
        return ((n - self.residual) // unit) * unit if n >= self.residual + trigger else 0

    def _full(self, tag):
        """Everything stored for one half, in the model's dtype: dequantized codes, then the window — from the
        run-time copy with ``dense_copy``, else dequantized from the codes at every read, straight into the front of
        the returned tensor (no concatenation afterwards)."""
        window, n = getattr(self, "r" + tag), self.quantized[tag]
        if not n:
            return window.to(self.dtype)  # no copy unless window_dtype differs
        if self.dense_copy:
            return torch.cat([getattr(self, "d" + tag)[..., :n, :], window.to(self.dtype)], dim=-2)
        out = window.new_empty(*window.shape[:-2], n + window.shape[-2], window.shape[-1], dtype=self.dtype)
        self._dequantize(tag, self._codes(tag), self.segments, out[..., :n, :])
        out[..., n:, :] = window
        return out

    def _quantize_oldest(self, tag: str, m: int) -> None:
        """Move the window's oldest ``m`` tokens of one half to codes. Values with ``value_flush`` (per-token groups, no
        GEAR segments) are coded ahead: when their codes run out, the whole window is quantized at once and its
        younger tokens' codes wait (read from the window until they leave it) — the same codes as quantizing them one
        flush at a time, for one quantization call per ``residual`` tokens instead of one per flush."""
        window = getattr(self, "r" + tag)
        ahead = self._coded(tag) - self.quantized[tag]  # the window's oldest tokens that already have codes
        if m > ahead:
            ahead_ok = tag == "v" and self.value_flush is not None and not (self.rank or self.outliers)
            stop = window.shape[-2] if ahead_ok else m
            seg = {"tag": tag, "start": self.quantized[tag] + ahead, "length": stop - ahead}
            parts = self._compress(window[..., ahead:stop, :], seg, tag)
            if self.rank or self.outliers:
                self.segments.append(seg)
            for name, new in zip((tag + "q", tag + "s", tag + "m"), parts):
                old = getattr(self, name)
                setattr(self, name, new if old is None else torch.cat([old, new], dim=-2))
            if self.dense_copy:  # this segment's corrections, relative to its own first token
                self._append_dequantized(tag, self._dequantize(tag, parts, [{**seg, "start": 0}]), seg["start"])
        setattr(self, "r" + tag, window[..., m:, :].contiguous())
        self.quantized[tag] += m

    def _append_dequantized(self, tag: str, x: torch.Tensor, n: int) -> None:
        """Write ``x`` after the first ``n`` tokens of ``d<tag>``, growing it geometrically (amortised O(1) per token,
        where a concatenation would copy the whole copy at every flush)."""
        name, m = "d" + tag, x.shape[-2]
        buf = getattr(self, name)
        if buf is None or buf.shape[-2] < n + m:
            grown = x.new_empty(*x.shape[:-2], max(2 * (n + m), 64), x.shape[-1])
            if n:
                grown[..., :n, :] = buf[..., :n, :]
            setattr(self, name, buf := grown)
        buf[..., n:n + m, :] = x

    def _vgroup(self, d):
        return token_group(d, self.group, self.value_bits)

    def _layout(self, tag):
        """(bits, group, axis) of one half: keys per channel over ``group`` tokens, values per token."""
        if tag == "k":
            return self.bits, self.group, "channel"
        return self.value_bits, self._vgroup(self.head_dim), "token"

    def _compress(self, x, seg, tag):
        bits, group, axis = self._layout(tag)
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

    def _dequantize(self, tag, parts, segments, out=None):
        """Codes ``parts`` (codes, scales, minima) of one half dequantized, with the GEAR corrections of
        ``segments`` (``start`` relative to the first token of ``parts``), in the model's dtype (into ``out`` when
        given)."""
        bits, group, axis = self._layout(tag)
        segments = [seg for seg in segments if seg["tag"] == tag and (f"{tag}_a" in seg or f"{tag}_idx" in seg)]
        if not segments:
            return kv_dequantize(*parts, bits, group, axis, self.dtype, out=out)
        x = kv_dequantize(*parts, bits, group, axis, torch.float32)
        for seg in segments:
            a, stop = seg["start"], seg["start"] + seg["length"]
            part = x[..., a:stop, :]
            if f"{tag}_a" in seg:
                part += seg[f"{tag}_a"].float() @ seg[f"{tag}_b"].float().transpose(-1, -2)
            if f"{tag}_idx" in seg:
                b, h, t, d = part.shape
                flat = part.reshape(b, h, t * d)
                flat.scatter_(-1, seg[f"{tag}_idx"].long(), seg[f"{tag}_val"].float())
                x[..., a:stop, :] = flat.view(b, h, t, d)
        return x.to(self.dtype) if out is None else out.copy_(x)


class QuantizedKVCache(CompressedKVCache):
    """KIVI-style quantized cache (``bits`` 2, 3, 4 or 8 for keys; ``value_bits`` for values, default ``bits``).
    ``rank``/``outliers`` > 0 add GEAR's corrections; ``value_flush`` lets values leave the window on their own;
    ``layer_bits`` ``{"k": [...], "v": [...]}`` (one width per decoder layer) overrides the widths per layer.

    ``QuantizedKVCache(model.config, bits=2)``; pass it as ``model.generate(..., past_key_values=cache)``."""

    method = "quant"

    def __init__(self, config, bits=4, group_size=32, residual=128, flush=None, rank=0, outliers=0.0,
                 scale_dtype="float16", value_bits=None, window_dtype=None, value_flush=None, layer_bits=None,
                 dense_copy=False):
        spec = validate_quant({"method": self.method, "bits": bits, "group_size": group_size, "residual": residual,
                               "flush": flush, "rank": rank, "outliers": outliers, "scale_dtype": scale_dtype,
                               "value_bits": value_bits, "window_dtype": window_dtype, "value_flush": value_flush,
                               "layer_bits": layer_bits, "dense_copy": dense_copy})
        opts = {k: v for k, v in spec.items() if k not in ("method", "layer_bits", "avg_bits")}
        decoder = config.get_text_config(decoder=True)
        check_layer_bits(spec, decoder.num_hidden_layers)

        def make_layer(i, sliding_window):
            widths = layer_widths(spec, i)
            return QuantizedKVLayer(i, sliding_window, **{**opts, "bits": widths[0], "value_bits": widths[1]})

        super().__init__(config, make_layer)
        check_head_dim(self.head_dim, spec)  # a head_dim that cannot be packed fails now, not mid-generate


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
    if spec.get("value_flush") is not None:
        check_int(spec, "value_flush", 1)
    if not isinstance(spec.get("dense_copy", False), bool):
        raise ConfigError(f"KV {spec['method']} dense_copy must be true or false, got {spec['dense_copy']!r}")
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
    lb = spec.get("layer_bits")
    if lb is not None and (not isinstance(lb, dict) or set(lb) != {"k", "v"} or not isinstance(lb["k"], list)
                           or not isinstance(lb["v"], list) or len(lb["k"]) != len(lb["v"])
                           or any((k is None) != (v is None) for k, v in zip(lb["k"], lb["v"]))
                           or not all(b is None or b in KV_BITS for b in lb["k"] + lb["v"])):
        raise ConfigError(f"KV {spec['method']} layer_bits must be {{'k': [...], 'v': [...]}}: one width of {KV_BITS} "
                          f"(or null for both halves of an uncompressed layer) per decoder layer, got {lb!r}")
    ab = spec.get("avg_bits")
    if ab is not None and (isinstance(ab, bool) or not isinstance(ab, (int, float))
                           or not min(KV_BITS) <= ab <= max(spec["bits"], spec["value_bits"])):
        raise ConfigError(f"KV {spec['method']} avg_bits must be a number in [{min(KV_BITS)}, "
                          f"{max(spec['bits'], spec['value_bits'])}] (bits per cached key/value element), got {ab!r}")
    return spec


@KV_METHODS.register("quant")
class QuantKVMethod(KVMethod):
    defaults = {"bits": 4, "group_size": 32, "residual": 128, "flush": None, "rank": 0, "outliers": 0.0,
                "scale_dtype": "float16", "value_bits": None, "window_dtype": None, "value_flush": None,
                "layer_bits": None, "avg_bits": None, "dense_copy": False}
    cache_class = QuantizedKVCache

    @classmethod
    def validate(cls, spec):
        validate_quant(spec)

    @classmethod
    def make_cache(cls, model, spec):
        if cls.needs_calibration(spec):
            raise ConfigError(f"KV {spec['method']} avg_bits {spec['avg_bits']} needs per-layer widths from "
                              "calibration: hf_compress.compress(model, {'kv': spec}, calibration=...) or CLI --calib")
        opts = {k: v for k, v in spec.items() if k not in ("method", "avg_bits")}
        return cls.cache_class(model.config, **opts)

    @classmethod
    def check_model(cls, model, spec):
        from .base import head_geometry

        decoder = model.config.get_text_config(decoder=True)
        _, head_dim = head_geometry(decoder)
        check_layer_bits(spec, decoder.num_hidden_layers)
        check_head_dim(head_dim, spec)

    @classmethod
    def needs_calibration(cls, spec):
        return spec.get("avg_bits") is not None and spec.get("layer_bits") is None

    @classmethod
    def calibrate(cls, model, spec, windows):
        from .allocation import allocate_layer_bits

        spec["layer_bits"] = allocate_layer_bits(model, spec, windows)
        return spec


class GearKVCache(QuantizedKVCache):
    """GEAR: KIVI quantization + low-rank residual (``rank``) + exact outliers (``outliers`` fraction)."""

    method = "gear"

    def __init__(self, config, bits=2, group_size=32, residual=128, flush=128, rank=2, outliers=0.01,
                 scale_dtype="float16", value_bits=None, window_dtype=None, value_flush=None, layer_bits=None,
                 dense_copy=False):
        super().__init__(config, bits, group_size, residual, flush, rank, outliers, scale_dtype, value_bits,
                         window_dtype, value_flush, layer_bits, dense_copy)


@KV_METHODS.register("gear")
class GearKVMethod(QuantKVMethod):
    defaults = {**QuantKVMethod.defaults, "bits": 2, "flush": 128, "rank": 2, "outliers": 0.01}
    cache_class = GearKVCache
