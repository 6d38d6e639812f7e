"""Export to compressed-tensors / PEFT LoRA / dense, checked with clients we did not write: transformers'
compressed-tensors integration (compressed-tensors 0.17.0, the version vLLM 0.32 pins) and PEFT.

Tolerances: compressed-tensors' default load keeps the packed weights and dequantizes (q − z)·s with our fp16 scales
upcast to the fp32 model dtype — the same arithmetic as ours, so logits agree to 1e-6 (identical in practice). The
adapter adds B·(A·x) exactly as our EoRA path does (1e-5). Dense exports hold dequant(Q) + U·V multiplied out in
fp32 (1e-5). ``CompressedTensorsConfig(dequantize=True)`` dequantizes in the fp16 scale dtype: logits within 1e-3
of their largest magnitude.
"""

import json
import re

import pytest
import torch
from conftest import VOCAB, make_tiny, output_of, run_python

import hf_compress
from hf_compress import CompressionConfig, ExportError
from hf_compress.cli import main
from hf_compress.pipelines import compress_modules
from hf_compress.export import ADAPTER_DIR, export, pack_int32
from hf_compress.modules import compressed_modules

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

EXACT, ADAPTER_TOL, DENSE_TOL = 1e-6, 1e-5, 1e-5


def _calib_ids(n=8, seqlen=24):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(5))


def _compressed(arch, cfg, calibrated=False):
    model = make_tiny(arch)
    if calibrated:
        cfg = {**cfg, "calibration": {"nsamples": 8, "seqlen": 24}}
    hf_compress.compress(model, CompressionConfig(**cfg), calibration=_calib_ids() if calibrated else None,
                         progress=False)
    return model


def _mixed(arch):
    """q/k/v 4-bit, o_proj 3-bit, MLP 8-bit: three config groups."""
    model = make_tiny(arch)
    for bits, targets in ((8, ["gate_proj", "up_proj", "down_proj"]), (3, ["o_proj"])):
        compress_modules(model, CompressionConfig(method="rtn", bits=bits, group_size=16, targets=targets),
                         progress=False)
    return hf_compress.compress(model, CompressionConfig(method="rtn", bits=4, group_size=16,
                                                         targets=["q_proj", "k_proj", "v_proj"]), progress=False)


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _quant_config(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_compressed_tensors_layout(bits):
    """Our words are what compressed-tensors packs from the same (signed) codes, and unpack back to them — along
    the input dimension (codes) and the output dimension (zero points), with a padded last word."""
    codes = torch.randint(0, 2**bits, (6, 37), generator=torch.Generator().manual_seed(bits))
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    words = pack_int32(codes, bits)
    assert torch.equal(words, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(words, bits, codes.shape).long(), signed.long())
    zp = pack_int32(codes.T, bits).T
    assert torch.equal(zp, pack_to_int32(signed, bits, packed_dim=0))


CASES = {
    "llama-rtn4": ("llama", dict(method="rtn", bits=4, group_size=16), False),
    "qwen2-rtn8": ("qwen2", dict(method="rtn", bits=8, group_size=16), False),
    "llama-gptq4": ("llama", dict(method="gptq", bits=4, group_size=16), True),
    "qwen2-rtn4-eora": ("qwen2", dict(method="rtn", bits=4, group_size=16, eora_rank=4), False),
    "llama-gptq4-eora-q": ("llama", dict(method="gptq", bits=4, group_size=16, eora_rank=6, eora_factor_bits=4,
                                         eora_factor_group_size=16), True),
    # a residual rotation is folded into the plain weights: the format needs nothing new
    "qwen2-gptq4-rotated-eora": ("qwen2", dict(method="gptq", bits=4, group_size=16, eora_rank=4, rotate="hadamard"),
                                 True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_export_matches_ours(case, tmp_path, ids):
    arch, cfg, calibrated = CASES[case]
    model = _compressed(arch, cfg, calibrated)
    ref = output_of(model, ids)
    result = export(model, tmp_path / "ct")
    q = _quant_config(tmp_path / "ct")
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert [g["weights"]["num_bits"] for g in q["config_groups"].values()] == [cfg["bits"]]
    assert q["ignore"] == ["lm_head"] and len(result.packed) == 14
    loaded = _load(tmp_path / "ct")
    base = output_of(loaded, ids)
    if not cfg.get("eora_rank"):
        assert result.adapter is None
        assert (base - ref).abs().max() <= EXACT
        return
    from peft import PeftModel

    assert (base - ref).abs().max() > 1e-3  # the base alone lacks the EoRA correction ...
    adapter = json.loads((tmp_path / "ct" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == adapter["r"] and adapter["alpha_pattern"] == adapter["rank_pattern"]
    assert set(adapter["rank_pattern"].values()) == {cfg["eora_rank"]}
    with_adapter = PeftModel.from_pretrained(loaded, result.adapter)
    assert (output_of(with_adapter, ids) - ref).abs().max() <= ADAPTER_TOL  # ... which the adapter restores
    assert ("dequantized into it" in result.summary()) == bool(cfg.get("eora_factor_bits"))


def test_mixed_widths_are_separate_config_groups(tmp_path, ids):
    model = _mixed("qwen2")
    ref = output_of(model, ids)
    export(model, tmp_path / "ct")
    groups = _quant_config(tmp_path / "ct")["config_groups"].values()
    widths = {g["weights"]["num_bits"]: len(g["targets"]) for g in groups}
    assert widths == {3: 2, 4: 6, 8: 6}
    assert (output_of(_load(tmp_path / "ct"), ids) - ref).abs().max() <= EXACT


def test_dequantize_on_load_and_no_hf_compress_needed(tmp_path, ids):
    """Loaded in a fresh interpreter that never imports hf_compress, with compressed-tensors dequantizing at load."""
    model = _compressed("llama", dict(method="rtn", bits=4, group_size=16))
    ref = output_of(model, ids)
    export(model, tmp_path / "ct")
    torch.save({"ids": ids, "ref": ref}, tmp_path / "ref.pt")
    config = (tmp_path / "ct" / "config.json").read_text()
    assert "hf_compress" not in config and "auto_map" not in config
    proc = run_python(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig
        d = torch.load({str(tmp_path / "ref.pt")!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ct")!r}, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
        with torch.no_grad():
            err = (m(input_ids=d["ids"]).logits - d["ref"]).abs().max() / d["ref"].abs().max()
        print("hf_compress" in sys.modules, type(m.model.layers[0].mlp.up_proj).__name__, float(err))
    """)
    imported, cls, err = proc.stdout.split()
    assert imported == "False" and cls == "Linear" and float(err) <= 1e-3


@pytest.mark.parametrize("arch,cfg", [
    ("llama", dict(method="svd", ratio=0.3)),
    ("qwen2", dict(method="rtn", bits=3, group_size=16, eora_rank=4)),
    ("llama", dict(method="svd", ratio=0.3, bits=4, group_size=16)),  # quantized factors
    ("gpt2", dict(method="rtn", bits=4, group_size=16)),  # Conv1D layers
])
def test_dense_export_is_the_plain_model(arch, cfg, tmp_path, ids):
    from transformers import AutoModel

    model = _compressed(arch, cfg)
    ref = output_of(model, ids)
    result = export(model, tmp_path / "dense", format="dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    loaded = (AutoModelForCausalLM if arch != "bert" else AutoModel).from_pretrained(tmp_path / "dense").eval()
    assert getattr(loaded, "hf_quantizer", None) is None and result.adapter is None
    assert (output_of(loaded, ids) - ref).abs().max() <= DENSE_TOL
    assert result.bytes > sum(p.numel() * 4 for p in make_tiny(arch).parameters()) * 0.99  # the dense size


def test_dense_lowrank_multiplies_low_rank_layers_out(tmp_path, ids):
    """A mixed model (quantized MLP, low-rank attention): packed + dense layers listed in ``ignore``."""
    model = make_tiny("llama")
    compress_modules(model, CompressionConfig(method="rtn", bits=4, group_size=16, targets=["*.mlp.*_proj"]),
                     progress=False)
    hf_compress.compress(model, CompressionConfig(method="svd", ratio=0.3, targets=["*.self_attn.*_proj"]),
                         progress=False)
    ref = output_of(model, ids)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: a low-rank layer"):
        export(model, tmp_path / "ct")
    result = export(model, tmp_path / "ct", dense_lowrank=True)
    q = _quant_config(tmp_path / "ct")
    assert sorted(q["ignore"]) == sorted(["lm_head", *result.dense]) and len(result.dense) == 8
    assert (output_of(_load(tmp_path / "ct"), ids) - ref).abs().max() <= DENSE_TOL


@pytest.mark.parametrize("arch,cfg,why", [
    ("llama", dict(method="svd", ratio=0.3), "a low-rank layer"),
    ("llama", dict(method="rtn", bits=4, group_size=16, method_kwargs={"integer_zero": False}), "float zero points"),
    ("qwen2", dict(method="rtn", bits=4, group_size=32), "group size 32 does not divide in_features 48"),
    ("gpt2", dict(method="rtn", bits=4, group_size=16), "a GPT-2 Conv1D layer"),
])
def test_refusals_name_the_layer_and_write_nothing(arch, cfg, why, tmp_path):
    model = _compressed(arch, cfg)
    with pytest.raises(ExportError, match=r"cannot export \d+ layer") as err:
        export(model, tmp_path / "out")
    named = re.findall(rf"\n  ([\w.]+): {re.escape(why)}", str(err.value))
    assert named and set(named) <= set(compressed_modules(model))
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_cli_export_and_refusal(tmp_path, capsys, ids):
    model = _compressed("llama", dict(method="rtn", bits=4, group_size=16))
    hf_compress.save_pretrained(model, tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "-o", str(tmp_path / "ct")]) == 0
    assert "14 layers pack-quantized 4-bit g16" in capsys.readouterr().out
    assert (output_of(_load(tmp_path / "ct"), ids) - output_of(model, ids)).abs().max() <= EXACT
    hf_compress.save_pretrained(_compressed("llama", dict(method="svd", ratio=0.3)), tmp_path / "svd")
    assert main(["export", str(tmp_path / "svd"), "-o", str(tmp_path / "nope")]) == 2
    assert "self_attn.q_proj: a low-rank layer" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
    assert main(["export", str(tmp_path / "src"), "-o", str(tmp_path / "src")]) == 2  # never over its source


def test_dtype_cast_keeps_scales_and_ties(tmp_path, ids):
    """``dtype="bfloat16"``: embeddings, norms and adapter factors in bf16, scales as stored (fp16), a tied output
    embedding saved once; the logits stay within bf16 rounding of ours (2% of their largest magnitude)."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import _decoder_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_decoder_kwargs(), tie_word_embeddings=True)).eval()
    hf_compress.compress(model, CompressionConfig(method="rtn", bits=4, group_size=16, eora_rank=4), progress=False)
    ref = output_of(model, ids)
    result = export(model, tmp_path / "ct", dtype="bfloat16")
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert "lm_head.weight" not in dtypes and dtypes["model.embed_tokens.weight"] == "BF16"
    assert {d for k, d in dtypes.items() if k.endswith("weight_scale")} == {"F16"}
    from peft import PeftModel
    from transformers import CompressedTensorsConfig

    # PEFT needs each Linear's .weight: dequantize at load (or run one forward, which decompresses them)
    base = _load(tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True))
    loaded = PeftModel.from_pretrained(base, result.adapter)
    assert (output_of(loaded, ids) - ref).abs().max() <= 0.02 * ref.abs().max()
    with pytest.raises(ExportError, match="dtype must be a floating torch dtype"):
        export(model, tmp_path / "bad", dtype="int8")


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16"])
def test_a_bfloat16_model_loads_exactly_with_bfloat16_scales_and_within_the_scale_rounding_otherwise(
        scale_dtype, tmp_path, ids):
    """Issue 37: transformers' load of a bfloat16 export differed from ours by ~2e-3. The cause: compressed-tensors
    creates ``weight_scale`` in the model's dtype, so float16 scales are rounded to bfloat16 at load (each layer then
    computes with (q − z)·bf16(s)). With ``scale_dtype="bfloat16"`` nothing is rounded and the load is exact; with
    float16 scales each weight is within 3·2⁻⁸ of ours (2⁻⁸ the scale's rounding, 2·2⁻⁸ the two sides' bfloat16
    rounding of the product; bfloat16's unit roundoff is 2⁻⁸) and the export says so."""
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()
    hf_compress.compress(model, CompressionConfig(method="rtn", bits=4, group_size=16, scale_dtype=scale_dtype),
                         progress=False)
    ref = output_of(model, ids)
    result = export(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    assert loaded.dtype == torch.bfloat16
    noted = any("cast the scales to bfloat16" in n for n in result.notes)
    if scale_dtype == "bfloat16":
        assert not noted and torch.equal(output_of(loaded, ids), ref)
        return
    assert noted
    err = (output_of(loaded, ids).float() - ref.float()).abs().max()  # (the first forward decompresses the layers)
    assert 0 < err <= 0.02 * ref.float().abs().max()
    worst = 0.0
    for name, m in compressed_modules(model).items():
        x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        exact = m.dequantized(torch.float32)  # (q − z)·s, float16 s exact in float32
        s = m.scales.float().repeat_interleave(m.group_size, dim=1)
        q_minus_z = (exact / s).round()
        theirs = (q_minus_z.to(torch.bfloat16) * s.to(torch.bfloat16))  # what the reader computes with
        with torch.no_grad():
            assert torch.equal(loaded.get_submodule(name)(x), torch.nn.functional.linear(x, theirs)), name
        diff = (theirs.float() - m.weight.float()).abs()
        assert (diff <= 3 * 2**-8 * exact.abs() * 1.001).all(), name
        worst = max(worst, float((diff / exact.abs().clamp_min(1e-30)).max()))
    assert worst > 0  # some scale really is rounded
