"""Vision-language models (issue 37): the language model's blocks compressed by default, the vision tower and
projector only with ``vision=True`` (or targets), the log naming what was left dense; calibrated methods on
text-only calibration; save → load through the model's own class and `AutoModelForImageTextToText`, native class,
logits equal; KV caches on the language model; LoRA on the compressed layers only."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, DynamicCache

import hf_compress
from hf_compress.errors import CheckpointError, ConfigError
from hf_compress.integrations.peft import LoraCompressedLinear, target_module_names
from hf_compress.kv import make_cache
from hf_compress.modules import compressed_modules
from hf_compress.targets import language_model, other_modalities

from conftest import VOCAB

_TEXT = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
               patch_size=7)
#: tiny random configs of three vision-language families: model_type -> (config kwargs, the language model's name,
#: the parts outside it)
VLMS = {
    "gemma3": (dict(text_config={**_TEXT, "model_type": "gemma3_text", "head_dim": 12, "sliding_window": 16,
                                 "layer_types": ["sliding_attention", "full_attention"]},
                    vision_config={**_VISION, "model_type": "siglip_vision_model"}, mm_tokens_per_image=4,
                    image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2),
               "model.language_model", ["model.vision_tower"]),
    "llava": (dict(text_config={**_TEXT, "model_type": "llama"},
                   vision_config={**_VISION, "model_type": "clip_vision_model", "projection_dim": 32},
                   image_token_index=VOCAB - 1, projector_hidden_act="gelu", vision_feature_layer=-1),
              "model.language_model", ["model.vision_tower", "model.multi_modal_projector"]),
    "qwen2_5_vl": (dict(text_config={**_TEXT, "model_type": "qwen2_5_vl_text",
                                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 2]}},
                        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                           out_hidden_size=48, patch_size=14, spatial_merge_size=2,
                                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
                        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
                        vision_end_token_id=VOCAB - 4),
                   "model.language_model", ["model.visual"]),
}
RTN = {"method": "rtn", "bits": 4, "group_size": 16}


def tiny_vlm(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **VLMS[arch][0])
    return AutoModelForImageTextToText.from_config(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def calibration_ids(n=8, seqlen=32):
    return torch.randint(3, VOCAB - 8, (n, seqlen), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", sorted(VLMS))
def test_language_model_and_the_parts_outside_it(arch):
    model = tiny_vlm(arch)
    _, language, parts = VLMS[arch]
    assert language_model(model) == language
    outside = other_modalities(model)
    assert sorted(outside) == sorted(parts) and all(outside.values())


@pytest.mark.parametrize("arch", sorted(VLMS))
def test_language_model_by_default_vision_by_choice_and_the_log_says_so(arch, caplog):
    _, language, parts = VLMS[arch]
    model = tiny_vlm(arch)
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        hf_compress.compress(model, RTN, progress=False)
    names = list(compressed_modules(model))
    assert len(names) == 14 and all(n.startswith(language + ".layers.") for n in names)
    message = next(r.getMessage() for r in caplog.records if "multimodal" in r.getMessage())
    assert "left dense" in message and all(p in message for p in parts) and "vision=True" in message

    model = tiny_vlm(arch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        hf_compress.compress(model, {**RTN, "vision": True}, progress=False)
    names = list(compressed_modules(model))
    outside = [n for n in names if not n.startswith(language + ".")]
    assert outside and {p for p in parts if any(n.startswith(p + ".") for n in outside)} == set(parts)
    assert model.config.quantization_config.to_dict()["vision"] is True
    message = next(r.getMessage() for r in caplog.records if "multimodal" in r.getMessage())
    assert "also compressed" in message and "left dense" not in message


def test_explicit_targets_reach_the_vision_tower():
    model = tiny_vlm("llava")
    hf_compress.compress(model, {**RTN, "targets": ["re:model\\.multi_modal_projector\\.linear_\\d"]}, progress=False)
    assert sorted(compressed_modules(model)) == ["model.multi_modal_projector.linear_1",
                                                 "model.multi_modal_projector.linear_2"]


@pytest.mark.parametrize("arch", sorted(VLMS))
@pytest.mark.parametrize("method", ["svd_llm", "fwsvd", "gptq"])
def test_calibrated_methods_on_text_compress_the_language_model(arch, method, ids):
    model = tiny_vlm(arch)
    cfg = {"method": method, "calibration": {"nsamples": 8, "seqlen": 32}}
    cfg.update({"bits": 4, "group_size": 16} if method == "gptq" else {"ratio": 0.3})
    hf_compress.compress(model, cfg, calibration=calibration_ids(), progress=False)
    names = list(compressed_modules(model))
    assert names and all(n.startswith(VLMS[arch][1] + ".layers.") for n in names)
    assert torch.isfinite(logits(model, ids)).all()


def test_a_calibrated_method_refuses_the_vision_tower_clearly():
    model = tiny_vlm("llava")
    with pytest.raises(ConfigError, match="lie outside it: compress them with a data-free method"):
        hf_compress.compress(model, {"method": "gptq", "bits": 4, "group_size": 16, "vision": True,
                                     "calibration": {"nsamples": 8, "seqlen": 32}},
                             calibration=calibration_ids(), progress=False)


@pytest.mark.parametrize("arch", sorted(VLMS))
def test_save_and_load_through_its_class_and_image_text_to_text(arch, ids, tmp_path):
    model = tiny_vlm(arch)
    hf_compress.compress(model, {**RTN, "vision": True}, progress=False)
    ref = logits(model, ids)
    model.save_pretrained(tmp_path)
    for cls in (type(model), AutoModelForImageTextToText):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is type(model)
        assert sorted(compressed_modules(loaded)) == sorted(compressed_modules(model))
        assert torch.equal(logits(loaded, ids), ref), cls.__name__


def test_the_checkpoint_holds_the_models_own_names_and_its_card_says_what_stayed_dense(tmp_path):
    """Issue 37 point 1: transformers' legacy VLM names (``language_model.model.layers...``) are not written."""
    from safetensors import safe_open

    model = tiny_vlm("llava")
    hf_compress.compress(model, RTN, progress=False)
    hf_compress.save_pretrained(model, tmp_path)  # (with the model card)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.language_model.layers.0.self_attn.q_proj.qweight" in keys
    assert not any(k.startswith("language_model.") for k in keys)
    card = (tmp_path / "README.md").read_text()
    assert "left dense: `model.vision_tower` (12 linear layers), `model.multi_modal_projector` (2 linear layers)" in card


def test_an_auto_class_without_the_family_names_the_one_to_use(tmp_path):
    model = tiny_vlm("llava")
    hf_compress.compress(model, RTN, progress=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="AutoModelForImageTextToText"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", sorted(VLMS))
def test_kv_cache_on_the_language_model(arch):
    model = tiny_vlm(arch)
    hf_compress.compress(model, RTN, progress=False)
    ids = torch.randint(3, VOCAB - 8, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=DynamicCache(config=model.config))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=make_cache(model, "quant8"))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", sorted(VLMS))
def test_lora_lands_on_the_compressed_layers_only(arch):
    model = tiny_vlm(arch)
    hf_compress.compress(model, RTN, progress=False)
    names = target_module_names(model)
    assert sorted(names) == sorted(compressed_modules(model))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "lora_" not in n.rsplit(".", 1)[-1]]
    assert len(wrapped) == len(names)
    assert all(isinstance(m, LoraCompressedLinear) for n, m in peft_model.named_modules() if n in wrapped)


# ----------------------------------------------------------------------------------------------- image calibration
def _llava_processor():
    """LLaVA's processor for the tiny model, made offline: a BPE tokenizer trained on the shipped excerpt with
    ``<image>`` as token 4, and CLIP's image processor at 28 x 28 (16 patches of 7 x 7: 16 image tokens)."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    text = resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<image>"], initial_alphabet=[],
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    assert fast.convert_tokens_to_ids("<image>") == 4 and len(fast) <= VOCAB
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=7, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return processor, text


def _llava_for_images():
    torch.manual_seed(0)
    config = AutoConfig.for_model("llava", **{**VLMS["llava"][0], "image_token_index": 4})
    return AutoModelForImageTextToText.from_config(config).eval()


@pytest.mark.parametrize("method", ["gptq", "svd_llm", "fwsvd"])
def test_image_and_text_calibration_through_the_processor(method):
    import numpy as np
    from PIL import Image

    processor, text = _llava_processor()
    rng = np.random.default_rng(0)
    lines = [line for line in text.splitlines() if len(line) > 20][:8]
    samples = [{"text": "<image> " + line, "images": [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))]}
               for line in lines]
    cfg = {"method": method, "calibration": {"nsamples": 8, "seqlen": 16}}
    cfg.update({"bits": 4, "group_size": 16} if method == "gptq" else {"ratio": 0.3})
    ids = torch.randint(5, VOCAB - 8, (1, 12), generator=torch.Generator().manual_seed(0))

    model = _llava_for_images()
    seen = []
    handle = model.model.vision_tower.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    hf_compress.compress(model, cfg, calibration=samples, tokenizer=processor, progress=False)
    handle.remove()
    assert len(seen) >= len(samples) and seen[0][-2:] == (28, 28)  # every sample's image went through the tower
    names = list(compressed_modules(model))
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    assert model.config.quantization_config.calibration["source"] == "8 image+text samples"

    text_only = _llava_for_images()  # the same lines without their images: other statistics, other weights
    hf_compress.compress(text_only, cfg, calibration=[s["text"].removeprefix("<image> ") for s in samples],
                         tokenizer=processor.tokenizer, progress=False)
    assert not torch.equal(logits(model, ids), logits(text_only, ids))


def test_image_calibration_errors_are_clear():
    model = _llava_for_images()
    cfg = {"method": "gptq", "bits": 4, "group_size": 16, "calibration": {"nsamples": 2, "seqlen": 16}}
    with pytest.raises(ConfigError, match="needs the model's processor"):
        hf_compress.compress(model, cfg, calibration=[{"text": "<image> a", "images": []}] * 2, progress=False)
    with pytest.raises(ConfigError, match="neither 'text'"):
        hf_compress.compress(_llava_for_images(), cfg, calibration=[{"pixels": 1}] * 2, progress=False)


def test_cli_compresses_a_vlm_directory_and_exports_it(tmp_path, tiny_tokenizer, ids):
    """`hf-compress compress DIR` loads a vision-language checkpoint (AutoModelForImageTextToText where the causal-LM
    mapping lacks it), ``--vision`` reaches the vision tower; `export` of the result loads back exactly."""
    import json
    import subprocess
    import sys

    model = tiny_vlm("llava")
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hf_compress.cli", *map(str, args)], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=600)

    proc = cli("compress", tmp_path / "dense", "-o", tmp_path / "rtn", "--method", "rtn", "--bits", "4",
               "--group-size", "16", "--vision")
    assert proc.returncode == 0, proc.stderr
    modules = json.loads((tmp_path / "rtn" / "config.json").read_text())["base_config"]["quantization_config"]
    assert modules["vision"] is True and any(n.startswith("model.vision_tower.") for n in modules["modules"])
    proc = cli("export", tmp_path / "rtn", "-o", tmp_path / "ct")
    assert proc.returncode == 0, proc.stderr
    ours = AutoModelForImageTextToText.from_pretrained(tmp_path / "rtn").eval()
    theirs = AutoModelForImageTextToText.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    assert torch.equal(logits(theirs, ids), logits(ours, ids))
