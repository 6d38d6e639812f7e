"""PEFT LoRA on every compressed layer type: dispatch without registration, forward = base + s·B·A·x, exact
merges, unmerge, adapters that reload in a fresh process, Trainer, squeeze."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hf_compress
from conftest import make_tiny, output_of, run_python
from hf_compress.integrations.peft import LoraCompressedLinear, prepare_for_training, squeeze, target_module_names
from hf_compress.modules import LowRankLinear, QuantLinear, QuantLowRankLinear

BASES = {
    "lowrank": {"method": "svd", "ratio": 0.3},
    "quant": {"method": "rtn", "bits": 4, "group_size": 16},
    "quant+eora": {"method": "hqq", "bits": 3, "group_size": 16, "eora_rank": 3},
    "quant+eora-q4": {"method": "hqq", "bits": 3, "group_size": 16, "eora_rank": 3, "eora_factor_bits": 4},
    "lowrank_quant": {"method": "svd", "ratio": 0.3, "bits": 8, "group_size": 16},
}


def _peft(base, arch="llama", r=4):
    model = make_tiny(arch)
    hf_compress.compress(model, BASES[base], progress=False)
    # init_lora_weights=False: B is random too, so the adapter changes the output
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_module_names(model), init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("base", list(BASES))
def test_lora_forward_is_base_plus_scaled_ba(base, ids):
    pm = _peft(base)
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, LoraCompressedLinear)}
    assert len(layers) == 14
    assert all(("lora_A" in n or "lora_B" in n) for n, p in pm.named_parameters() if p.requires_grad)
    layer = layers[next(n for n in layers if n.endswith("layers.0.mlp.down_proj"))]
    x = torch.randn(3, layer.in_features)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.get_base_layer()(x) + s * (x @ a.T) @ b.T, atol=1e-5)


@pytest.mark.parametrize("base", ["lowrank", "quant", "quant+eora", "quant+eora-q4"])
def test_merge_is_exact_and_unmerge_restores(base, ids):
    pm = _peft(base)
    with pm.disable_adapter():
        plain = output_of(pm, ids)
    lora = output_of(pm, ids)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    rank_before = getattr(q.get_base_layer(), "rank")
    pm.merge_adapter()
    assert q.get_base_layer().rank == rank_before + 4
    assert torch.allclose(output_of(pm, ids), lora, atol=1e-5)
    pm.unmerge_adapter()
    assert q.get_base_layer().rank == rank_before
    with pm.disable_adapter():
        assert torch.allclose(output_of(pm, ids), plain, atol=1e-6)
    merged = pm.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is {"lowrank": LowRankLinear}.get(base, QuantLinear) and layer.rank == rank_before + 4
    assert torch.allclose(output_of(merged, ids), lora, atol=1e-5)


def test_merge_into_quantized_factors_refuses_clearly():
    pm = _peft("lowrank_quant")
    assert isinstance(pm.base_model.model.model.layers[0].mlp.up_proj.get_base_layer(), QuantLowRankLinear)
    with pytest.raises(ValueError, match="quantized"):
        pm.merge_and_unload()


def test_merged_model_saves_and_reloads_with_new_ranks(ids, tmp_path):
    pm = _peft("lowrank")
    want = output_of(pm, ids)
    merged = pm.merge_and_unload()
    hf_compress.save_pretrained(merged, tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(output_of(again, ids), want, atol=1e-5)


@pytest.mark.parametrize("base", ["lowrank", "quant+eora"])
def test_adapter_reloads_in_fresh_process(base, ids, tmp_path):
    model = make_tiny("llama")
    hf_compress.compress(model, BASES[base], progress=False)
    hf_compress.save_pretrained(model, tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=target_module_names(model), init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    torch.save({"ids": ids, "logits": output_of(pm, ids)}, tmp_path / "ref.pt")
    run_python(f"""
        import torch, hf_compress
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        pm = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})
        with torch.no_grad():
            out = pm(input_ids=ref["ids"]).logits
        assert torch.allclose(out, ref["logits"], atol=1e-6), (out - ref["logits"]).abs().max()
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        m.load_adapter({str(tmp_path / 'adapter')!r})
        with torch.no_grad():
            out = m(input_ids=ref["ids"]).logits
        assert torch.allclose(out, ref["logits"], atol=1e-6), (out - ref["logits"]).abs().max()
    """)


def test_trainer_lowers_the_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = make_tiny("llama")
    hf_compress.compress(model, BASES["quant+eora"], progress=False)
    prepare_for_training(model)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_module_names(model)))
    ids = torch.randint(3, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters() if n in before)  # base stays frozen


def test_squeeze_is_the_best_lower_rank_approximation():
    m = LowRankLinear.from_factors(torch.randn(20, 9, dtype=torch.float64), torch.randn(9, 15, dtype=torch.float64),
                                   None)
    w = (m.U @ m.V).detach()
    squeeze(m, 4)
    u, s, vh = torch.linalg.svd(w)
    assert m.rank == 4 and torch.allclose(m.U @ m.V, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-10)


def test_gpt2_conv1d_sources_and_no_accidental_dispatch(ids):
    model = make_tiny("gpt2")
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3, "skip": ["c_fc"]}, progress=False)
    names = target_module_names(model)
    assert "c_fc" not in names
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=names + ["c_fc"], fan_in_fan_out=True,
                                          init_lora_weights=False))
    kinds = {type(m).__name__ for n, m in pm.named_modules() if n.endswith(("c_attn", "c_fc"))}
    assert kinds == {"LoraCompressedLinear", "Linear"}  # dense Conv1D keeps PEFT's own layer
    out = output_of(pm, ids)
    assert torch.allclose(output_of(pm.merge_and_unload(), ids), out, atol=1e-5)
