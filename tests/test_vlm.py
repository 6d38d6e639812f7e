"""Vision-language models (issue 37): the language model's blocks compressed by default, the vision tower and
projector only with ``vision=True`` (or targets), the log naming what was left dense; calibrated methods on
text-only calibration, and on image+text calibration through each family's processor (made offline); save → load
through the model's own class and `AutoModelForImageTextToText`, native class, logits equal; KV caches on the
language model; LoRA on the compressed layers only."""

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
def _bpe_tokenizer(specials: list[str], named: dict[str, str]):
    """A byte-level BPE tokenizer trained on the shipped excerpt (vocabulary ``VOCAB``): ``<pad> <s> </s> <unk>`` at
    0..3, then ``specials`` at 4, 5, ...; ``named``: the processor's named special tokens (``image_token``, ...)."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>", *specials], initial_alphabet=[],
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=named)
    assert fast.convert_tokens_to_ids(specials) == list(range(4, 4 + len(specials))) and len(fast) <= VOCAB
    return fast, text


def _llava_processor():
    """LLaVA's processor for the tiny model, made offline: ``<image>`` as token 4, and CLIP's image processor at
    28 x 28 (16 patches of 7 x 7: 16 image tokens)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    fast, text = _bpe_tokenizer(["<image>"], {"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=7, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return processor, text


def _gemma3_processor():
    """Gemma 3's processor for the tiny model: ``<start_of_image>`` (4), ``<end_of_image>`` (5) and the image soft
    token (6); the PIL image processor at 28 x 28 (SigLIP's 16 patches of 7 x 7, pooled to ``mm_tokens_per_image`` =
    4 soft tokens between the boi and eoi tokens)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    fast, text = _bpe_tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
                                {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"})
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return Gemma3Processor(image_processor=images, tokenizer=fast, image_seq_length=4), text


def _qwen2_5_vl_processor():
    """Qwen2.5-VL's processor for the tiny model: ``<|vision_start|>`` (4), ``<|vision_end|>`` (5),
    ``<|image_pad|>`` (6), ``<|video_pad|>`` (7); the PIL Qwen2-VL image processor with the tiny vision tower's
    patches (14 x 14, 2 frames, 2 x 2 merged), images resized to multiples of 28 pixels of area about 56² (a 32 x 40
    image: 56 x 84, 4 x 6 patches, 6 image tokens). No video processor (it needs torchvision): images only."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImagesOnly(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    fast, text = _bpe_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                                {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    vision = VLMS["qwen2_5_vl"][0]["vision_config"]
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56},
                                      patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                                      temporal_patch_size=vision["temporal_patch_size"])
    return ImagesOnly(image_processor=images, tokenizer=fast), text


#: image+text calibration per family: (processor maker, the tiny config's token ids for that processor's tokenizer,
#: the image placeholder of a prompt, the vision tower)
IMAGE_CALIBRATION = {
    "llava": (_llava_processor, {"image_token_index": 4}, "<image> ", "model.vision_tower"),
    "gemma3": (_gemma3_processor, {"boi_token_index": 4, "eoi_token_index": 5, "image_token_index": 6},
               "<start_of_image> ", "model.vision_tower"),
    "qwen2_5_vl": (_qwen2_5_vl_processor, {"vision_start_token_id": 4, "vision_end_token_id": 5,
                                          "image_token_id": 6, "video_token_id": 7},
                   "<|vision_start|><|image_pad|><|vision_end|> ", "model.visual"),
}


def _for_images(arch: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **{**VLMS[arch][0], **IMAGE_CALIBRATION[arch][1]})
    return AutoModelForImageTextToText.from_config(config).eval()


def _llava_for_images():
    return _for_images("llava")


def _image_samples(arch: str, text: str, n: int = 8):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = [line for line in text.splitlines() if len(line) > 20][:n]
    return [{"text": IMAGE_CALIBRATION[arch][2] + line,
             "images": [Image.fromarray((rng.random((32, 40, 3)) * 255).astype("uint8"))]} for line in lines]


@pytest.mark.parametrize("arch,method", [("llava", "gptq"), ("llava", "svd_llm"), ("llava", "fwsvd"),
                                         ("gemma3", "gptq"), ("gemma3", "svd_llm"),
                                         ("qwen2_5_vl", "gptq"), ("qwen2_5_vl", "svd_llm")])
def test_image_and_text_calibration_through_the_processor(arch, method, tmp_path):
    """The model's own forward runs on the processor's inputs (the vision tower sees every sample's image), the
    language model's weights differ from those of the same lines calibrated as text only, the vision tower stays
    dense (equal to the dense model's), and the result reloads with equal logits on an image+text input."""
    make, _, placeholder, tower = IMAGE_CALIBRATION[arch]
    processor, text = make()
    samples = _image_samples(arch, text)
    cfg = {"method": method, "calibration": {"nsamples": 8, "seqlen": 16}}
    cfg.update({"bits": 4, "group_size": 16} if method == "gptq" else {"ratio": 0.3})
    ids = torch.randint(8, VOCAB - 8, (1, 12), generator=torch.Generator().manual_seed(0))

    model = _for_images(arch)
    dense_tower = {k: v.clone() for k, v in model.get_submodule(tower).state_dict().items()}
    seen = []

    def hook(module, args, kwargs, out):
        seen.append(next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)).shape)

    handle = model.get_submodule(tower).register_forward_hook(hook, with_kwargs=True)
    hf_compress.compress(model, cfg, calibration=samples, tokenizer=processor, progress=False)
    handle.remove()
    assert len(seen) >= len(samples)  # every sample's image went through the tower
    if arch == "qwen2_5_vl":  # flattened patches: 4 x 6 of 3 channels x 2 frames x 14 x 14
        assert seen[0] == (24, 3 * 2 * 14 * 14)
    else:
        assert seen[0][-2:] == (28, 28)
    names = list(compressed_modules(model))
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    assert model.config.quantization_config.calibration["source"] == "8 image+text samples"
    state = model.get_submodule(tower).state_dict()
    assert state.keys() == dense_tower.keys() and all(torch.equal(state[k], dense_tower[k]) for k in state)

    text_only = _for_images(arch)  # the same lines without their images: other statistics, other weights
    hf_compress.compress(text_only, cfg, calibration=[s["text"].removeprefix(placeholder) for s in samples],
                         tokenizer=processor.tokenizer, progress=False)
    assert not torch.equal(logits(model, ids), logits(text_only, ids))

    probe = {k: v for k, v in processor(text=[samples[0]["text"]], images=samples[0]["images"],
                                        return_tensors="pt").items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        ref = model(**probe).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and sorted(compressed_modules(loaded)) == sorted(names)
    with torch.no_grad():
        assert torch.equal(loaded(**probe).logits, ref)


@pytest.mark.parametrize("arch", sorted(IMAGE_CALIBRATION))
def test_blocks_rerun_from_the_capture_reproduce_the_image_forward(arch):
    """The capture of image+text inputs records what the model's own forward gives each language-model block —
    the image features merged into the embeddings, Gemma 3's bidirectional mask over an image's tokens, Qwen2.5-VL's
    multimodal rotary positions (from ``image_grid_thw``) — so that every block run from the records reproduces
    its output in the full forward bit for bit."""
    from hf_compress.calibration import BlockwiseRunner, multimodal_inputs

    processor, text = IMAGE_CALIBRATION[arch][0]()
    samples = _image_samples(arch, text, n=2)
    model = _for_images(arch)
    blocks = model.get_submodule(VLMS[arch][1]).layers
    inputs = multimodal_inputs(samples, processor, 2)
    outputs = [[] for _ in blocks]
    handles = [b.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out[0] if isinstance(out, tuple)
                                                                             else out)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        for x in inputs:
            model(**x, use_cache=False)
    for h in handles:
        h.remove()
    runner = BlockwiseRunner(model, blocks, inputs)
    runner.capture()
    hidden = runner.hidden
    for i, block in enumerate(blocks):
        hidden = runner.run(i, block, hidden)
        assert all(torch.equal(h, o) for h, o in zip(hidden, outputs[i], strict=True)), f"block {i}"


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
