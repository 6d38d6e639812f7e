"""Residual rotation (``rotate``, hf_compress/transforms): the Hadamard constructions, the rotated dense model's logits
against the original's, composition with every weight method, save/load and dense export, refusals.

Tolerances: the rotation is exact in exact arithmetic; folded in fp64 and rounded once to fp32, the rotated model's
logits stay within 1e-4 of the original's largest logit (measured: ~5e-7). Compressed checkpoints reload bit for bit
(torch.equal); a dense export multiplies dequant(Q) out in fp32 (1e-5, as in test_export.py).
"""

import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_compress
from conftest import VOCAB, _decoder_kwargs, make_tiny, output_of, run_python
from hf_compress import CompressionConfig
from hf_compress.errors import ConfigError, NonFiniteWeightError
from hf_compress.transforms import rotate_residual
from hf_compress.transforms.hadamard import hadamard, paley1, paley2, random_orthogonal, randomized_hadamard

ROTATION_TOL = 1e-4  # relative to the largest logit
DENSE_TOL = 1e-5


def _calib_ids(n=8, seqlen=24):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(5))


def _model(arch: str, seed: int = 0):
    """A tiny decoder whose norms are not 1 (so folding them matters); ``llama-tied``: a head tied to the embedding;
    ``llama-bias``: biases on every projection (o_proj/down_proj biases are rotated)."""
    torch.manual_seed(seed)
    if arch == "llama-tied":
        model = LlamaForCausalLM(LlamaConfig(**_decoder_kwargs(2), tie_word_embeddings=True)).eval()
    elif arch == "llama-bias":
        model = LlamaForCausalLM(LlamaConfig(**_decoder_kwargs(2), attention_bias=True, mlp_bias=True)).eval()
    else:
        model = make_tiny(arch, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 28, 36, 44, 48, 72, 144, 576, 896, 960, 1536])
def test_hadamard_matrices(n):
    h = hadamard(n)
    assert h is not None and h.dtype == torch.float64
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_paley_constructions_and_orders_without_one():
    assert torch.equal(paley1(11) @ paley1(11).T, 12 * torch.eye(12, dtype=torch.float64))  # q = 11 ≡ 3 mod 4
    assert torch.equal(paley2(13) @ paley2(13).T, 28 * torch.eye(28, dtype=torch.float64))  # q = 13 ≡ 1 mod 4
    for n in (3, 6, 9, 10, 50, 52):  # odd, 2 mod 4, or (52) no construction here
        assert hadamard(n) is None and randomized_hadamard(n, torch.Generator()) is None


@pytest.mark.parametrize("n", [48, 576])
def test_randomized_hadamard_and_random_orthogonal_are_orthogonal(n):
    g = torch.Generator().manual_seed(0)
    q = randomized_hadamard(n, g)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q.abs(), torch.full_like(q, n**-0.5))  # every coordinate spread evenly
    o = random_orthogonal(n, g)
    assert torch.allclose(o @ o.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(randomized_hadamard(n, torch.Generator().manual_seed(3)),
                       randomized_hadamard(n, torch.Generator().manual_seed(3)))  # seeded


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama-tied", "llama-bias"])
def test_rotated_model_computes_the_same_logits(arch, kind, ids):
    model = _model(arch)
    ref = output_of(model, ids)
    emb = model.get_input_embeddings().weight.detach().clone()
    info = rotate_residual(model, kind, seed=0)
    assert _rel(output_of(model, ids), ref) <= ROTATION_TOL
    assert type(model) is type(_model(arch)) and info["untied_head"] == (arch == "llama-tied")
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert not torch.allclose(model.get_input_embeddings().weight, emb)
    if arch == "llama-tied":  # the head absorbed the final norm: untied, and the config says so
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert not model.config.tie_word_embeddings


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama-bias"])
def test_rotated_heads_compute_the_same_logits(arch, ids):
    """rotate_heads (SpinQuant R2): each value head rotated by one Hadamard of the head size, folded into v_proj's rows
    (and bias) and o_proj's columns — grouped-query attention included (4 query heads on 2 kv heads here)."""
    model = _model(arch)
    ref = output_of(model, ids)
    plain = copy.deepcopy(model)
    info = rotate_residual(model, "hadamard", seed=0, heads=True)
    rotate_residual(plain, "hadamard", seed=0)
    assert "attention heads: randomized Hadamard of order 12" in info["rotation"]
    assert _rel(output_of(model, ids), ref) <= ROTATION_TOL
    attn, other = model.model.layers[0].self_attn, plain.model.layers[0].self_attn
    assert not torch.allclose(attn.v_proj.weight, other.v_proj.weight)  # the heads were rotated ...
    assert torch.equal(attn.q_proj.weight, other.q_proj.weight)  # ... and nothing else
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)


def test_hidden_size_without_hadamard_falls_back_to_random_orthogonal(ids, caplog):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**_decoder_kwargs(2), "hidden_size": 52, "num_attention_heads": 2,
                                            "num_key_value_heads": 2})).eval()
    ref = output_of(model, ids)
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        info = rotate_residual(model, "hadamard")
    assert "random orthogonal" in info["rotation"] and "no Hadamard matrix of order 52" in caplog.text
    assert _rel(output_of(model, ids), ref) <= ROTATION_TOL


@pytest.mark.parametrize("cfg", [
    {"method": "rtn", "bits": 3, "group_size": 16},
    {"method": "hqq", "bits": 3, "group_size": 16},
    {"method": "gptq", "bits": 3, "group_size": 16},
    {"method": "gptq", "bits": 3, "group_size": 16, "eora_rank": 4},
    {"method": "rtn", "bits": 3, "group_size": 16, "method_kwargs": {"grid": "mse-act"}},
    {"method": "svd", "ratio": 0.3},
    {"method": "gptq", "bits": 3, "group_size": 16, "rotate_heads": True},
], ids=["rtn", "hqq", "gptq", "gptq+eora", "rtn-mse-act", "svd", "gptq+heads"])
def test_rotate_is_applied_before_the_weight_method(cfg, ids):
    """compress with ``rotate`` = rotate the dense model, then compress it without: identical logits."""
    calibrated = cfg["method"] == "gptq" or cfg.get("method_kwargs")
    kw = {"calibration": _calib_ids() if calibrated else None, "progress": False}
    cal = {"calibration": {"nsamples": 8, "seqlen": 24}}
    heads = cfg.get("rotate_heads", False)
    cfg = {k: v for k, v in cfg.items() if k != "rotate_heads"}
    together = _model("llama-tied")
    hf_compress.compress(together, {**cfg, **cal, "rotate": "hadamard", "rotate_seed": 7, "rotate_heads": heads}, **kw)
    apart = _model("llama-tied")
    rotate_residual(apart, "hadamard", seed=7, heads=heads)
    hf_compress.compress(apart, {**cfg, **cal}, **kw)
    assert torch.equal(output_of(together, ids), output_of(apart, ids))
    assert together.config.quantization_config.to_dict()["rotate"] == "hadamard"


def test_rotated_8bit_model_is_close_to_dense(ids):
    dense = _model("llama")
    ref = output_of(dense, ids)
    hf_compress.compress(dense, {"method": "rtn", "bits": 8, "group_size": 16, "rotate": "hadamard"}, progress=False)
    assert torch.allclose(output_of(dense, ids), ref, atol=2e-2 * ref.abs().max())


def test_rotated_checkpoint_reloads_exactly_and_exports_to_a_plain_model(ids, tmp_path):
    from hf_compress.export import export

    model = _model("llama-tied")
    hf_compress.compress(model, {"method": "gptq", "bits": 3, "group_size": 16, "rotate": "hadamard",
                                 "calibration": {"nsamples": 8, "seqlen": 24}}, calibration=_calib_ids(),
                         progress=False)
    ref = output_of(model, ids)
    hf_compress.save_pretrained(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    base = saved["base_config"]
    assert base["quantization_config"]["rotate"] == "hadamard" and base["tie_word_embeddings"] is False
    export(model, tmp_path / "dense", format="dense")
    torch.save({"ids": ids, "logits": ref}, tmp_path / "ref.pt")
    run_python(f"""
        import torch, hf_compress
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})
        with torch.no_grad():
            out = m(input_ids=ref["ids"]).logits
        assert torch.equal(out, ref["logits"]), (out - ref["logits"]).abs().max()
        assert type(m).__name__ == "LlamaForCausalLM"
    """)
    proc = run_python(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dense')!r}, dtype=torch.float32)
        with torch.no_grad():
            out = m(input_ids=ref["ids"]).logits
        assert m.lm_head.weight is not m.model.embed_tokens.weight
        print("hf_compress" in sys.modules, type(m).__name__, float((out - ref["logits"]).abs().max()))
    """)
    imported, cls, err = proc.stdout.split()
    assert imported == "False" and cls == "LlamaForCausalLM" and float(err) <= DENSE_TOL


def test_resumed_rotated_run_equals_the_first(ids, tmp_path):
    """A run resumed from a finished checkpoint folder rotates the fresh dense model identically (seeded) and restores
    the compressed blocks: the same model."""
    cfg = {"method": "gptq", "bits": 3, "group_size": 16, "rotate": "hadamard",
           "calibration": {"nsamples": 8, "seqlen": 24}}
    first = hf_compress.compress(_model("llama-tied"), cfg, calibration=_calib_ids(), progress=False,
                                 checkpoint_dir=tmp_path / "ckpt")
    again = hf_compress.compress(_model("llama-tied"), cfg, calibration=_calib_ids(), progress=False,
                                 checkpoint_dir=tmp_path / "ckpt")
    assert torch.equal(output_of(first, ids), output_of(again, ids))


def test_compress_on_load_with_rotation(ids, tmp_path):
    _model("llama-tied").save_pretrained(tmp_path / "dense")
    cfg = CompressionConfig(method="rtn", bits=4, group_size=16, rotate="hadamard")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=cfg)
    direct = _model("llama-tied")
    hf_compress.compress(direct, {"method": "rtn", "bits": 4, "group_size": 16, "rotate": "hadamard"}, progress=False)
    assert torch.equal(output_of(loaded, ids), output_of(direct, ids))


@pytest.mark.parametrize("arch,match", [
    ("gpt2", r"Llama-architecture decoders \(llama, qwen2, mistral\); GPT2LMHeadModel \(model_type 'gpt2'\) lacks: "
             r"an nn.Embedding embed_tokens; a final RMSNorm `norm`"),
    ("bert", r"BertModel .* lacks: .*output head"),
])
def test_other_architectures_are_refused_by_what_they_lack(arch, match):
    model = make_tiny(arch)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=match):
        hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16, "rotate": "hadamard"},
                             progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_llama_layout_of_another_model_type_is_refused():
    model = _model("llama")
    model.config.model_type = "gemma"
    with pytest.raises(ConfigError, match="model_type 'gemma'.*Gemma's"):
        rotate_residual(model)


def test_non_finite_weights_refuse_before_anything_changes():
    model = _model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    emb = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(NonFiniteWeightError, match="model.norm.weight"):
        rotate_residual(model)
    assert torch.equal(model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize("cfg,match", [
    ({"method": "rtn", "bits": 4, "rotate": "spin"}, "Unknown rotation 'spin'; available: hadamard, orthogonal"),
    ({"method": "rtn", "bits": 4, "rotate": "hadamard", "rotate_seed": -1}, "rotate_seed must be a non-negative"),
    ({"method": "rtn", "bits": 4, "rotate": True}, "rotate must be one of"),
    ({"method": "svd", "kv": "quant4", "rotate": "hadamard"}, "rotate transforms the weights before a weight method"),
    ({"method": "rtn", "bits": 4, "rotate_heads": True}, "give it with rotate"),
    ({"method": "rtn", "bits": 4, "rotate": "hadamard", "rotate_heads": 1}, "rotate_heads must be true or false"),
])
def test_bad_rotation_config(cfg, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig(**cfg)


def test_config_without_rotation_is_unchanged():
    """``rotate`` is stored only when used: configs (and resume fingerprints) of other runs are as before."""
    assert "rotate" not in CompressionConfig(method="rtn", bits=4).to_dict()
    cfg = CompressionConfig(method="rtn", bits=4, rotate="orthogonal", rotate_seed=3)
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["rotate_seed"] == 3
