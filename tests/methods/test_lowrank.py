"""LowRankLinear, plain SVD and the rank plan against their references."""

import json
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_compress
from hf_compress import CompressionConfig, LowRankLinear
from hf_compress.allocation import plan_ranks, saves_parameters, uniform_rank
from hf_compress.methods.svd import balanced_truncated_svd
from hf_compress.targets import find_targets, matches

from conftest import make_tiny


def test_not_an_nn_linear_subclass():
    # PEFT's default dispatcher would silently take an nn.Linear subclass as a dense layer.
    assert not issubclass(LowRankLinear, nn.Linear)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_formula(dtype, tol, bias):
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g)
    b = torch.randn(7, generator=g) if bias else None
    layer = LowRankLinear.from_factors(u, v, b, dtype=dtype)
    x = torch.randn(2, 4, 5, generator=g)
    expected = (x.double() @ v.double().T) @ u.double().T + (b.double() if bias else 0)
    got = layer(x.to(dtype)).double()
    assert got.shape == (2, 4, 7)
    assert (got - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


def test_svd_is_eckart_young_optimal():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    s = torch.linalg.svdvals(w.double())
    for r in (1, 5, 24):
        u, v = balanced_truncated_svd(w, r)
        assert u.shape == (40, r) and v.shape == (r, 24)
        err = torch.linalg.matrix_norm((u @ v).double() - w.double())
        assert err.item() == pytest.approx(s[r:].pow(2).sum().sqrt().item(), abs=1e-4)
        # balanced split: both factors carry sqrt(sigma)
        assert torch.allclose(u.norm(dim=0), v.norm(dim=1), rtol=1e-4)


def test_uniform_rank_formula_and_dense_fallback():
    assert uniform_rank(100, 100, 0.5) == 25  # (1-0.5)*100*100/200
    r = uniform_rank(576, 1536, 0.2)
    assert r * (576 + 1536) <= 0.8 * 576 * 1536 < (r + 1) * (576 + 1536)
    assert not saves_parameters(10, 10, 5) and saves_parameters(10, 10, 4)
    # a: 5*(10+10) = 100 params, not fewer than 10*10 -> stays dense; b: 5*110 = 550 < 1000 -> low rank
    assert plan_ranks({"a": (10, 10), "b": (100, 10)}, None, 5, dense_fallback=True) == {"a": None, "b": 5}
    assert plan_ranks({"a": (10, 10)}, None, 5, dense_fallback=False) == {"a": 5}


def test_ratio_removes_that_fraction_of_targeted_parameters():
    model = make_tiny("llama")
    targets = find_targets(model, None, [])
    before = sum(m.weight.numel() for m in targets.values())
    hf_compress.compress(model, {"method": "svd", "ratio": 0.4}, progress=False)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    after = sum(m.U.numel() + m.V.numel() for m in layers)
    assert len(layers) == len(targets)
    removed = 1 - after / before
    assert 0.4 <= removed < 0.5  # floor() of each rank can only remove a little more


def test_default_targets_exclude_head_and_embeddings():
    for arch in ("llama", "gpt2", "bert"):
        names = list(find_targets(make_tiny(arch), None, []))
        assert names and not any("lm_head" in n or "embed" in n or "wte" in n or "pooler" in n for n in names)
    assert "transformer.h.0.attn.c_attn" in find_targets(make_tiny("gpt2"), None, [])


def test_pattern_rules():
    assert matches("model.layers.0.self_attn.q_proj", "q_proj")
    assert not matches("model.layers.0.self_attn.q_proj", "proj")
    assert matches("model.layers.0.self_attn.q_proj", "model.layers.*.self_attn.*")
    assert matches("model.layers.10.mlp.up_proj", r"re:model\.layers\.1\d\.mlp\..*")
    model = make_tiny("llama")
    chosen = find_targets(model, ["q_proj", "down_proj"], ["model.layers.1.*"])
    assert set(chosen) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}


def test_gpt2_conv1d_replaced_with_right_orientation():
    model = make_tiny("gpt2")
    conv = model.transformer.h[0].mlp.c_fc
    assert isinstance(conv, Conv1D)
    x = torch.randn(3, 48)
    ref = conv(x)
    hf_compress.compress(model, CompressionConfig(method="svd", rank=48, dense_fallback=False, targets=["c_fc"]), progress=False)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LowRankLinear) and layer.source == "conv1d"
    assert (layer(x) - ref).abs().max().item() <= 1e-5
    back = layer.to_dense()
    assert isinstance(back, Conv1D) and (back(x) - ref).abs().max().item() <= 1e-5


def test_config_is_json_serialisable_roundtrip():
    cfg = CompressionConfig(method="svd", ratio=0.25, targets=["q_proj"], skip=["model.layers.0.*"])
    text = json.dumps(cfg.to_dict())
    again = CompressionConfig.from_dict(json.loads(text))
    assert again == cfg and again.ratio == 0.25 and again.targets == ["q_proj"]
    assert CompressionConfig.coerce(text) == cfg


def test_records_follow_modules_on_save(tmp_path):
    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
    name = "model.layers.0.mlp.up_proj"
    layer = model.get_submodule(name)
    # Change the rank in memory (as an exact adapter merge would): the saved record must follow.
    grown = LowRankLinear.from_factors(torch.cat([layer.U, torch.zeros(layer.out_features, 2)], 1),
                                       torch.cat([layer.V, torch.zeros(2, layer.in_features)], 0), None)
    model.model.layers[0].mlp.up_proj = grown
    model.save_pretrained(tmp_path)
    rec = json.loads((tmp_path / "config.json").read_text())["base_config"]["quantization_config"]["modules"][name]
    assert rec["rank"] == layer.rank + 2


def test_weight_property_is_the_dense_product():
    layer = LowRankLinear.from_factors(torch.randn(6, 2), torch.randn(2, 4), None)
    assert torch.allclose(layer.weight, layer.U @ layer.V)
    assert math.isclose(layer.rank, 2)
