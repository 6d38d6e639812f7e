"""Mixture-of-experts models in the ecosystem (issue 36, point 6): LoRA with PEFT on a compressed MoE model (attention
and shared layers by default, each expert's compressed layer when asked; PEFT's 3-D parameter targeting refused by
name), export (dense: the native fused experts in the original checkpoint layout, loaded by stock transformers;
compressed-tensors and GGUF refuse compressed experts and say why), and KV caches in ``generate``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import hf_compress
from hf_compress import kv
from hf_compress.cli import main
from hf_compress.compat import cache_kwargs
from hf_compress.errors import ExportError, UnsupportedModuleError
from hf_compress.export import export
from hf_compress.integrations.peft import LoraCompressedLinear, target_module_names
from hf_compress.kv.quant import QuantizedKVCache
from hf_compress.modules import LowRankLinear, QuantLinear, compressed_modules
from hf_compress.modules.experts import CompressedExperts, is_expert_layer, is_fused_experts

from conftest import VOCAB
from test_moe import _COMMON, MOE, tiny_moe

BASES = {"rtn4": {"method": "rtn", "bits": 4, "group_size": 16}, "svd": {"method": "svd", "ratio": 0.3}}
#: merged LoRA vs the adapter model, relative to the largest |logit|: the merge is exact algebra (fp32 sums reordered)
MERGE_TOL = 1e-5
DENSE_TOL = 1e-5  # dense export vs ours, relative to the largest |logit| (fp32 dequantization, fused vs per expert)


def _ids(batch=2, length=12, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def compressed(arch, base="rtn4", **extra):
    model = tiny_moe(arch)
    hf_compress.compress(model, {**BASES[base], **extra}, progress=False)
    return model


def _close(got, want, tol):
    err = float((got - want).abs().max())
    assert err <= tol * float(want.abs().max()), (err, float(want.abs().max()))
    return err


# ----------------------------------------------------------------------------------------------- PEFT
def test_lora_targets_attention_and_shared_layers_by_default_experts_when_asked():
    model = compressed("qwen2_moe")  # a shared expert beside the routed ones
    default, everything = target_module_names(model), target_module_names(model, experts=True)
    assert default and not any(is_expert_layer(model, n) for n in default)
    assert {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")} \
        <= set(default)
    assert {f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")} \
        <= set(default)
    experts = sorted(set(everything) - set(default))
    assert len(experts) == 2 * 2 * 8 and all(is_expert_layer(model, n) for n in experts)  # layers x weights x experts


def _train(pm, ids, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    pm.train()
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    pm.eval()
    return losses


@pytest.mark.parametrize("experts", [False, True], ids=["attention", "experts"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_lora_on_compressed_moe_trains_merges_and_reloads(arch, base, experts, tmp_path):
    """LoRA (PEFT's default init: B = 0) on the compressed layers; with ``experts=True`` every expert's compressed
    layer is a `LoraCompressedLinear` that `CompressedExperts` calls. A few steps of training change the output (and
    reach the routed experts' adapters); the adapter reloads onto the reloaded checkpoint; ``merge_and_unload`` gives
    the adapter model's logits within MERGE_TOL, still compressed, and that merged model saves and reloads."""
    model = compressed(arch, base)
    hf_compress.save_pretrained(model, tmp_path / "base")
    ids = _ids()
    before = logits(model, ids)
    names = target_module_names(model, experts=experts)
    probe = "model.layers.0." + ("mlp.experts.gate_up_proj.3" if experts else "self_attn.q_proj")
    rank_before = model.get_submodule(probe).rank
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    wrapped = {n for n, m in pm.named_modules() if isinstance(m, LoraCompressedLinear)}
    assert len(wrapped) == len(names)
    experts_module = pm.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts_module, CompressedExperts)
    assert isinstance(experts_module.gate_up_proj[3], LoraCompressedLinear) == experts
    torch.testing.assert_close(logits(pm, ids), before, rtol=0, atol=0)  # B = 0: the compressed model

    losses = _train(pm, ids)
    assert losses[-1] < losses[0], losses
    after = logits(pm, ids)
    assert (after - before).abs().max() > 1e-3 * before.abs().max()
    if experts:  # the routed experts' adapters were trained through CompressedExperts' forward
        trained = [n for n, p in pm.named_parameters() if ".experts." in n and "lora_B" in n and p.abs().sum() > 0]
        assert len(trained) >= 8, trained

    pm.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), after, rtol=0, atol=1e-6)

    merged = pm.merge_and_unload()
    err = _close(logits(merged, ids), after, MERGE_TOL)
    print(f"{arch} {base} experts={experts}: merged vs adapter max |dlogit| {err:.2e} (max |logit| "
          f"{float(after.abs().max()):.3f}); loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    layer = merged.get_submodule(probe)  # still compressed, the adapter appended as rank
    assert type(layer) is {"rtn4": QuantLinear, "svd": LowRankLinear}[base] and layer.rank == rank_before + 4
    hf_compress.save_pretrained(merged, tmp_path / "merged")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids), after, MERGE_TOL)


def test_peft_parameter_targeting_of_compressed_experts_is_refused_by_name():
    """PEFT's ``target_parameters`` wraps fused 3-D expert parameters; compressed experts have none left. PEFT alone
    would raise "no target_parameters found" — or only warn when ``target_modules`` matched too; hf-compress raises
    a clear error (through PEFT's ``LoraModel._inject_parameters``) in both cases."""
    for config in (LoraConfig(r=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
                   LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])):
        model = compressed("qwen3_moe")
        with pytest.raises(UnsupportedModuleError, match=r"split into one compressed layer per expert.*"
                                                          r"target_module_names\(model, experts=True\)") as err:
            get_peft_model(model, config)
        assert "model.layers.0.mlp.experts." in str(err.value)


def test_peft_parameter_targeting_still_works_on_experts_left_dense(tmp_path):
    """With ``skip=["experts"]`` the fused experts stay the native module, which PEFT's own parameter targeting
    wraps (``ParamWrapper``); the compressed attention gets our LoRA layer in the same model."""
    model = compressed("qwen3_moe", skip=["experts"])
    assert all(is_fused_experts(layer.mlp.experts) for layer in model.model.layers)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=target_module_names(model),
                                          target_parameters=["experts.gate_up_proj"]))
    kinds = {type(m).__name__ for m in pm.modules()}
    assert {"ParamWrapper", "LoraCompressedLinear"} <= kinds
    ids = _ids()
    losses = _train(pm, ids, steps=3)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------- export
def _native_keys(arch, path):
    tiny_moe(arch).save_pretrained(path)  # the layout transformers' own save_pretrained writes
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", sorted(MOE))
def test_dense_export_is_the_native_moe_checkpoint(arch, tmp_path):
    """Every compressed expert multiplied out into the model's fused experts module, written in the layout
    transformers' ``save_pretrained`` writes for the class (Mixtral: block_sparse_moe.experts.{e}.w1/w2/w3;
    Qwen3-MoE: experts.{e}.gate_proj ...): stock ``from_pretrained`` loads the native class with fused experts and
    reproduces our logits."""
    model = compressed(arch)
    n_experts = sum(is_expert_layer(model, n) for n in compressed_modules(model))
    ids = _ids()
    ref = logits(model, ids)
    result = export(model, tmp_path / "dense", format="dense")
    assert len(result.dense) == len(compressed_modules(model)) and n_experts
    assert any("fused" in note for note in result.notes)
    with safe_open(tmp_path / "dense" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == _native_keys(arch, tmp_path / "native")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert getattr(loaded, "hf_quantizer", None) is None and type(loaded) is type(model)
    experts = [m for m in loaded.modules() if "Experts" in type(m).__name__ and hasattr(m, "num_experts")]
    assert experts and all(is_fused_experts(m) for m in experts)
    _close(logits(loaded, ids), ref, DENSE_TOL)


def test_cli_dense_export_of_a_moe_checkpoint(tmp_path, capsys):
    model = compressed("mixtral")
    hf_compress.save_pretrained(model, tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "-o", str(tmp_path / "dense"), "--format", "dense"]) == 0
    assert "written as the model's fused MixtralExperts" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    _close(logits(loaded, _ids()), logits(model, _ids()), DENSE_TOL)


def test_compressed_tensors_export_refuses_compressed_experts(tmp_path, capsys):
    model = compressed("qwen3_moe")
    with pytest.raises(ExportError, match=r"cannot export the 32 compressed mixture-of-experts expert layers .*"
                                          r"model\.layers\.0\.mlp\.experts\.gate_up_proj\.0.*weight_zero_point.*"
                                          r"Export --format dense") as err:
        export(model, tmp_path / "ct")
    assert "CompressedTensorsDequantize" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written
    hf_compress.save_pretrained(model, tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "-o", str(tmp_path / "ct")]) == 2
    assert "compressed mixture-of-experts expert layers" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()


def test_compressed_tensors_export_of_a_moe_model_whose_experts_stayed_dense(tmp_path):
    """``skip=["experts"]``: the attention layers pack exactly, the fused experts are written dense; transformers'
    compressed-tensors loader reads it."""
    pytest.importorskip("compressed_tensors")
    model = compressed("qwen3_moe", skip=["experts"])
    ids = _ids()
    result = export(model, tmp_path / "ct")
    assert len(result.packed) == 8 and not any(".experts." in n for n in result.packed)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-6)


def _per_expert_ct_checkpoint(model, path):
    """What a compressed-tensors export of the experts would be: ``experts.{e}.gate_proj`` / ``up_proj`` /
    ``down_proj`` (the original checkpoint names) pack-quantized with our codes, scales and zero points."""
    from huggingface_hub import save_torch_state_dict

    from hf_compress.export import _native_config, ct_config, pack_int32
    from hf_compress.kernels import unpack

    def rows(m, a, b):
        return {"weight_packed": pack_int32(unpack(m.qweight, m.bits, m.in_features)[a:b], m.bits),
                "weight_scale": m.scales[a:b].clone(),
                "weight_zero_point": pack_int32(m.zeros[a:b].to(torch.int64).T, m.bits).T.contiguous(),
                "weight_shape": torch.tensor([b - a, m.in_features])}

    layers = compressed_modules(model)
    tensors = {k: v.clone() for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in layers)}
    names = []
    for name, m in layers.items():
        if not is_expert_layer(model, name):
            tensors.update({f"{name}.{k}": v for k, v in rows(m, 0, m.out_features).items()})
            names.append(name)
            continue
        experts, weight, e = name.rsplit(".", 2)
        half = m.out_features // 2
        parts = {"gate_proj": (0, half), "up_proj": (half, 2 * half)} if weight == "gate_up_proj" else \
            {weight: (0, m.out_features)}
        for part, (a, b) in parts.items():
            names.append(f"{experts}.{e}.{part}")
            tensors.update({f"{names[-1]}.{k}": v for k, v in rows(m, a, b).items()})
    config = _native_config(model)
    config.quantization_config = ct_config({(m.bits, m.group_size): names},
                                           ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in range(2)])
    os.makedirs(path)
    save_torch_state_dict(tensors, path, metadata={"format": "pt"})
    config.save_pretrained(path)


def test_why_compressed_experts_have_no_compressed_tensors_export(tmp_path, capfd, caplog):
    """The reason the export gives (`hf_compress.export.EXPERTS_CT_REFUSAL`), checked: a per-expert pack-quantized
    checkpoint with our (asymmetric) experts does not load in transformers' compressed-tensors loader, which drops the
    experts' zero points. When this test fails, transformers reads them: the export can then write experts."""
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    _per_expert_ct_checkpoint(compressed("qwen3_moe"), tmp_path / "ct")
    for kwargs in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
        with pytest.raises(RuntimeError, match="conversion"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **kwargs)
    out = capfd.readouterr()
    assert "Asymmetric quant requires zero-point values" in out.out + out.err + caplog.text


def test_gguf_export_refuses_moe_models(tmp_path):
    model = compressed("qwen3_moe")
    with pytest.raises(ExportError, match=r"GGUF export does not write mixture-of-experts models: this "
                                          r"Qwen3MoeForCausalLM has 2 experts modules .*ffn_gate_exps.*--format dense"):
        export(model, tmp_path / "m.gguf", format="gguf")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- KV caches
def _long_moe():
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **{**_COMMON, **MOE["qwen3_moe"], "max_position_embeddings": 256})
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def _split_logits(model, ids, cache, split):
    model(input_ids=ids[:, :split], **cache_kwargs(model, cache), use_cache=True)
    return torch.stack([model(input_ids=ids[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
                        for t in range(split, ids.shape[1])], dim=1)


def test_kv_cache_reads_like_a_dynamic_cache_on_a_compressed_moe_model():
    model = _long_moe()
    hf_compress.compress(model, BASES["rtn4"], progress=False)
    ids = _ids(2, 40)
    cache = QuantizedKVCache(model.config, bits=8, group_size=4, residual=4)
    got = _split_logits(model, ids, cache, 30)
    assert all(layer.n_quant >= 24 for layer in cache.compressed_layers)  # the quantized path is exercised
    torch.testing.assert_close(got, logits(model, ids)[:, 30:], atol=2e-3, rtol=0)


@pytest.mark.parametrize("spec", ["quant4", "gear", "snapkv:0.5"])
def test_kv_specs_in_generate_on_a_compressed_moe_model(spec, tmp_path):
    """The checkpoint's KV spec is the default cache of ``generate`` (greedy, batch 2, and beam search), in memory and
    after a reload; ``make_cache`` gives the same cache explicitly."""
    model = _long_moe()
    hf_compress.compress(model, {**BASES["rtn4"], "kv": spec}, progress=False)
    ids = _ids(2, 150)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache_type = type(kv.make_cache(model, spec))
    assert type(out.past_key_values) is cache_type and out.sequences.shape == (2, 156)
    explicit = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, kv.make_cache(model, spec)))
    assert torch.equal(explicit, out.sequences)
    beams = model.generate(ids, max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2,
                           **cache_kwargs(model, kv.make_cache(model, spec)))
    assert beams.shape == (4, 154)
    hf_compress.save_pretrained(model, tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    again = loaded.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert type(again.past_key_values) is cache_type and torch.equal(again.sequences, out.sequences)


def test_peft_does_not_rewrite_module_targets_of_a_split_moe_model_into_expert_parameters():
    """PEFT (>= 0.18 on transformers 5) rewrites gate_proj/up_proj/down_proj targets of MoE model types into
    target_parameters on the fused experts (peft.utils.transformers_weight_conversion.
    convert_peft_config_for_transformers, which hf_compress.integrations.peft skips for split experts). On
    deepseek_v3 the dense first block's MLP and the shared experts carry those names: they must keep their LoRA."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import transformers_weight_conversion

    from hf_compress.integrations.peft import target_module_names

    assert transformers_weight_conversion.convert_peft_config_for_transformers.__name__ == (
        "convert_peft_config_for_transformers")
    model = tiny_moe("deepseek_v3")
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16}, progress=False)
    names = target_module_names(model)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=names, init_lora_weights=False))
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.gate_proj"} <= wrapped
    assert not pm.peft_config["default"].target_parameters
