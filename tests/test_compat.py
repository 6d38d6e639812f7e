"""Guards for every transformers / PEFT / accelerate internal hf-compress relies on (docs/compatibility.md).

Each failure names the internal that moved and the hf-compress code that needs it, so that a new release's
breakage reads as "X changed", not as a wrong number deep in another test."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import make_tiny

import hf_compress
from hf_compress.compat import cache_kwargs


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_generation_cache_step():
    """kv/hook.py gives a model instance its own GenerationMixin._prepare_cache_for_generation."""
    from transformers import GenerationMixin

    step = getattr(GenerationMixin, "_prepare_cache_for_generation", None)
    assert step is not None, ("transformers.GenerationMixin._prepare_cache_for_generation (private) is gone: "
                              "hf_compress/kv/hook.py overrides it to put a checkpoint's KV cache into generate()")
    assert _params(step)[:3] == ["self", "generation_config", "model_kwargs"], (
        f"GenerationMixin._prepare_cache_for_generation{inspect.signature(step)} changed its leading parameters "
        "(self, generation_config, model_kwargs), which hf_compress/kv/hook.py relies on")
    model = make_tiny("llama")
    hf_compress.compress(model, {"kv": "quant4"})
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert type(cache).__name__ == "QuantizedKVCache", (
        "generate() no longer keeps the default cache built by _prepare_cache_for_generation in model_kwargs as a "
        f"DynamicCache (got {type(cache).__name__}); see hf_compress/kv/hook.py")


def test_cache_keyword_follows_the_forward_signature():
    """hf_compress/compat.py: `cache` (5.24+) or `past_key_values` (older), read off the model's forward."""
    from transformers import DynamicCache

    model = make_tiny("llama")
    kw = cache_kwargs(model, DynamicCache(config=model.config))
    (name,) = kw
    assert name in _params(type(model).forward), f"{type(model).__name__}.forward takes neither cache nor past_key_values"
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **kw)
    assert kw[name].get_seq_length() == 3, f"the cache passed as {name}= was not used by the forward"


def test_attention_interface_and_mask_registry():
    """kv/eviction.py registers wrapping attention functions (AttentionInterface, AttentionMaskInterface), switches
    the model with set_attn_implementation and reads config._attn_implementation; for an eager base it calls the
    modeling module's eager_attention_forward; it needs the attention function to receive the very key tensors that
    Cache.update returned."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.models.llama import modeling_llama

    from hf_compress.kv.eviction import PREFIX, EvictionKVCache

    for base in ("sdpa", "eager"):
        assert f"{PREFIX}{base}" in AttentionInterface(), "AttentionInterface.register no longer registers globally"
        assert f"{PREFIX}{base}" in AttentionMaskInterface(), "AttentionMaskInterface.register no longer registers"
    assert callable(getattr(modeling_llama, "eager_attention_forward", None)), (
        "transformers.models.llama.modeling_llama.eager_attention_forward is gone: kv/eviction.py wraps the "
        "modeling module's eager function when a model runs eager attention")
    for base in ("sdpa", "eager"):
        model = make_tiny("llama")
        model.set_attn_implementation(base)
        assert model.config._attn_implementation == base, "PretrainedConfig._attn_implementation no longer reports it"
        cache = EvictionKVCache(model, keep=0.25, window=4)
        assert model.config._attn_implementation == f"{PREFIX}{base}", "set_attn_implementation refused a registered name"
        with torch.no_grad():
            model(input_ids=torch.arange(3, 43)[None], use_cache=True, **cache_kwargs(model, cache))
        assert all(layer.pending is None and layer.stored_length() == 10 for layer in cache.compressed_layers), (
            "the attention function no longer receives the key tensors Cache.update returned (identity), so the "
            "eviction attention of kv/eviction.py never saw the prefill's queries")


def test_cache_utils_layer_plumbing():
    """kv/base.py builds transformers' own layers for uncompressed layer types and reads the layer plan."""
    from transformers import cache_utils

    for name in ("DYNAMIC_LAYER_TYPE_MAPPING", "get_layer_types_and_kwargs", "CacheLayerMixin"):
        assert hasattr(cache_utils, name), f"transformers.cache_utils.{name} is gone (used by hf_compress/kv/base.py)"
    config = make_tiny("mistral").config
    types, kwargs = cache_utils.get_layer_types_and_kwargs(config)
    assert len(types) == len(kwargs) == config.num_hidden_layers, "get_layer_types_and_kwargs(config) changed shape"
    assert set(types) <= set(cache_utils.DYNAMIC_LAYER_TYPE_MAPPING), "DYNAMIC_LAYER_TYPE_MAPPING lacks a layer type"


def test_quantizer_hooks(tmp_path, monkeypatch):
    """quantizer.py implements HfQuantizer's override points and reads `checkpoint_files` in the pre-load hook."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import HfQuantizer

    from hf_compress.quantizer import HfCompressQuantizer

    for name in ("_process_model_before_weight_loading", "_process_model_after_weight_loading", "_dequantize",
                 "get_state_dict_and_metadata", "is_serializable", "remove_quantization_config"):
        assert hasattr(HfQuantizer, name), f"transformers.quantizers.HfQuantizer.{name} is gone (hf_compress/quantizer.py)"
    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "rtn", "bits": 4, "group_size": 16})
    hf_compress.save_pretrained(model, tmp_path / "q")
    seen = {}
    original = HfCompressQuantizer._process_model_before_weight_loading

    def spy(self, model, **kwargs):
        seen.update(kwargs)
        return original(self, model, **kwargs)

    monkeypatch.setattr(HfCompressQuantizer, "_process_model_before_weight_loading", spy)
    AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert seen.get("checkpoint_files"), (
        "HfQuantizer.preprocess_model no longer passes checkpoint_files to _process_model_before_weight_loading; "
        "hf_compress/quantizer.py checks the safetensors headers against the config with them")


def test_auto_class_internals():
    """auto.py maps the wrapped config to the native model class through the Auto classes' _model_mapping and
    CONFIG_MAPPING; hub/card.py reads MODEL_FOR_CAUSAL_LM_MAPPING_NAMES."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert CONFIG_MAPPING["llama"] is LlamaConfig, "transformers...configuration_auto.CONFIG_MAPPING changed"
    assert "LlamaForCausalLM" in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(), "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES changed"
    assert AutoModelForCausalLM._model_mapping[LlamaConfig] is LlamaForCausalLM, (
        "AutoModelForCausalLM._model_mapping (private) changed: hf_compress/auto.py native_model_class needs it")


def test_gguf_loading_flags():
    """loading.py drops the gguf quantizer of a model loaded with gguf_file= (its weights are already dequantized);
    the real load is tests/test_real_models.py (slow)."""
    from transformers.quantizers import HfQuantizer

    assert "model" in _params(HfQuantizer.remove_quantization_config), (
        "HfQuantizer.remove_quantization_config(model) changed: hf_compress/loading.py strips the gguf flag with it")
    model = make_tiny("llama")
    model.hf_quantizer, model.is_quantized, model.config.quantization_config = object(), True, {"quant_method": "gguf"}
    HfQuantizer.remove_quantization_config(None, model)  # uses no quantizer state
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False) and \
        getattr(model.config, "quantization_config", None) is None, (
            "HfQuantizer.remove_quantization_config no longer clears hf_quantizer / is_quantized / quantization_config")


def test_peft_dispatch_internals():
    """hf_compress/integrations/peft.py registers our layers through LoraConfig._register_custom_module from a patched
    __post_init__, subclasses lora.Linear and calls check_adapters_to_merge."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import check_adapters_to_merge  # noqa: F401 - import guard

    from hf_compress.modules import LowRankLinear, QuantLinear, QuantLowRankLinear

    assert hasattr(LoraConfig, "_register_custom_module"), (
        "peft LoraConfig._register_custom_module is gone: hf_compress/integrations/peft.py dispatches our layers with it")
    mapping = getattr(LoraConfig(target_modules=["q_proj"]), "_custom_modules", None) or {}
    assert {LowRankLinear, QuantLinear, QuantLowRankLinear} <= set(mapping), (
        "LoraConfig._custom_modules no longer holds what _register_custom_module registered (hf_compress/integrations/peft.py)")
    assert _params(Linear.__init__)[1:3] == ["base_layer", "adapter_name"], "peft lora.Linear.__init__ changed"
    for name in ("merge", "unmerge", "get_delta_weight"):
        assert hasattr(Linear, name), f"peft lora.Linear.{name} is gone (LoraCompressedLinear overrides it)"


def test_accelerate_utils():
    from accelerate.utils import align_module_device

    assert "module" in _params(align_module_device), "accelerate.utils.align_module_device(module, ...) changed"


def test_accelerate_offload_folder_is_found(tmp_path):
    """`resume.offload_folder` reads the disk-offload folder off an offloaded module's hook (where `compress`
    without a checkpoint folder puts its scratch folder)."""
    from transformers import AutoModelForCausalLM

    from hf_compress.resume import offload_folder

    make_tiny("llama").save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map={
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu",
        "lm_head": "cpu"}, offload_folder=str(tmp_path / "offload"))
    assert offload_folder(model) == str(tmp_path / "offload"), (
        "accelerate's AlignDevicesHook.weights_map.dataset.save_folder (PrefixedDataset -> OffloadedWeightsLoader) "
        "no longer gives the offload folder: hf_compress/resume.py:offload_folder")
    assert offload_folder(make_tiny("llama")) is None


def test_config_json_keeps_no_attention_override(tmp_path):
    """Switching to the eviction attention must not leak into a saved config.json."""
    from hf_compress.kv.eviction import PREFIX, EvictionKVCache

    model = make_tiny("llama")
    EvictionKVCache(model)
    model.save_pretrained(tmp_path)
    assert PREFIX not in json.dumps(json.loads((tmp_path / "config.json").read_text())), (
        "config._attn_implementation is now written to config.json: a saved model would ask for the eviction attention")


@pytest.mark.parametrize("package", ["transformers", "peft", "accelerate"])
def test_installed_versions_are_in_the_promised_range(package):
    """The environment under test satisfies pyproject's range (CI runs one at the bounds, one at the newest)."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    spec = next(Requirement(r) for r in requires("hf-compress") if Requirement(r).name == package)
    assert spec.specifier.contains(version(package)), f"{package} {version(package)} is outside pyproject's {spec}"
