"""KV-cache compression (hf_compress/kv): caches against DynamicCache, transformers-5 invariants, generate with
batch 2 and beam search, the default-cache hook, checkpoints, CLI specs and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, make_tiny, run_python
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

import hf_compress
from hf_compress.compat import cache_kwargs
from hf_compress import CheckpointError, CompressionConfig, ConfigError
from hf_compress import kv
from hf_compress.kv.eviction import EvictionKVCache
from hf_compress.kv.lowrank import LowRankKVCache, calibrate_projections
from hf_compress.kv.quant import GearKVCache, QuantizedKVCache
from hf_compress.kv.xkv import XKVCache

ARCHS = ["llama", "qwen2", "mistral"]


def _ids(batch=2, length=40, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _calib(seed=2):
    return torch.randint(3, VOCAB, (6, 32), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _split_logits(model, ids, cache, split=30):
    """Logits of ids[:, split:] fed one token at a time after a prefill of ids[:, :split] into ``cache``."""
    model(input_ids=ids[:, :split], **cache_kwargs(model, cache), use_cache=True)
    out = []
    for t in range(split, ids.shape[1]):
        out.append(model(input_ids=ids[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True).logits[:, -1])
    return torch.stack(out, dim=1)


@torch.no_grad()
def _reference(model, ids, split=30):
    return model(input_ids=ids).logits[:, split:]


# ------------------------------------------------------------------------------------------ caches vs DynamicCache
@pytest.mark.parametrize("arch", ARCHS)
def test_quant8_matches_dynamic(arch):
    model = make_tiny(arch)
    ids = _ids()
    cache = QuantizedKVCache(model.config, bits=8, group_size=8, residual=4)
    got = _split_logits(model, ids, cache)
    assert all(layer.n_quant >= 24 for layer in cache.compressed_layers)  # the quantized path is exercised
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(got, _reference(model, ids), atol=2e-3, rtol=0)


def _tiny_llama_hd16():
    """A tiny Llama with head_dim 16 (3-bit KV codes pack 8 channels into 3 bytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import _decoder_kwargs

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**_decoder_kwargs(), "hidden_size": 64}))


def test_quant_bits_order_error_and_bytes():
    model = _tiny_llama_hd16()
    ids = _ids(length=64)
    ref = _reference(model, ids, 48)
    errs, sizes = {}, {}
    for bits in (8, 4, 3, 2):
        cache = QuantizedKVCache(model.config, bits=bits, group_size=8, residual=8)
        errs[bits] = (_split_logits(model, ids, cache, 48) - ref).abs().max().item()
        sizes[bits] = kv.cache_nbytes(cache)
        layer = cache.compressed_layers[0]
        b, h, t, d = 2, 2, layer.n_quant, 16
        assert layer.kq.dtype == torch.uint8 and layer.kq.nbytes == b * h * t * d * bits // 8  # packed (3-bit too)
    dyn = DynamicCache(config=model.config)
    _split_logits(model, ids, dyn, 48)
    assert errs[8] < errs[4] < errs[3] < errs[2]
    assert sizes[2] < sizes[3] < sizes[4] < sizes[8] < kv.cache_nbytes(dyn)


def test_value_bits_quantize_values_apart_from_keys():
    """value_bits: keys at ``bits`` (per channel), values at ``value_bits`` (per token); each half equals the
    reference quantizer at its own width, and k4/v2 sits between quant4 and quant2 in bytes."""
    from hf_compress.kernels import kv_dequantize, kv_quantize

    model = make_tiny("llama")
    ids = _ids(length=64)
    sizes = {}
    for key, kw in {"k4v2": {"bits": 4, "value_bits": 2}, "q4": {"bits": 4}, "q2": {"bits": 2}}.items():
        cache = QuantizedKVCache(model.config, group_size=8, residual=8, **kw)
        _split_logits(model, ids, cache, 48)
        sizes[key] = kv.cache_nbytes(cache)
        if key == "k4v2":
            layer = cache.compressed_layers[0]
            b, h, t, d = 2, 2, layer.n_quant, 12
            assert layer.kq.nbytes == b * h * t * d * 4 // 8 and layer.vq.nbytes == b * h * t * d * 2 // 8
            vals = layer._full("v")[..., :t, :].float()
            vq = kv_quantize(vals, 2, layer._vgroup(d), "token", torch.float16)  # re-quantizing: a fixed point
            assert torch.allclose(kv_dequantize(*vq, 2, layer._vgroup(d), "token", torch.float32), vals, atol=1e-3)
    assert sizes["q2"] < sizes["k4v2"] < sizes["q4"]
    assert kv.parse_kv_spec({"method": "quant", "bits": 4, "value_bits": 2})["value_bits"] == 2
    assert kv.parse_kv_spec("quant4")["value_bits"] == 4
    with pytest.raises(ConfigError, match="value_bits must be one of"):
        kv.parse_kv_spec({"method": "quant", "bits": 4, "value_bits": 5})
    with pytest.raises(ConfigError, match="window_dtype"):
        kv.parse_kv_spec({"method": "quant", "bits": 4, "window_dtype": "int8"})
    with pytest.raises(ConfigError, match="multiple of 8"):  # 3-bit keys on head_dim 12: refused up front
        QuantizedKVCache(model.config, bits=3, value_bits=4, group_size=8)


def test_half_precision_window():
    """window_dtype float16 stores an fp32 model's recent window in half the bytes and returns it upcast (the
    fp16-rounded values)."""
    model = _tiny_llama_hd16()
    ids = _ids(length=64)
    full = QuantizedKVCache(model.config, bits=4, group_size=8, residual=8)
    half = QuantizedKVCache(model.config, bits=4, group_size=8, residual=8, window_dtype="float16")
    a, b = _split_logits(model, ids, full, 48), _split_logits(model, ids, half, 48)
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-2)
    lf, lh = full.compressed_layers[0], half.compressed_layers[0]
    assert lh.rk.dtype == torch.float16 and lh.rk.nbytes * 2 == lf.rk.nbytes
    assert torch.equal(lh.rk.float(), lf.rk.half().float())


def test_value_flush_quantizes_values_token_by_token():
    """value_flush 1: values (grouped per token) leave the window as soon as it holds ``residual`` + 1 of them, while
    keys still wait for whole token groups. Per-token codes do not depend on when they are made, so the value codes
    equal those of the cache that flushes values with the keys, over every token both have quantized."""
    model = make_tiny("llama")
    ids = _ids(length=40)
    ref = _reference(model, ids)
    together = QuantizedKVCache(model.config, bits=4, group_size=8, residual=4)
    alone = QuantizedKVCache(model.config, bits=4, group_size=8, residual=4, value_flush=1)
    err_t = (_split_logits(model, ids, together) - ref).abs().max()
    err_a = (_split_logits(model, ids, alone) - ref).abs().max()
    assert err_a < 0.1 and err_t < 0.1
    lt, la = together.compressed_layers[0], alone.compressed_layers[0]
    assert la.rv.shape[-2] == 4 and la.quantized["v"] == 36  # exactly the residual window is left
    assert la.rk.shape == lt.rk.shape and torch.equal(la.kq, lt.kq)  # keys unchanged
    n = lt.quantized["v"]
    assert 0 < n < 36 and torch.equal(la.vq[..., :n, :], lt.vq) and torch.equal(la.vs[..., :n, :], lt.vs)
    assert kv.cache_nbytes(alone) < kv.cache_nbytes(together)
    assert la.stored_length() == lt.stored_length() == 40 - 0  # the mask still covers every stored token
    # GEAR corrections per flushed segment of each half: a full-rank residual stays exact with value_flush too
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    gear = GearKVCache(model.config, bits=2, group_size=8, residual=4, flush=8, rank=head_dim, value_flush=2)
    torch.testing.assert_close(_split_logits(model, ids, gear), ref, atol=2e-2, rtol=0)
    tags = [seg["tag"] for seg in gear.compressed_layers[0].segments]
    assert tags.count("v") > tags.count("k") > 0
    with pytest.raises(ConfigError, match="value_flush must be an integer >= 1"):
        kv.parse_kv_spec({"method": "quant", "value_flush": 0})


def test_values_coded_ahead_read_as_if_flushed_one_by_one(monkeypatch):
    """value_flush: the values' codes are made for the whole window at once (one quantization per ``residual``
    tokens, not one per token), yet every read returns what flushing one token at a time defines: every token older
    than the window dequantized from its own per-token codes, the window exact; the stored bytes count only the
    quantized tokens' codes, and the codes made ahead show in `runtime_nbytes`."""
    from hf_compress.kernels import kv_dequantize, kv_quantize
    from hf_compress.kv import quant

    model = make_tiny("llama")
    cache = QuantizedKVCache(model.config, bits=4, group_size=8, residual=4, value_flush=1)
    calls = []
    monkeypatch.setattr(quant, "kv_quantize", lambda x, *a: calls.append(x.shape[-2]) or kv_quantize(x, *a))
    layer = cache.compressed_layers[0]
    gen = torch.Generator().manual_seed(0)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    heads = model.config.num_key_value_heads
    values = []
    for step, t in enumerate([10] + [1] * 20):
        k, v = (torch.randn(1, heads, t, head_dim, generator=gen) for _ in range(2))
        values.append(v)
        _, read = cache.update(k, v, 0)
        seen = torch.cat(values, -2)
        n = seen.shape[-2] - 4
        r = n - t if step else 0  # a read returns the state before this update's flush
        group = layer._vgroup(head_dim)
        expect = torch.cat([kv_dequantize(*kv_quantize(seen[..., :r, :], 4, group, "token"), 4, group, "token"),
                            seen[..., r:, :]], -2)
        assert torch.equal(read, expect), step
        assert layer.quantized["v"] == n and layer.rv.shape[-2] == 4
        stored = layer.tensors()
        assert stored["vq"].shape[-2] == stored["vs"].shape[-2] == n
        ahead = layer._coded("v") - n
        per_token = sum(t[..., :1, :].nbytes for t in (layer.vq, layer.vs, layer.vm))
        assert layer.runtime_nbytes() == layer.nbytes() + ahead * per_token
    value_calls = [c for c in calls if c not in (8, 16)]  # keys flush whole 8-token groups
    assert len(value_calls) <= 6, calls  # 21 updates and 26 tokens flushed: a quantization per 5 tokens at most


def test_layer_bits_give_each_layer_its_widths():
    """layer_bits: every layer packs at its own widths; a prefill's codes equal the uniform cache's at that width
    (prefill attention reads the exact keys, so every layer sees the same inputs)."""
    model = _tiny_llama_hd16()
    ids = _ids(length=40)
    mixed = QuantizedKVCache(model.config, group_size=8, residual=4, layer_bits={"k": [4, 3], "v": [2, 3]})
    uniform = {b: QuantizedKVCache(model.config, group_size=8, residual=4, bits=b) for b in (2, 3, 4)}
    with torch.no_grad():
        for cache in (mixed, *uniform.values()):
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    for i, (kb, vb) in enumerate(((4, 2), (3, 3))):
        layer = mixed.compressed_layers[i]
        assert (layer.bits, layer.value_bits) == (kb, vb)
        assert torch.equal(layer.kq, uniform[kb].compressed_layers[i].kq)
        assert torch.equal(layer.vq, uniform[vb].compressed_layers[i].vq)
        assert layer.kq.nbytes == 2 * 2 * layer.n_quant * 16 * kb // 8
    spec = {"method": "quant", "bits": 4}
    with pytest.raises(ConfigError, match="2 decoder layers"):
        QuantizedKVCache(model.config, layer_bits={"k": [4, 4, 4], "v": [4, 4, 4]})
    for bad in ({"k": [4, 5], "v": [4, 4]}, {"k": [4, None], "v": [4, 4]}, {"k": [4], "v": [4, 4]}, [4, 4]):
        with pytest.raises(ConfigError, match="layer_bits must be"):
            kv.parse_kv_spec({**spec, "layer_bits": bad})
    with pytest.raises(ConfigError, match="multiple of 8"):  # a 3-bit layer on head_dim 12
        QuantizedKVCache(make_tiny("llama").config, layer_bits={"k": [4, 3], "v": [4, 4]})


def _kl_through_cache(model, windows, spec, prefix):
    """Reference for one sensitivity entry: prefill each window's prefix *through* the quantized cache, then read the
    rest; next-token log-probabilities of the rest."""
    with torch.no_grad():
        cache = kv.make_cache(model, spec)
        model(input_ids=windows[:, :prefix], **cache_kwargs(model, cache), use_cache=True)
        logits = model(input_ids=windows[:, prefix:], **cache_kwargs(model, cache), use_cache=True).logits
    return torch.log_softmax(logits.double(), -1)


def test_avg_bits_lowers_the_least_sensitive_halves(tmp_path):
    """avg_bits: each half's sensitivity is the KL of one width less, measured as a real prefill + read through the
    cache would give it; the allocation lowers the halves with the least KL until the mean width meets the budget;
    compress records it and a reloaded checkpoint's generate() uses those widths."""
    from hf_compress.kv.allocation import allocate_layer_bits, layer_sensitivity

    model = _tiny_llama_hd16()
    with torch.no_grad():  # sharper attention, so that key precision matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    windows = _calib()  # [6, 32]: prefix 24, last quarter 8 tokens
    spec = kv.parse_kv_spec({"method": "quant", "bits": 4, "value_bits": 3, "group_size": 8, "residual": 4,
                             "avg_bits": 3.0})
    kl = layer_sensitivity(model, spec, windows, batch_size=4)
    assert set(kl) == {(0, "k"), (1, "k"), (0, "v"), (1, "v")} and all(v > 0 for v in kl.values())
    base = {**spec, "avg_bits": None, "layer_bits": None}
    ref = _kl_through_cache(model, windows, base, 24)
    for (i, h), value in kl.items():
        lb = {"k": [4, 4], "v": [3, 3]}
        lb[h][i] -= 1
        lp = _kl_through_cache(model, windows, {**base, "layer_bits": lb}, 24)
        direct = float((ref.exp() * (ref - lp)).sum(-1).mean())
        assert value == pytest.approx(direct, rel=1e-4, abs=1e-9), (i, h)
    bits = allocate_layer_bits(model, spec, windows, batch_size=4)
    lowered = {(i, h) for h, ref_bits in (("k", 4), ("v", 3)) for i in range(2) if bits[h][i] < ref_bits}
    assert sum(bits["k"] + bits["v"]) / 4 <= 3.0 and len(lowered) == 2
    assert lowered == set(sorted(kl, key=kl.get)[:2])  # every drop saves one bit: least KL first
    assert allocate_layer_bits(model, {**spec, "avg_bits": 3.5}, None, sensitivity=kl) == {"k": [4, 4], "v": [3, 3]}
    with pytest.raises(ConfigError, match="cannot be met on this model"):
        allocate_layer_bits(model, {**spec, "avg_bits": 2.4}, None, sensitivity=kl)
    with pytest.raises(ConfigError, match="quantize nothing"):
        layer_sensitivity(model, spec, windows[:, :12])
    with pytest.raises(ConfigError, match="needs per-layer widths from calibration"):
        kv.make_cache(model, spec)
    with pytest.raises(ConfigError, match="avg_bits must be a number"):
        kv.parse_kv_spec({**spec, "avg_bits": 5})
    mix = kv.parse_kv_spec("quantmix:3.2")  # the CLI shorthand: ":AVG" is the budget for quantized caches
    assert (mix["bits"], mix["value_bits"], mix["value_flush"], mix["avg_bits"]) == (4, 3, 1, 3.2)
    assert kv.parse_kv_spec("quant4:3.5")["avg_bits"] == 3.5
    with pytest.raises(ConfigError, match=r"avg_bits must be a number in \[2, 4\]"):
        kv.parse_kv_spec("quant4:4.5")

    hf_compress.compress(model, {"kv": spec, "calibration": {"nsamples": 6, "seqlen": 32}}, calibration=windows)
    recorded = model.config.quantization_config.kv
    assert recorded["layer_bits"] == bits
    ids = _ids(1, 40)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert [(la.bits, la.value_bits) for la in out.past_key_values.compressed_layers] == list(zip(bits["k"], bits["v"]))
    hf_compress.save_pretrained(model, tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    again = loaded.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert kv.default_cache_spec(loaded)["layer_bits"] == bits
    assert torch.equal(again.sequences, out.sequences)
    assert [(la.bits, la.value_bits) for la in again.past_key_values.compressed_layers] == list(zip(bits["k"], bits["v"]))
    # a dense model cannot be given avg_bits inside from_pretrained: there is no calibration text there
    _tiny_llama_hd16().save_pretrained(tmp_path / "dense")
    with pytest.raises(ConfigError, match="needs calibration text"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=CompressionConfig(kv=spec))


def test_gear_full_rank_residual_is_exact_and_outliers_kept():
    model = make_tiny("llama")
    ids = _ids()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    cache = GearKVCache(model.config, bits=2, group_size=8, residual=4, flush=8, rank=head_dim, outliers=0.02)
    got = _split_logits(model, ids, cache)
    torch.testing.assert_close(got, _reference(model, ids), atol=2e-2, rtol=0)  # fp16 factors
    plain = QuantizedKVCache(model.config, bits=2, group_size=8, residual=4, flush=8)
    err_plain = (_split_logits(model, ids, plain) - _reference(model, ids)).abs().max()
    assert (got - _reference(model, ids)).abs().max() < err_plain / 5
    # the outliers are reproduced exactly (to fp16)
    layer = cache.compressed_layers[0]
    seg = layer.segments[0]
    keys = layer._full("k")[..., seg["start"]:seg["start"] + seg["length"], :].float()
    flat = keys.reshape(*keys.shape[:2], -1)
    torch.testing.assert_close(flat.gather(-1, seg["k_idx"].long()), seg["k_val"].float())


@pytest.mark.parametrize("arch", ARCHS)
def test_lowrank_full_rank_equals_dynamic(arch):
    model = make_tiny(arch)
    ids = _ids()
    proj = calibrate_projections(model, _calib(), keep=1.0, alloc="uniform")
    cache = LowRankKVCache(model, window=4, projections=proj)
    got = _split_logits(model, ids, cache)
    assert cache.compressed_layers[0].lk.shape[1] > 20
    torch.testing.assert_close(got, _reference(model, ids), atol=1e-4, rtol=0)


def test_lowrank_budget_allocation():
    model = make_tiny("llama")
    proj = calibrate_projections(model, _calib(), keep=0.25, alloc="energy")
    ranks = proj.ranks()
    width = 2 * 12
    assert sum(ranks["k"] + ranks["v"]) == 4 * round(0.25 * width)
    cache = LowRankKVCache(model, window=0, projections=proj)
    ids = _ids()
    _split_logits(model, ids, cache)
    dyn = DynamicCache(config=model.config)
    _split_logits(model, ids, dyn)
    assert kv.cache_nbytes(cache) < 0.3 * kv.cache_nbytes(dyn)


def test_xkv_full_rank_matches_and_budget_shrinks():
    model = make_tiny("llama")
    ids = _ids()
    cache = XKVCache(model.config, group=2, window=2, rank=2 * 2 * 12)
    torch.testing.assert_close(_split_logits(model, ids, cache), _reference(model, ids), atol=1e-4, rtol=0)
    small = XKVCache(model.config, keep=0.25, group=2, window=2)
    _split_logits(model, ids, small)
    dyn = DynamicCache(config=model.config)
    _split_logits(model, ids, dyn)
    assert kv.cache_nbytes(small) < 0.6 * kv.cache_nbytes(dyn)
    assert small.compressed_layers[0].group is small.compressed_layers[1].group  # one shared basis per group


# ------------------------------------------------------------------------------------------ eviction invariants
def test_eviction_lengths_and_masks():
    model = make_tiny("llama")
    ids = _ids()
    cache = EvictionKVCache(model, keep=0.25, window=4)
    with torch.no_grad():
        model(input_ids=ids[:, :32], **cache_kwargs(model, cache), use_cache=True)
        assert cache.get_seq_length() == 32  # logical
        assert all(layer.stored_length() == 8 for layer in cache.compressed_layers)
        assert cache.get_mask_sizes(1, 0) == (9, 24)
        model(input_ids=ids[:, 32:33], **cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == 33 and cache.compressed_layers[0].stored_length() == 9
    full = EvictionKVCache(model, keep=1.0, window=4)
    torch.testing.assert_close(_split_logits(model, ids, full), _reference(model, ids), atol=1e-5, rtol=0)


def test_eviction_scores_are_the_models_attention(monkeypatch):
    """The recomputed window queries (q_proj, RoPE, GQA grouping) reproduce eager attention's weights exactly."""
    from hf_compress.kv.eviction import EvictionKVLayer

    model = make_tiny("llama")
    model.set_attn_implementation("eager")
    seen = {}
    original = EvictionKVLayer._select

    def spy(self, queries, keys, valid, scaling, budget):
        seen[self.layer_idx] = (queries, keys, scaling)
        return original(self, queries, keys, valid, scaling, budget)

    monkeypatch.setattr(EvictionKVLayer, "_select", spy)
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(model, EvictionKVCache(model, keep=0.25, window=4)),
                    output_attentions=True)
    for i, att in enumerate(out.attentions):  # [B, Hq, L, L]
        q, k, scaling = seen[i]
        b, hkv, length, d = k.shape
        logits = (q.reshape(b, hkv, 2 * 4, d) @ k.transpose(-1, -2) * scaling).view(b, hkv, 2, 4, length)
        causal = torch.arange(length)[None] <= torch.arange(length - 4, length)[:, None]
        weights = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        torch.testing.assert_close(weights.reshape(b, 2 * hkv, 4, length), att[:, :, -4:], atol=1e-6, rtol=0)


def test_eviction_left_padding_matches_single_rows():
    """Padded row of a batch == the same prompt alone with the same number of kept tokens; pads that must be kept
    (budget above the row's real tokens) stay masked."""
    model = make_tiny("llama")
    long, short = _ids(1, 40, 3)[0], _ids(1, 12, 4)[0]
    for real, keep_solo in ((30, 20 / 30), (12, 1.0)):
        row = short if real == 12 else long[:30]
        batch = torch.full((2, 40), 0)
        batch[0] = long
        batch[1, 40 - real:] = row
        mask = torch.ones_like(batch)
        mask[1, : 40 - real] = 0
        both = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                              **cache_kwargs(model, EvictionKVCache(model, keep=0.5, window=4, kernel=1)))
        solo = model.generate(row[None], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                              **cache_kwargs(model, EvictionKVCache(model, keep=keep_solo, window=4, kernel=1)))
        assert torch.equal(both[1, 40:], solo[0, real:]), real


def test_eviction_right_padding_refused_and_needs_model():
    model = make_tiny("llama")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with pytest.raises(ConfigError, match="left padding"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask,
                  **cache_kwargs(model, EvictionKVCache(model, keep=0.25, window=4)))
    bare = EvictionKVCache(model, keep=0.25, window=4)  # updated without the model's attention seeing the queries
    bare.layers[0].update(torch.zeros(1, 2, 40, 12), torch.zeros(1, 2, 40, 12))
    with pytest.raises(ConfigError, match="make_cache"), torch.no_grad():
        bare.layers[0].update(torch.zeros(1, 2, 1, 12), torch.zeros(1, 2, 1, 12))
    cache = EvictionKVCache(model, keep=0.25, window=4)
    model.set_attn_implementation("sdpa")  # switched away after the cache was built: refused at the first decode step
    with pytest.raises(ConfigError, match="attention implementation"):
        model.generate(ids, max_new_tokens=2, do_sample=False, **cache_kwargs(model, cache))


def test_pyramid_budgets_and_padded_decode():
    model = make_tiny("llama")
    batch = _ids(2, 40, 5)
    mask = torch.ones_like(batch)
    mask[0, :6] = 0
    cache = kv.make_cache(model, {"method": "snapkv", "keep": 0.5, "window": 4, "schedule": "pyramid"})
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                         **cache_kwargs(model, cache))
    stored = [layer.stored_length() for layer in cache.compressed_layers]
    assert stored[0] > stored[1] and out.shape == (2, 45)
    assert cache.get_seq_length() == 44


# ------------------------------------------------------------------------------------------ generate: batch, beams
SPECS = ["quant4", "quant2", "gear", "xkv", {"method": "snapkv", "keep": 0.5, "window": 4},
         {"method": "lowrank", "keep": 0.5, "window": 4},
         {"method": "quant", "bits": 4, "group_size": 8, "residual": 8, "value_flush": 1,
          "layer_bits": {"k": [4, 2], "v": [2, 4]}}]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s if isinstance(s, str) else s["method"])
def test_generate_batch2_and_beam_search(spec):
    model = make_tiny("qwen2")
    if isinstance(spec, dict) and spec["method"] == "lowrank":
        hf_compress.compress(model, {"kv": spec, "calibration": {"nsamples": 6, "seqlen": 32}}, calibration=_calib())
        spec = model.config.quantization_config.kv
    ids = _ids(2, 150 if spec in ("quant4", "quant2", "gear") else 40)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, kv.make_cache(model, spec)))
    beams = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2,
                           **cache_kwargs(model, kv.make_cache(model, spec)))
    assert greedy.shape == (2, ids.shape[1] + 6) and beams.shape == (4, ids.shape[1] + 6)


def test_beam_search_exact_with_lossless_settings():
    model = make_tiny("llama")
    ids = _ids(2, 40)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3)
    proj = calibrate_projections(model, _calib(), keep=1.0, alloc="uniform")
    for cache in (LowRankKVCache(model, window=4, projections=proj),
                  QuantizedKVCache(model.config, bits=8, group_size=8, residual=4),
                  QuantizedKVCache(model.config, bits=8, group_size=8, residual=4, value_flush=1)):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3, **cache_kwargs(model, cache))
        assert torch.equal(out, ref), type(cache).__name__


# ------------------------------------------------------------------------------------------ default cache, checkpoint
def test_default_cache_in_memory_and_explicit_wins():
    model = make_tiny("llama")
    ids = _ids(1, 40)
    hf_compress.compress(model, {"kv": "quant2"})
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, QuantizedKVCache) and out.past_key_values.compressed_layers[0].bits == 2
    dyn = DynamicCache(config=model.config)
    model.generate(ids, max_new_tokens=3, do_sample=False, **cache_kwargs(model, dyn))
    assert dyn.get_seq_length() == 42 and dyn.layers[0].keys.shape[-2] == 42
    plain = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="dynamic",
                           return_dict_in_generate=True)
    assert type(plain.past_key_values) is DynamicCache
    # compression of the weights untouched by a kv-only config
    assert not hf_compress.quantizer.compressed_modules(model)


def test_save_load_fresh_process_uses_cache_by_default(tmp_path):
    model = make_tiny("llama")
    hf_compress.compress(model, {"kv": {"method": "lowrank", "keep": 0.5, "window": 4},
                                 "calibration": {"nsamples": 6, "seqlen": 32}}, calibration=_calib())
    ids = _ids(1, 40)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    hf_compress.save_pretrained(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["base_config"]["quantization_config"]["kv"]["ranks"] == model.config.quantization_config.kv["ranks"]
    proc = run_python(f"""
        import torch, hf_compress
        from transformers import AutoModelForCausalLM, DynamicCache
        from hf_compress.compat import cache_kwargs
        from hf_compress.kv import LowRankKVCache
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ck')!r})
        ids = torch.tensor({ids.tolist()})
        out = m.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        print(type(out.past_key_values).__name__, out.sequences.tolist())
        d = DynamicCache(config=m.config)
        m.generate(ids, max_new_tokens=5, do_sample=False, **cache_kwargs(m, d))
        print(type(d).__name__, d.layers[0].keys.shape[-2])
    """)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("LowRankKVCache") and str(expected.tolist()) in lines[0]
    assert lines[1] == "DynamicCache 44"


def test_checkpoint_projection_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_tiny("llama")
    hf_compress.compress(model, {"kv": {"method": "lowrank", "keep": 0.5},
                                 "calibration": {"nsamples": 6, "seqlen": 32}}, calibration=_calib())
    hf_compress.save_pretrained(model, tmp_path / "ck")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for name, buf in model.hf_compress_kv.named_buffers():
        torch.testing.assert_close(again.hf_compress_kv.get_buffer(name), buf)
    path = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(path)
    bad = {k: v for k, v in tensors.items() if k != "hf_compress_kv.layers.1.v_basis"}
    save_file(bad, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="hf_compress_kv.layers.1.v_basis"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    tensors["hf_compress_kv.layers.1.v_basis"] = tensors["hf_compress_kv.layers.1.v_basis"][:, :1].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")


def test_compress_on_load_data_free_kv(tmp_path):
    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=CompressionConfig(kv="quant4"))
    out = loaded.generate(_ids(1, 20), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, QuantizedKVCache)
    with pytest.raises(ConfigError, match="calibration"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=CompressionConfig(kv="lowrank:0.5"))


# ------------------------------------------------------------------------------------------ config, CLI, bad input
def test_config_specs_and_errors():
    cfg = CompressionConfig(kv="snapkv:0.25")
    assert cfg.kv == {"method": "snapkv", "keep": 0.25, "window": 32, "kernel": 7, "schedule": "uniform"}
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    assert kv.parse_kv_spec("quant2")["bits"] == 2 and kv.parse_kv_spec("lowrank:0.5")["keep"] == 0.5
    assert kv.parse_kv_spec('{"method": "gear", "rank": 4}')["rank"] == 4
    assert set(kv.available_kv_methods()) == {"quant", "gear", "lowrank", "xkv", "snapkv"}
    with pytest.raises(ConfigError, match="'h2o'"):
        CompressionConfig(kv={"method": "h2o"})
    with pytest.raises(ConfigError, match="nbits"):
        CompressionConfig(kv={"method": "quant", "nbits": 4})
    with pytest.raises(ConfigError, match="quant3"):
        CompressionConfig(kv="quant3")
    with pytest.raises(ConfigError, match="bits"):
        CompressionConfig(kv={"method": "quant", "bits": 5})
    with pytest.raises(ConfigError, match="keep"):
        CompressionConfig(kv="snapkv:1.5")
    with pytest.raises(ConfigError, match="ratio"):
        CompressionConfig()  # still: no weight method, no kv


def test_rank_and_projection_mismatch_errors():
    model = make_tiny("llama")
    with pytest.raises(ConfigError, match="kv_heads x head_dim"):
        calibrate_projections(model, _calib(), rank=25)
    with pytest.raises(ConfigError, match="larger"):
        hf_compress.compress(model, {"kv": {"method": "lowrank", "rank": 99}}, calibration=_calib())
    with pytest.raises(ConfigError, match="larger than the group"):
        XKVCache(model.config, group=2, rank=49)
    proj = calibrate_projections(model, _calib(), keep=0.5)
    other = make_tiny("llama")
    other.config.num_key_value_heads = 4
    with pytest.raises(ConfigError, match="another model"):
        LowRankKVCache(other, projections=proj)
    with pytest.raises(ConfigError, match="calibration"):
        hf_compress.compress(make_tiny("llama"), {"kv": "lowrank:0.5"})


def test_unsupported_layouts():
    # MLA
    model = make_tiny("llama")
    model.config.kv_lora_rank = 16
    with pytest.raises(ConfigError, match="latent attention"):
        QuantizedKVCache(model.config)
    # a real sliding window passes through, uncompressed and exact
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=8)
    torch.manual_seed(0)
    mistral = MistralForCausalLM(cfg).eval()
    cache = QuantizedKVCache(mistral.config, bits=2, group_size=8, residual=4)
    assert cache.passthrough == [0, 1] and isinstance(cache.layers[0], DynamicSlidingWindowLayer)
    ids = _ids(1, 30)
    ref = mistral.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(mistral.generate(ids, max_new_tokens=5, do_sample=False, **cache_kwargs(mistral, cache)), ref)
    # a window that never slides within max_position_embeddings is compressed, and guarded
    wide = make_tiny("mistral")
    wide.config.sliding_window = 64
    cache = QuantizedKVCache(wide.config, bits=8, group_size=8, residual=4)
    assert not cache.passthrough
    with pytest.raises(ConfigError, match="sliding-window"):
        wide.generate(_ids(1, 60), max_new_tokens=8, do_sample=False, **cache_kwargs(wide, cache))
    # eviction reads queries through the AttentionInterface: any model dispatching through it works (GPT-2: no
    # q_proj, no RoPE), other attention implementations are refused by name
    from types import SimpleNamespace

    from conftest import make_tiny as mk
    gpt2 = mk("gpt2")
    ids = _ids()
    full = EvictionKVCache(gpt2, keep=1.0, window=4)
    torch.testing.assert_close(_split_logits(gpt2, ids, full), _reference(gpt2, ids), atol=1e-5, rtol=0)
    half = EvictionKVCache(gpt2, keep=0.5, window=4)
    _split_logits(gpt2, ids, half)
    assert [layer.stored_length() for layer in half.compressed_layers] == [25] * len(half.compressed_layers)
    with pytest.raises(ConfigError, match="flash_attention_2"):
        EvictionKVCache(SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2")))


def test_cli_compress_and_eval(tmp_path, tiny_tokenizer, capsys):
    from hf_compress.cli import main

    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    text = tmp_path / "t.txt"
    from importlib import resources
    text.write_text(resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt").read_text())
    assert main(["compress", str(tmp_path / "dense"), "-o", str(tmp_path / "q"), "--kv", "quant4"]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["base_config"]["quantization_config"]["kv"]["bits"] == 4
    assert main(["eval", str(tmp_path / "q"), "--text", str(text), "--kv", "default", "--kv-context", "40",
                 "--kv-continuation", "8", "--kv-windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "DynamicCache: perplexity" in out and "bytes/token ratio" in out
    assert main(["info", str(tmp_path / "q")]) == 0
    assert 'KV cache (used by generate() by default): {"method": "quant", "bits": 4' in capsys.readouterr().out
    assert main(["compress", str(tmp_path / "dense"), "-o", str(tmp_path / "x"), "--kv", "nope"]) == 2
    assert not os.path.exists(tmp_path / "x")
    # a budget: per-layer widths calibrated on --calib, recorded in the checkpoint
    budget = '{"method": "quant", "bits": 4, "group_size": 8, "residual": 4, "avg_bits": 3.5}'
    assert main(["compress", str(tmp_path / "dense"), "-o", str(tmp_path / "x"), "--kv", budget]) == 2
    assert not os.path.exists(tmp_path / "x")  # no calibration text: refused, nothing written
    _tiny_llama_hd16().save_pretrained(tmp_path / "dense16")  # head_dim 16: 3-bit codes pack
    tiny_tokenizer.save_pretrained(tmp_path / "dense16")
    assert main(["compress", str(tmp_path / "dense16"), "-o", str(tmp_path / "m"), "--kv", budget, "--calib",
                 str(text), "--nsamples", "4", "--seqlen", "32"]) == 0
    widths = json.loads((tmp_path / "m" / "config.json").read_text())["base_config"]["quantization_config"]["kv"]
    assert sorted(widths["layer_bits"]["k"] + widths["layer_bits"]["v"]) == [3, 3, 4, 4]


@pytest.mark.parametrize("opts", [{"bits": 4, "group_size": 8, "residual": 4},
                                  {"bits": 2, "group_size": 8, "residual": 4, "flush": 16, "rank": 2, "outliers": 0.02},
                                  {"bits": 4, "value_bits": 2, "group_size": 8, "residual": 4, "value_flush": 1}],
                         ids=["quant4", "gear", "value_flush"])
def test_dense_copy_reads_the_same_and_only_it_holds_a_copy(opts):
    """dense_copy keeps the quantized tokens dequantized (fast reads); without it reads dequantize the codes. The
    logits are identical, and only the copy's cache holds more than its codes at run time."""
    model = make_tiny("llama")
    ids = _ids(2, 40)
    plain, copy = QuantizedKVCache(model.config, **opts), QuantizedKVCache(model.config, **opts, dense_copy=True)
    assert torch.equal(_split_logits(model, ids, plain, split=20), _split_logits(model, ids, copy, split=20))
    for layer in plain.compressed_layers:  # beyond the codes, only the value codes made ahead for window tokens
        ahead = layer._coded("v") - layer.quantized["v"]
        assert layer.runtime_nbytes() == layer.nbytes() + ahead * sum(t[..., :1, :].nbytes for t in
                                                                      (layer.vq, layer.vs, layer.vm))
    assert all(layer.runtime_nbytes() > layer.nbytes() for layer in copy.compressed_layers)
    assert kv.cache_nbytes(plain) == kv.cache_nbytes(copy)
    with pytest.raises(ConfigError, match="dense_copy"):
        QuantizedKVCache(model.config, dense_copy="yes")
