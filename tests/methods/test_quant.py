"""Weight quantization: packed layout, rtn / hqq / gptq against their formulas, EoRA optimality, QuantLinear and
QuantLowRankLinear forward, save/load (fresh process), compress-on-load, bad input."""

import json

import pytest
import torch

import hf_compress
from conftest import make_tiny, output_of, run_python
from hf_compress import CompressionConfig
from hf_compress.calibration import LayerStats
from hf_compress.errors import CheckpointError, ConfigError
from hf_compress.kernels import dequantize, pack, packed_words, quant_linear, unpack
from hf_compress.methods import get_method
from hf_compress.methods.eora import eora_factors
from hf_compress.methods.linalg import whitening
from hf_compress.methods.quantlib import grouped
from hf_compress.modules import QuantLinear, QuantLowRankLinear


def _w(out=24, inp=80, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    if heavy:  # a few outliers, like real weights
        w = w * (1 + 6 * (torch.rand(out, inp, generator=g) < 0.01))
    return w


def _stats(inp, n=400, seed=1):
    """Correlated inputs with channels of very different scale (what makes GPTQ/EoRA differ from RTN/SVD)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    x = (torch.randn(n, inp, generator=g) @ mix) * torch.logspace(-1, 1, inp)[torch.randperm(inp, generator=g)]
    st = LayerStats()
    st.add(x)
    return st, x.double()


def _out_err(w, w_hat, x):
    return float(((x @ (w.double() - w_hat.double()).T) ** 2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 31, 64, 77, 128])
def test_pack_unpack_roundtrip_and_density(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), generator=torch.Generator().manual_seed(n))
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, -(-n * bits // 32)) == (5, packed_words(n, bits))
    assert torch.equal(unpack(words, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 31, 33, 64, 77, 576, 1537])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_pack_equals_the_word_arithmetic_definition(bits, n, dtype):
    # the byte-level fast path against the int64 word arithmetic that spells the layout out: every word equal
    from hf_compress.kernels.reference.weights import _pack_words

    codes = torch.randint(0, 2**bits, (6, n), generator=torch.Generator().manual_seed(bits * 1000 + n)).to(dtype)
    codes[0] = 2**bits - 1  # all bits set, including the straddling ones of 3-bit
    fast, ref = pack(codes, bits), _pack_words(codes, bits)
    assert fast.dtype == ref.dtype == torch.int32 and torch.equal(fast, ref)


def test_pack_bit_positions():
    # 3-bit codes 0..10 -> code k at bits [3k, 3k+3); code 10 straddles words 0 and 1
    codes = torch.tensor([[7] * 10 + [5]])
    words = pack(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert int(words[0, 0]) == (2**30 - 1) | (1 << 30)  # ten 0b111, then the low bits 0b01 of 0b101 at bits 30-31
    assert int(words[0, 1]) == 0b1  # and its high bit in the next word
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[8]]), 3)


def test_dequantize_formula_with_partial_group():
    q = torch.randint(0, 16, (3, 50))
    s, z = torch.rand(3, 2).half() + 0.1, (torch.rand(3, 2) * 15).half()
    w = dequantize(pack(q, 4), s, z, 4, 32, 50)
    ref = torch.stack([(q[:, k] - z[:, k // 32].float()) * s[:, k // 32].float() for k in range(50)], 1)
    assert w.shape == (3, 50) and torch.allclose(w, ref, atol=0, rtol=0)


@pytest.mark.parametrize("bits,g", [(4, 16), (3, 32), (2, 32), (8, 64)])
def test_rtn_is_round_to_nearest_on_the_minmax_grid(bits, g):
    w = _w()
    q = get_method("rtn")(integer_zero=False).quantize(w, bits, g, scale_dtype=torch.float16)
    wg = grouped(w, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / (2**bits - 1)).half().float()
    assert torch.allclose(q.scales, s, rtol=1e-3)
    err = (q.dequantize(w.shape[1]) - w).abs().view(w.shape[0], -1)
    bound = q.scales.repeat_interleave(g, 1)[:, : w.shape[1]] * 0.5
    # half a step, plus what the fp16 zero point can shift the grid by
    assert (err <= bound * 1.01 + q.scales.repeat_interleave(g, 1)[:, : w.shape[1]] * 2e-3).all()


@pytest.mark.parametrize("bits,g", [(4, 16), (3, 32), (2, 32), (8, 64)])
def test_rtn_integer_zero_is_the_classic_asymmetric_grid(bits, g):
    """Default RTN: range widened to contain 0, integer zero point, q = clamp(round(w/s) + z)."""
    w = _w(24, 128, heavy=True)
    q = get_method("rtn")().quantize(w, bits, g, scale_dtype=torch.float16)
    maxq = 2**bits - 1
    wg = w.view(w.shape[0], -1, g)
    lo, hi = wg.amin(-1, keepdim=True).clamp_max(0), wg.amax(-1, keepdim=True).clamp_min(0)
    s = ((hi - lo) / maxq).half().float()
    z = (-lo / s).round()
    ref = (((wg / s).round() + z).clamp(0, maxq) - z) * s
    assert torch.allclose(q.dequantize(w.shape[1]), ref.view_as(w), atol=1e-6)
    assert torch.equal(q.zeros, q.zeros.round())
    zero_cols = torch.zeros(3, 2 * g)
    assert (get_method("rtn")().quantize(zero_cols, bits, g, scale_dtype=torch.float16).dequantize(2 * g) == 0).all()


@pytest.mark.parametrize("bits,g", [(2, 32), (3, 64), (4, 32)])
@pytest.mark.parametrize("integer_zero", [False, True])
def test_hqq_never_worse_than_rtn_per_group(bits, g, integer_zero):
    """Each step keeps only improvements, starting from the min-max grid of the same family (float / integer zero)."""
    w = _w(heavy=True)
    rtn = get_method("rtn")(integer_zero=integer_zero).quantize(w, bits, g, scale_dtype=torch.float16)
    hqq = get_method("hqq")(integer_zero=integer_zero).quantize(w, bits, g, scale_dtype=torch.float16)
    def group_err(q):
        d = torch.nn.functional.pad(w - q.dequantize(w.shape[1]), (0, -w.shape[1] % g))  # partial group: pad 0
        return d.view(w.shape[0], -1, g).square().sum(-1)

    e_rtn, e_hqq = group_err(rtn), group_err(hqq)
    assert (e_hqq <= e_rtn * (1 + 1e-6)).all()
    # and better overall on heavy-tailed weights (less room with the zero pinned to the integer grid)
    assert e_hqq.sum() < (0.97 if integer_zero else 0.9) * e_rtn.sum()


def test_gptq_with_identity_hessian_is_rtn():
    """No input correlation: nothing to propagate, so GPTQ (min-max grid, no reordering) must equal RTN."""
    w = _w()
    st = LayerStats(gram=torch.eye(80, dtype=torch.float64) * 10, count=10)
    a = get_method("gptq")(grid="minmax", act_order=False, damp=0.0).quantize(w, 3, 16, st, torch.float16)
    # (both default to the integer-zero grid)
    b = get_method("rtn")().quantize(w, 3, 16, scale_dtype=torch.float16)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("act_order,factor", [(False, 0.85), (True, 0.6)])
def test_gptq_lowers_output_error(act_order, factor):
    w = _w(heavy=True)
    st, x = _stats(80)
    rtn = get_method("rtn")().quantize(w, 3, 16, scale_dtype=torch.float16).dequantize(80)
    gq = get_method("gptq")(act_order=act_order).quantize(w, 3, 16, st, torch.float16).dequantize(80)
    assert _out_err(w, gq, x) < factor * _out_err(w, rtn, x)


def _obq_reference(w, gram, bits, g):
    """GPTQ as the paper writes it (no blocking, no Cholesky): quantize column i, spread its error with the inverse
    Hessian, then remove i from the inverse Hessian (Schur complement); a group's grid is set from its current
    weights when its first column comes up."""
    from hf_compress.methods.quantlib import minmax

    w = w.double().clone()
    h = gram.double() / 1.0
    h += 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % g == 0:
            s, z = minmax(w[:, None, i : i + g].float(), bits, torch.float16, integer_zero=True)
            s, z = s[:, 0].double(), z[:, 0].double()
        q = ((w[:, i] / s + z).round().clamp(0, 2**bits - 1) - z) * s
        out[:, i] = q
        e = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= e[:, None] * hinv[i, i:][None]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return out


def test_gptq_matches_the_paper_formula():
    w = _w(12, 48, seed=7)
    st, x = _stats(48, seed=8)
    st = LayerStats(gram=st.gram / st.count, count=1)
    got = get_method("gptq")(grid="minmax", act_order=False, block_size=32).quantize(w, 3, 16, st, torch.float16)
    ref = _obq_reference(w, st.gram, 3, 16)
    assert (got.dequantize(48).double() - ref).abs().max() < 1e-3
    assert _out_err(w, got.dequantize(48), x) == pytest.approx(_out_err(w, ref, x), rel=1e-4)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_eora_attains_the_whitened_optimum(rank):
    """‖X(E − UV)ᵀ‖² equals the tail energy of E·S (S Sᵀ = XᵀX), and beats plain SVD of E at the same rank."""
    st, x = _stats(40, seed=3)
    e = _w(16, 40, seed=4)
    u, v = eora_factors(e, rank, st.gram)
    s, _ = whitening(st.gram)
    tail = float(torch.linalg.svdvals(e.double() @ s)[rank:].square().sum())
    assert _out_err(e, u @ v, x) == pytest.approx(tail, rel=1e-4)
    pu, pv = eora_factors(e, rank, None)
    assert _out_err(e, u @ v, x) < _out_err(e, pu @ pv, x)
    full_u, full_v = eora_factors(e, 16, st.gram)
    assert torch.allclose(full_u @ full_v, e, atol=1e-4)


def test_quantlinear_forward_matches_dense_reference():
    w, b = _w(24, 50), torch.randn(24)
    q = get_method("rtn")().quantize(w, 4, 32, scale_dtype=torch.float16)
    u, v = torch.randn(24, 3), torch.randn(3, 50)
    m = QuantLinear.from_codes(pack(q.codes, 4), q.scales.half(), q.zeros.half(), 4, 32, 50, b, u, v)
    x = torch.randn(2, 5, 50)
    ref = x @ (q.dequantize(50) + u @ v).T + b
    assert torch.allclose(m(x), ref, atol=1e-5)
    assert torch.allclose(m.weight, q.dequantize(50) + u @ v, atol=1e-6)
    dense = m.to_dense()
    assert isinstance(dense, torch.nn.Linear) and torch.allclose(dense(x), ref, atol=1e-5)
    # in 50, g 32: 4-bit codes of 50 columns in 7 words + 2 groups (one partial) of fp16 scale and zero,
    # + rank-3 fp32 factors
    assert m.bits_per_weight == pytest.approx((7 * 32 + 2 * 32 + 3 * 74 * 32 / 24) / 50)


def test_true_bits_per_weight_4bit_g128():
    m = QuantLinear(576, 64, 4, 128)
    assert m.bits_per_weight == pytest.approx(4 + 5 * 32 / 576)  # 4.5 groups of 128: the last one partial
    assert QuantLinear(512, 64, 4, 128).bits_per_weight == pytest.approx(4.25)
    assert QuantLinear(512, 64, 3, 64).bits_per_weight == pytest.approx(3.5)


def test_constant_tiny_and_huge_groups_get_finite_scales():
    w = torch.cat([torch.zeros(2, 32), torch.full((2, 32), 1000.0), torch.full((2, 32), 1e-9),
                   torch.linspace(5.0, 5.001, 64).view(2, 32)], 0)
    for name, kw in (("rtn", {"integer_zero": False}), ("rtn", {}), ("hqq", {}), ("hqq", {"integer_zero": True})):
        q = get_method(name)(**kw).quantize(w, 4, 32, scale_dtype=torch.float16)
        assert torch.isfinite(q.scales).all() and (q.scales > 0).all() and torch.isfinite(q.zeros).all()
        err = (q.dequantize(32) - w).abs()
        assert err[:2].max() == 0
        assert torch.allclose(q.dequantize(32)[2:4], w[2:4], rtol=1e-3)
        assert err[4:6].max() < 1e-8 and err[6:].max() < 5e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_8bit_rtn_is_close_to_dense(arch, ids):
    dense = make_tiny(arch)
    ref = output_of(dense, ids)
    hf_compress.compress(dense, {"method": "rtn", "bits": 8, "group_size": 32}, progress=False)
    assert torch.allclose(output_of(dense, ids), ref, atol=2e-2 * ref.abs().max())


def _calib_ids(n=8, seqlen=24):
    return torch.randint(3, 96, (n, seqlen), generator=torch.Generator().manual_seed(5))


def test_calibrated_gptq_and_eora_beat_rtn_on_the_model(ids):
    """Sequential GPTQ with EoRA: logits closer to dense than RTN; EoRA helps both."""
    ref = output_of(make_tiny("llama"), ids)
    errs = {}
    for key, cfg in {"rtn": {"method": "rtn"}, "rtn+eora": {"method": "rtn", "eora_rank": 8},
                     "gptq": {"method": "gptq"}, "gptq+eora": {"method": "gptq", "eora_rank": 8}}.items():
        m = make_tiny("llama")
        hf_compress.compress(m, {**cfg, "bits": 2, "group_size": 16, "calibration": {"nsamples": 8, "seqlen": 24}},
                             calibration=_calib_ids(), progress=False)
        errs[key] = float((output_of(m, ids) - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"] and errs["rtn+eora"] < errs["rtn"] and errs["gptq+eora"] < errs["gptq"], errs


def _layer_out_err(model, dense, name, x):
    return _out_err(dense.get_submodule(name).weight.detach(), model.get_submodule(name).weight.detach(), x)


def test_quantized_eora_factors_are_packed_close_and_truncate_exactly(ids):
    """EoRA factors stored as packed codes: the forward equals x·(dequant(Q) + Û·V̂)ᵀ; 8-bit factors stay within
    1% of the float factors' product; 4-bit factors keep most of the gain over no EoRA on the calibration inputs;
    bits per weight count the packed factor rows; truncating a rank-6 layer to 3 equals compressing at rank 3."""
    calib = {"nsamples": 8, "seqlen": 24}
    base = {"method": "gptq", "bits": 2, "group_size": 16, "calibration": calib}
    made = {}
    for key, extra in {"none": {}, "float": {"eora_rank": 6}, "q8": {"eora_rank": 6, "eora_factor_bits": 8},
                       "q4": {"eora_rank": 6, "eora_factor_bits": 4, "eora_factor_group_size": 16},
                       "q4r3": {"eora_rank": 3, "eora_factor_bits": 4, "eora_factor_group_size": 16}}.items():
        made[key] = make_tiny("llama")
        hf_compress.compress(made[key], {**base, **extra}, calibration=_calib_ids(), progress=False)
    name = "model.layers.0.self_attn.q_proj"  # block 0's first inputs: the same calibration inputs in every run
    q4, fl = made["q4"].get_submodule(name), made["float"].get_submodule(name)
    assert q4.U is None and q4.factor_bits == 4 and q4.rank == 6 and "U" not in dict(q4.named_parameters())
    x = torch.randn(2, 3, q4.in_features)
    u, v = q4.factors(torch.float32)
    assert torch.allclose(q4(x), x @ (q4.dequantized() + u @ v).T, atol=1e-5)
    with torch.no_grad():  # inference: the factors are dequantized once and kept, and rebuilt when a buffer changes
        for scale in (1.0, 2.0):
            q4.V_scales.mul_(scale)
            uq, vq = q4.factors(torch.float32)
            ref = x @ (q4.dequantized() + uq @ vq).T
            assert (q4(x) - ref).abs().max() < 3e-2 * ref.abs().max()  # the CPU path: bf16 activations
            assert torch.equal(q4._factor_cache["factors"][1], vq)
        q4.V_scales.div_(2.0)
    assert torch.equal(q4.qweight, fl.qweight)  # the same GPTQ codes underneath
    u8, v8 = made["q8"].get_submodule(name).factors(torch.float32)
    ref = fl.U @ fl.V
    assert (u8 @ v8 - ref).norm() < 0.01 * ref.norm()
    # on the layer's own calibration inputs
    dense = make_tiny("llama")
    acts = []
    h = dense.get_submodule(name).register_forward_hook(lambda m, i, o: acts.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        dense(_calib_ids())
    h.remove()
    xa = acts[0].double()
    e_none, e_fl, e_q4 = (_layer_out_err(made[k], dense, name, xa) for k in ("none", "float", "q4"))
    assert e_fl < e_q4 < e_none and (e_none - e_q4) > 0.7 * (e_none - e_fl), (e_none, e_fl, e_q4)
    # bits: per rank, a Uᵀ row (out=48 4-bit codes in 6 words + 3 groups of fp16 scale/zero) and a V row (same)
    assert q4.rank_bits == 2 * (6 * 32 + 3 * 32)
    main = (q4.qweight.numel() * 32 + q4.scales.numel() * 32) / (48 * 48)
    assert q4.bits_per_weight == pytest.approx(main + 6 * q4.rank_bits / (48 * 48))
    q4.truncate_rank(3)
    r3 = made["q4r3"].get_submodule(name)
    for k in ("U_qweight", "U_scales", "U_zeros", "V_qweight", "V_scales", "V_zeros"):
        assert torch.equal(getattr(q4, k), getattr(r3, k)), k
    q4.truncate_rank(0)
    assert q4.rank == 0 and q4.factor_bits == 0 and "U_qweight" not in dict(q4.named_buffers())
    assert torch.allclose(q4(x), x @ q4.dequantized().T, atol=1e-5)


def _uneven_tiny():
    """A tiny Llama whose layers differ in scale, as real layers do (so their quantization errors differ)."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(4.0)
        model.model.layers[1].self_attn.k_proj.weight.mul_(0.25)
    return model


def _eora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _residual_energy(model, dense) -> float:
    """Σ over layers of ‖W − dequant(Q) − U·V‖² (what data-free EoRA minimises)."""
    total = 0.0
    with torch.no_grad():
        for n, m in _eora_layers(model).items():
            total += float((dense.get_submodule(n).weight.double() - m.weight.double()).square().sum())
    return total


@pytest.mark.parametrize("uniform_rank", [1, 3])
def test_eora_budget_spends_at_most_the_budget_and_beats_uniform_ranks(uniform_rank):
    dense = _uneven_tiny()
    uni = _uneven_tiny()
    hf_compress.compress(uni, {"method": "rtn", "bits": 2, "group_size": 16, "eora_rank": uniform_rank}, progress=False)
    layers = _eora_layers(uni)
    weights = sum(m.out_features * m.in_features for m in layers.values())
    uni_bits = sum(32 * m.rank * (m.out_features + m.in_features) for m in layers.values())
    budget = uni_bits / weights  # the budget that one uniform rank spends exactly

    model = _uneven_tiny()
    hf_compress.compress(model, {"method": "rtn", "bits": 2, "group_size": 16, "eora_bits": budget}, progress=False)
    layers = _eora_layers(model)
    factor_bits = sum(32 * m.rank * (m.out_features + m.in_features) for m in layers.values())
    largest_step = max(32 * (m.out_features + m.in_features) for m in layers.values())
    assert budget * weights - largest_step < factor_bits <= budget * weights
    ranks = {n: m.rank for n, m in layers.items()}
    assert len(set(ranks.values())) > 1, ranks  # per-layer ranks, not one rank
    # the factors kept are the top singular triplets of each layer's error (truncated SVD at the chosen rank)
    name = max(ranks, key=ranks.get)
    layer = layers[name]
    with torch.no_grad():
        err = dense.get_submodule(name).weight.double() - layer.dequantized(torch.float64)
        tail = float(torch.linalg.svdvals(err)[layer.rank:].square().sum())
        resid = float((err - layer.U.double() @ layer.V.double()).square().sum())
    assert resid == pytest.approx(tail, rel=1e-4)
    # at the same bits, the budgeted allocation leaves less error than one uniform rank
    assert _residual_energy(model, dense) < 0.98 * _residual_energy(uni, dense)
    assert ranks["model.layers.0.mlp.down_proj"] > uniform_rank > ranks["model.layers.1.self_attn.k_proj"]


def test_eora_budget_with_calibration_and_zero_rank_layers(ids, tmp_path):
    model = make_tiny("llama")
    cfg = {"method": "gptq", "bits": 2, "group_size": 16, "eora_bits": 0.3, "calibration": {"nsamples": 8, "seqlen": 24}}
    hf_compress.compress(model, cfg, calibration=_calib_ids(), progress=False)
    ranks = {n: m.rank for n, m in _eora_layers(model).items()}
    assert sum(ranks.values()) > 0
    hf_compress.save_pretrained(model, tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {n: m.rank for n, m in _eora_layers(again).items()} == ranks
    assert torch.equal(output_of(again, ids), output_of(model, ids))


def test_lowrank_with_quantized_factors(ids):
    lr = make_tiny("llama")
    hf_compress.compress(lr, {"method": "svd", "ratio": 0.3}, progress=False)
    both = make_tiny("llama")
    hf_compress.compress(both, {"method": "svd", "ratio": 0.3, "bits": 8, "group_size": 16}, progress=False)
    layer = both.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLowRankLinear) and layer.rank == lr.model.layers[0].mlp.down_proj.rank
    ref = lr.model.layers[0].mlp.down_proj.weight
    assert (layer.weight - ref).abs().max() < 0.02 * ref.abs().max()
    assert layer.bits_per_weight < 0.5 * 32 * (1 - 0.3)
    a, b = output_of(lr, ids), output_of(both, ids)
    assert torch.allclose(a, b, atol=0.05 * a.abs().max())


def test_lowrank_factors_gptq_with_calibration():
    cfg = {"method": "svd_llm", "ratio": 0.3, "bits": 4, "group_size": 16, "calibration": {"nsamples": 8, "seqlen": 24}}
    m = make_tiny("llama")
    hf_compress.compress(m, cfg, calibration=_calib_ids(), progress=False)
    assert isinstance(m.model.layers[1].self_attn.o_proj, QuantLowRankLinear)
    with pytest.raises(ConfigError, match="needs calibration"):
        hf_compress.compress(make_tiny("llama"), {"method": "svd", "ratio": 0.3, "bits": 4, "quantizer": "gptq"})


@pytest.mark.parametrize("cfg", [
    {"method": "hqq", "bits": 3, "group_size": 32, "eora_rank": 4},
    {"method": "rtn", "bits": 2, "group_size": 20},
    {"method": "svd", "ratio": 0.25, "bits": 4, "group_size": 16},
    {"method": "rtn", "bits": 2, "group_size": 16, "eora_bits": 1.0},
    {"method": "rtn", "bits": 3, "group_size": 16, "eora_bits": 1.0, "eora_factor_bits": 4, "eora_factor_group_size": 32},
], ids=["hqq3+eora", "rtn2-padded", "svd+q4", "rtn2+eora-budget", "rtn3+eora-budget-q4factors"])
def test_fresh_process_roundtrip(cfg, ids, tmp_path):
    model = make_tiny("llama")
    hf_compress.compress(model, cfg, progress=False)
    hf_compress.save_pretrained(model, tmp_path)
    torch.save({"ids": ids, "logits": output_of(model, ids)}, tmp_path / "ref.pt")
    run_python(f"""
        import torch, hf_compress
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        with torch.no_grad():
            out = m(input_ids=ref["ids"]).logits
        assert torch.equal(out, ref["logits"]), (out - ref["logits"]).abs().max()
        assert type(m).__name__ == "LlamaForCausalLM"
    """)


def test_compress_on_load_rtn_and_dequantize(ids, tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    cfg = CompressionConfig(method="rtn", bits=4, group_size=16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=cfg)
    direct = make_tiny("llama")
    hf_compress.compress(direct, {"method": "rtn", "bits": 4, "group_size": 16}, progress=False)
    assert torch.equal(output_of(loaded, ids), output_of(direct, ids))
    before = output_of(loaded, ids)
    loaded.dequantize()
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert torch.allclose(output_of(loaded, ids), before, atol=1e-5)
    with pytest.raises(ConfigError, match="calibration"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense",
                                             quantization_config=CompressionConfig(method="gptq", bits=4))


@pytest.mark.parametrize("cfg,match", [
    ({"method": "rtn", "bits": 5}, "bits must be one of"),
    ({"method": "rtn"}, "give bits"),
    ({"method": "rtn", "bits": 4, "group_size": 0}, "group_size"),
    ({"method": "gptq", "bits": 4, "ratio": 0.2}, "eora_rank"),
    ({"method": "svd", "ratio": 0.2, "eora_rank": 4}, "eora_rank compensates"),
    ({"method": "rtn", "bits": 3, "eora_rank": 4, "eora_bits": 0.5}, "not both"),
    ({"method": "rtn", "bits": 3, "eora_bits": 0}, "eora_bits must be a positive"),
    ({"method": "svd", "ratio": 0.2, "eora_bits": 0.5}, "eora_bits budgets"),
    ({"method": "rtn", "bits": 3, "eora_factor_bits": 4}, "give it with eora_rank or eora_bits"),
    ({"method": "rtn", "bits": 3, "eora_rank": 4, "eora_factor_bits": 5}, "eora_factor_bits must be one of"),
    ({"method": "rtn", "bits": 3, "eora_rank": 4, "eora_factor_bits": 4, "eora_factor_group_size": 0},
     "eora_factor_group_size"),
    ({"method": "hqq", "bits": 4, "method_kwargs": {"lp": 3}}, "lp"),
])
def test_bad_config(cfg, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig(**cfg)


@pytest.mark.parametrize("field,value,tensor", [("bits", 3, "qweight"), ("factor_bits", 2, "U_qweight")])
def test_packed_shape_contradicting_config_names_the_tensor(tmp_path, field, value, tensor):
    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16, "eora_rank": 2, "eora_factor_bits": 4},
                         progress=False)
    hf_compress.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["base_config"]["quantization_config"]["modules"]["model.layers.1.mlp.up_proj"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM

    with pytest.raises(CheckpointError, match=rf"model\.layers\.1\.mlp\.up_proj\.{tensor}"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_quant_linear_op_matches_dense_in_half_precision():
    w = _w(16, 64)
    q = get_method("rtn")().quantize(w, 4, 32, scale_dtype=torch.float16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = quant_linear(x, pack(q.codes, 4), q.scales.half(), q.zeros.half(), 4, 32, 64)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x.float() @ q.dequantize(64).T, atol=0.1, rtol=0.02)


# ------------------------------------------------------------------ activation-aware grids (grid="mse-act")
def _act_group_err(w, q, h, g):
    """Per group Σ_j h_j (w_j − ŵ_j)² (partial last group padded with 0)."""
    d = (w - q.dequantize(w.shape[1])).square() * h[None, :]
    return torch.nn.functional.pad(d, (0, -w.shape[1] % g)).view(w.shape[0], -1, g).sum(-1)


@pytest.mark.parametrize("inp,g", [(80, 16), (77, 32)])
def test_mse_act_grid_is_the_brute_force_argmin_of_the_weighted_error(inp, g):
    """rtn grid='mse-act': per group, the shrink factor (of the min-max range, 20 values in [0.5, 1]) whose grid has the
    lowest Σ_j h_jj (w_j − ŵ_j)², h the Gram diagonal — checked against an explicit loop over the candidates."""
    from hf_compress.methods.quantlib import minmax

    w = _w(24, inp, heavy=True)
    st, x = _stats(inp)
    h = (x.square().sum(0) / x.shape[0]).float()
    q = get_method("rtn")(grid="mse-act").quantize(w, 3, g, st, torch.float16)
    wg = grouped(w, g)
    errs, grids = [], []
    for k in range(20):
        s, z = minmax(wg, 3, torch.float16, 1.0 - 0.5 * k / 19, integer_zero=True)
        d = (((wg / s[..., None] + z[..., None]).round().clamp(0, 7) - z[..., None]) * s[..., None]).reshape(24, -1)
        cand = (w - d[:, :inp]).square() * h[None, :]
        errs.append(torch.nn.functional.pad(cand, (0, -inp % g)).view(24, -1, g).sum(-1))
        grids.append(s)
    best = torch.stack(errs).argmin(0)  # first minimum, as the search keeps only strict improvements
    ref_scale = torch.stack(grids).gather(0, best[None]).squeeze(0)
    assert torch.allclose(_act_group_err(w, q, h, g), torch.stack(errs).amin(0), rtol=1e-4, atol=1e-7)
    assert torch.equal(q.scales, ref_scale)


@pytest.mark.parametrize("method,kwargs", [("rtn", {"grid": "mse-act"}), ("hqq", {"act_weighted": True})])
def test_act_weighted_grids_never_worse_than_minmax_on_the_weighted_error(method, kwargs):
    """Both start from the min-max grid and keep only improvements of Σ h (w − ŵ)², group by group; on inputs whose
    channels differ 100x in scale they lower the layer's output error too."""
    w = _w(24, 80, heavy=True)
    st, x = _stats(80)
    h = (x.square().sum(0) / x.shape[0]).float()
    base = get_method("rtn")().quantize(w, 3, 16, scale_dtype=torch.float16)
    act = get_method(method)(**kwargs).quantize(w, 3, 16, st, torch.float16)
    assert (_act_group_err(w, act, h, 16) <= _act_group_err(w, base, h, 16) * (1 + 1e-5) + 1e-9).all()
    assert _out_err(w, act.dequantize(80), x) < _out_err(w, base.dequantize(80), x)


def test_gptq_mse_act_with_white_inputs_is_gptq_mse():
    """With equal Gram diagonals every channel weighs the same: the weighted search picks the plain search's grids."""
    w = _w(heavy=True)
    st = LayerStats(gram=torch.eye(80, dtype=torch.float64) * 10, count=10)
    a = get_method("gptq")(grid="mse-act").quantize(w, 3, 16, st, torch.float16)
    b = get_method("gptq")(grid="mse").quantize(w, 3, 16, st, torch.float16)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


def test_gptq_mse_act_lowers_the_output_error_of_gptq_mse():
    w = _w(heavy=True)
    st, x = _stats(80)
    errs = {grid: _out_err(w, get_method("gptq")(grid=grid).quantize(w, 3, 16, st, torch.float16).dequantize(80), x)
            for grid in ("mse", "mse-act")}
    assert errs["mse-act"] < errs["mse"], errs


@pytest.mark.parametrize("method,kwargs", [("rtn", {"grid": "mse-act"}), ("hqq", {"act_weighted": True})])
def test_act_weighted_data_free_methods_need_calibration(method, kwargs, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_compress.pipelines import uses_calibration

    cfg = {"method": method, "bits": 3, "group_size": 16, "method_kwargs": kwargs}
    assert uses_calibration(CompressionConfig(**cfg), calibration_given=False)
    with pytest.raises(ConfigError, match="needs calibration data"):
        hf_compress.compress(make_tiny("llama"), cfg, progress=False)
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ConfigError, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=CompressionConfig(**cfg))
    with pytest.raises(ConfigError, match="needs calibration data"):  # the method itself, called without statistics
        get_method(method)(**kwargs).quantize(_w(), 3, 16, None, torch.float16)
    model = make_tiny("llama")
    hf_compress.compress(model, {**cfg, "calibration": {"nsamples": 8, "seqlen": 24}}, calibration=_calib_ids(),
                         progress=False)
    assert torch.isfinite(output_of(model, ids)).all()


@pytest.mark.parametrize("cfg,match", [
    ({"method": "rtn", "bits": 3, "method_kwargs": {"grid": "mse-weighted"}}, "rtn grid must be one of"),
    ({"method": "gptq", "bits": 3, "method_kwargs": {"grid": "act"}}, "gptq grid must be one of"),
    ({"method": "gptq", "bits": 3, "method_kwargs": {"grid": "mse-act", "min_shrink": 0}}, "min_shrink must be in"),
    ({"method": "rtn", "bits": 3, "method_kwargs": {"grid": "mse", "steps": 1}}, "steps must be an integer >= 2"),
])
def test_bad_grid_config(cfg, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig(**cfg)
