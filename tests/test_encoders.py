"""Encoder-only models and the caller's objects (issue 37): loss-based allocation and Fisher weighting on a model
without an LM loss (`hf_compress.gradients.objective`), KV caches refused on an encoder, LoRA only on compressed
layers, and `compress` leaving the caller's config object alone."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

import hf_compress
from hf_compress.errors import ConfigError
from hf_compress.gradients import fisher_rows, objective, output_sensitivity
from hf_compress.integrations.peft import target_module_names
from hf_compress.kv import make_cache
from hf_compress.kv.hook import is_encoder_only
from hf_compress.modules import compressed_modules
from hf_compress.targets import find_targets

from conftest import VOCAB, make_tiny, output_of


def calibration_ids(n=8, seqlen=32):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["svd_llm", "fwsvd"])
def test_loss_allocation_and_fisher_on_an_encoder_without_lm_head(method, ids):
    model = make_tiny("bert")
    assert not hasattr(model(input_ids=ids), "loss")
    ref = output_of(model, ids)
    hf_compress.compress(model, {"method": method, "ratio": 0.3, "calibration": {"nsamples": 8, "seqlen": 32}},
                         calibration=calibration_ids(), progress=False)
    assert compressed_modules(model)
    out = output_of(model, ids)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_the_encoder_objective_is_the_gauss_newton_form_of_output_reconstruction():
    """⟨h, r⟩ with r ~ N(0, I): E[(∂⟨h, r⟩/∂y)²] = diag(J Jᵀ) — the same for every seed in expectation, seeded per
    window (two passes agree bit for bit), and positive on every layer that the output depends on."""
    model = make_tiny("bert")
    targets = find_targets(model, None, [])
    batches = [calibration_ids(4, 16)]
    sens = output_sensitivity(model, targets, batches, progress=False)
    assert sens == output_sensitivity(model, targets, batches, progress=False)
    assert all(v > 0 for v in sens.values())
    rows = fisher_rows(model, targets, batches, progress=False)
    assert all(r.shape[0] == m.out_features and (r > 0).all() for (n, r), m in zip(rows.items(), targets.values()))
    sample = batches[0][:1]
    value = objective(model, sample, 0)
    with torch.no_grad():
        hidden = model(input_ids=sample).last_hidden_state
    r = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(value.detach(), (hidden * r).sum())


def test_a_model_with_a_head_keeps_its_own_loss():
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64, pad_token_id=0)).eval()
    sample = calibration_ids(1, 16)
    with torch.no_grad():
        assert torch.equal(objective(mlm, sample, 0), mlm(input_ids=sample, labels=sample).loss)
    llama = make_tiny("llama")
    with torch.no_grad():
        assert torch.equal(objective(llama, sample, 0), llama(input_ids=sample, labels=sample).loss)


def test_kv_cache_refused_on_an_encoder():
    bert = make_tiny("bert")
    assert is_encoder_only(bert) and not is_encoder_only(make_tiny("llama"))
    with pytest.raises(ConfigError, match="encoder-only"):
        make_cache(bert, "quant4")
    with pytest.raises(ConfigError, match="encoder-only"):
        hf_compress.compress(make_tiny("bert"), {"method": "rtn", "bits": 4, "group_size": 16, "kv": "quant4"},
                             progress=False)


def test_lora_targets_on_bert_are_the_compressed_layers_not_the_pooler():
    model = make_tiny("bert")
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16}, progress=False)
    names = target_module_names(model)
    assert sorted(names) == sorted(compressed_modules(model)) and "pooler.dense" not in names
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names))
    assert not hasattr(peft_model.base_model.model.pooler.dense, "lora_A")


def test_compress_leaves_the_callers_config_alone():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    assert model.config is config
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3, "targets": ["lm_head", "q_proj"]}, progress=False)
    assert type(config) is LlamaConfig and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    assert type(AutoModelForCausalLM.from_config(config)) is LlamaForCausalLM
    # the model and its submodules share the model's own copy
    assert model.config is not config and not model.config.tie_word_embeddings
    assert model.model.config is model.config and model.model.layers[0].self_attn.config is model.config


def test_a_vlm_config_copy_keeps_the_sub_configs_shared():
    from test_vlm import tiny_vlm

    model = tiny_vlm("llava")
    config, text = model.config, model.config.text_config
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16}, progress=False)
    assert getattr(config, "quantization_config", None) is None and type(config).__name__ == "LlavaConfig"
    assert model.model.language_model.config is model.config.text_config and model.config.text_config is not text
