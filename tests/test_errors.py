"""Bad input gets a clear error naming the problem, and nothing half-written is left on disk."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_compress
from hf_compress import CheckpointError, CompressionConfig, ConfigError, NonFiniteWeightError, UnsupportedModuleError

from conftest import make_tiny


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(ConfigError, match="ratio must lie strictly between 0 and 1"):
        CompressionConfig(method="svd", ratio=ratio)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_not_positive(rank):
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        CompressionConfig(method="svd", rank=rank)


def test_rank_above_min_dim_names_layer():
    model = make_tiny("llama")  # k_proj is 24x48: min dim 24
    with pytest.raises(ConfigError, match=r"rank 30 is above min\(out, in\) = 24 for model.layers.0.self_attn.k_proj"):
        hf_compress.compress(model, {"method": "svd", "rank": 30}, progress=False)


def test_ratio_and_rank_exclusive_and_one_required():
    with pytest.raises(ConfigError, match="not both"):
        CompressionConfig(ratio=0.2, rank=4)
    with pytest.raises(ConfigError, match="ratio"):
        CompressionConfig(method="svd")


def test_unknown_method():
    with pytest.raises(ConfigError, match="Unknown compression method 'nope'; available: ") as info:
        CompressionConfig(method="nope", ratio=0.2)
    assert all(name in str(info.value) for name in ("asvd", "fwsvd", "svd", "svd_llm"))


def test_patterns_matching_nothing():
    model = make_tiny("llama")
    with pytest.raises(ConfigError, match=r"\['not_a_layer'\] match no module"):
        hf_compress.compress(model, {"method": "svd", "ratio": 0.2, "targets": ["q_proj", "not_a_layer"]}, progress=False)


@pytest.mark.parametrize("pattern,kind", [("embed_tokens", "Embedding"), ("mlp", "LlamaMLP"), ("re:.*input_layernorm", "LlamaRMSNorm")])
def test_unsupported_module_type(pattern, kind):
    model = make_tiny("llama")
    with pytest.raises(UnsupportedModuleError, match=kind):
        hf_compress.compress(model, {"method": "svd", "ratio": 0.2, "targets": [pattern]}, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(bad):
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(NonFiniteWeightError, match="model.layers.1.mlp.up_proj"):
        hf_compress.compress(model, {"method": "svd", "ratio": 0.2}, progress=False)


def test_already_compressed_model_refused():
    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "svd", "ratio": 0.2}, progress=False)
    with pytest.raises(ConfigError, match="already compressed"):
        hf_compress.compress(model, {"method": "svd", "ratio": 0.2}, progress=False)


def test_unknown_config_field_names_it():
    with pytest.raises(ConfigError, match="future_option"):
        CompressionConfig.from_dict({"quant_method": "hf_compress", "method": "svd", "ratio": 0.2, "future_option": 1})


@pytest.fixture
def saved(tmp_path):
    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
    path = tmp_path / "ckpt"
    hf_compress.save_pretrained(model, path)
    return path


def test_missing_safetensors_file(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_truncated_safetensors_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_corrupt_safetensors_header(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_factor_shapes_contradicting_config(saved):
    cfg_path = saved / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rec = cfg["base_config"]["quantization_config"]["modules"]["model.layers.0.mlp.down_proj"]
    rec["rank"] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.U has shape"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_tensor_missing_from_checkpoint(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.self_attn.v_proj.V"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks tensor model.layers.1.self_attn.v_proj.V"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
    target = tmp_path / "out"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while writing weights")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        hf_compress.save_pretrained(model, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # temporary folder cleaned up too


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
    target = tmp_path / "out"
    hf_compress.save_pretrained(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        hf_compress.save_pretrained(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_pickle_serialization_refused(tmp_path):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="safetensors only"):
        hf_compress.save_pretrained(model, tmp_path / "x", safe_serialization=False)
