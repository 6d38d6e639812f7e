"""compress -> save -> load in a fresh process: same outputs; at full rank, same as the dense model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

import hf_compress
from hf_compress import CompressionConfig, LowRankLinear

from conftest import ARCHS, make_tiny, output_of, run_python

AUTO = {"bert": "AutoModel"}
NATIVE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
          "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny model compressed at ratio 0.3 and saved, with its in-memory outputs on fixed ids."""
    root = tmp_path_factory.mktemp("roundtrip")
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    out = {}
    for arch in ARCHS:
        model = make_tiny(arch)
        hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
        path = root / arch
        hf_compress.save_pretrained(model, path)
        out[arch] = (path, output_of(model, ids))
    save_file({"ids": ids}, str(root / "ids.safetensors"))
    return root, out


def test_fresh_process_reload_matches_in_memory(saved):
    root, out = saved
    # One fresh interpreter loads every checkpoint with plain Auto classes and writes its outputs back.
    code = f"""
        import torch, hf_compress
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel, AutoModelForCausalLM
        ids = load_file({str(root / 'ids.safetensors')!r})["ids"]
        res = {{}}
        for arch, auto in {[(a, AUTO.get(a, "AutoModelForCausalLM")) for a in ARCHS]!r}:
            m = getattr(__import__("transformers"), auto).from_pretrained({str(root)!r} + "/" + arch)
            assert type(m).__name__ == {NATIVE!r}[arch], type(m)
            assert any(isinstance(x, hf_compress.LowRankLinear) for x in m.modules())
            with torch.no_grad():
                o = m(input_ids=ids)
            res[arch] = (o.logits if hasattr(o, "logits") else o.last_hidden_state).contiguous()
        save_file(res, {str(root / 'reloaded.safetensors')!r})
    """
    run_python(code)
    reloaded = load_file(str(root / "reloaded.safetensors"))
    for arch in ARCHS:
        diff = (reloaded[arch] - out[arch][1]).abs().max().item()
        assert diff <= 1e-5, f"{arch}: reloaded outputs differ by {diff}"


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_layout(saved, arch):
    path = saved[0] / arch
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "hf_compress"
    assert cfg["base_config"]["model_type"] == {"gpt2": "gpt2", "bert": "bert"}.get(arch, arch)
    q = cfg["base_config"]["quantization_config"]
    assert q["quant_method"] == "hf_compress" and q["method"] == "svd" and q["modules"]
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM", "AutoModel"}
    assert (path / "hf_compress_autoload.py").is_file()
    files = {p.name for p in path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_equals_dense(arch, ids):
    from hf_compress.pipelines import compress_modules
    from hf_compress.targets import find_targets, shape_of

    dense = make_tiny(arch)
    ref = output_of(dense, ids)
    # Every targeted layer at its own full rank min(out, in), dense_fallback off so that layers factorize.
    by_rank = {}
    for name, module in find_targets(dense, None, []).items():
        by_rank.setdefault(min(shape_of(module)), []).append(name)
    for rank, names in by_rank.items():
        compress_modules(dense, CompressionConfig(method="svd", rank=rank, targets=names, dense_fallback=False), progress=False)
    lowrank = [m for m in dense.modules() if isinstance(m, LowRankLinear)]
    assert lowrank and all(m.rank == min(m.in_features, m.out_features) for m in lowrank)
    assert (output_of(dense, ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_in_process_reload_and_resave(arch, ids, tmp_path):
    model = make_tiny(arch)
    hf_compress.compress(model, {"method": "svd", "ratio": 0.5}, progress=False)
    ref = output_of(model, ids)
    model.save_pretrained(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert type(again) is type(model)
    assert (output_of(again, ids) - ref).abs().max().item() <= 1e-6
    again.save_pretrained(tmp_path / "b")  # a re-save writes the wrapped format again
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "hf_compress"
    third = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert (output_of(third, ids) - ref).abs().max().item() <= 1e-6


def test_compress_on_load_and_dequantize(tmp_path, ids):
    dense = make_tiny("llama")
    dense.save_pretrained(tmp_path / "dense")
    expected = make_tiny("llama")
    hf_compress.compress(expected, {"method": "svd", "ratio": 0.4}, progress=False)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=CompressionConfig(method="svd", ratio=0.4))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert (output_of(loaded, ids) - output_of(expected, ids)).abs().max().item() <= 1e-5

    loaded.save_pretrained(tmp_path / "c")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert (output_of(again, ids) - output_of(loaded, ids)).abs().max().item() <= 1e-6

    ref = output_of(again, ids)
    plain = again.dequantize()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert (output_of(plain, ids) - ref).abs().max().item() <= 1e-5
    plain.save_pretrained(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "llama"


def test_autoconfig_recognises_checkpoint(saved):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(saved[0] / "llama")
    assert type(cfg).__name__ == "CompressedConfig"
    assert cfg.base_config.model_type == "llama"
    assert isinstance(cfg.base_config.quantization_config, CompressionConfig) or \
        cfg.base_config.quantization_config["quant_method"] == "hf_compress"
    model = AutoModel.from_pretrained(saved[0] / "llama")
    assert type(model).__name__ == "LlamaModel"


def test_lowrank_layers_keep_their_dtype(ids):
    model = make_tiny("qwen2").to(torch.bfloat16)
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(m.U.dtype == torch.bfloat16 and m.V.dtype == torch.bfloat16 for m in layers)
    assert torch.isfinite(output_of(model, ids)).all()


@pytest.mark.parametrize("arch,cfg", [("llama", {"method": "rtn", "bits": 4, "group_size": 16}),
                                      ("gpt2", {"method": "svd", "ratio": 0.5})], ids=["llama-rtn4", "gpt2-svd"])
def test_a_compressed_tied_head_is_untied_and_reloads(arch, cfg, ids, tmp_path):
    """``targets`` may name the output embedding (``lm_head``) even when it is tied to the input embedding: the
    head is compressed, the embedding stays dense and unchanged, the config says the two are no longer tied, and
    the checkpoint reloads to the same outputs (with the tie left in the config, loading tied the embedding's
    weight back onto the compressed head and failed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import _decoder_kwargs

    if arch == "llama":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**_decoder_kwargs(2), tie_word_embeddings=True)).eval()
    else:
        model = make_tiny("gpt2")
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb and model.config.tie_word_embeddings
    before = emb.detach().clone()
    layers = ["lm_head", "q_proj"] if arch == "llama" else ["lm_head", "c_attn"]
    hf_compress.compress(model, {**cfg, "targets": layers}, progress=False)
    head = model.get_output_embeddings()
    assert not isinstance(head, torch.nn.Linear) and not model.config.tie_word_embeddings
    assert torch.equal(model.get_input_embeddings().weight, before)
    ref = output_of(model, ids)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["base_config"]["tie_word_embeddings"] is False
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.get_output_embeddings()) is type(head)
    assert torch.equal(again.get_input_embeddings().weight, before)
    assert (output_of(again, ids) - ref).abs().max().item() <= 1e-6
